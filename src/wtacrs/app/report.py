"""``wtacrs compare``: the paper-style table (methods x tasks, average) and a plot from finetune results files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .finetune import METHODS

RESULTS_FORMAT = "wtacrs-results/1"
_METHOD_TITLES = {"full": "Full", "lora": "LoRA", "wtacrs": "WTA-CRS", "lora-wtacrs": "LoRA+WTA-CRS"}


class ReportError(ValueError):
    """A results file that cannot be read; the message names it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="results files written by wtacrs finetune")
    parser.add_argument("--plot", help="PNG to write (default: the first results file with .png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")


def run(args: argparse.Namespace) -> int:
    try:
        experiments = load_experiments(args.results)
    except ReportError as e:
        print(f"wtacrs compare: error: {e}", file=sys.stderr)
        return 2
    print(table(experiments))
    if not args.no_plot:
        out = Path(args.plot) if args.plot else Path(args.results[0]).with_suffix(".png")
        plot(experiments, out)
        print(f"plot: {out}")
    return 0


def load_experiments(paths: list[str]) -> list[dict]:
    """Every experiment of the given files; a later file's (task, method, budget) replaces an earlier one's."""
    found: dict[tuple, dict] = {}
    for path in paths:
        try:
            document = json.loads(Path(path).read_text())
        except OSError as e:
            raise ReportError(f"cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} is not JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(document, dict) or document.get("format") != RESULTS_FORMAT:
            raise ReportError(f"{path} is not a wtacrs finetune results file (no \"format\": \"{RESULTS_FORMAT}\")")
        for exp in document["experiments"]:
            found[(exp["task"], exp["method"], exp["budget"])] = exp
    return list(found.values())


def _label(exp: dict) -> str:
    title = _METHOD_TITLES.get(exp["method"], exp["method"])
    return f"{title}@{exp['budget']:g}" if exp["budget"] is not None else title


def _rows(experiments: list[dict]) -> tuple[list[str], list[tuple[str, str]], dict]:
    """Method labels in the paper's order, (task, title) columns in first-seen order, cells by (label, task)."""
    order = {m: i for i, m in enumerate(METHODS)}
    ranked = sorted(experiments, key=lambda e: (order.get(e["method"], len(order)), -(e["budget"] or 1.0)))
    labels = list(dict.fromkeys(_label(e) for e in ranked))
    tasks = list(dict.fromkeys((e["task"], e["task_title"]) for e in experiments))
    return labels, tasks, {(_label(e), e["task"]): e for e in experiments}


def table(experiments: list[dict]) -> str:
    """A Markdown table: GLUE score per task (mean ± std over seeds), their average, and per method the mean
    saved-activation memory of one training batch, peak memory and training time summed over tasks."""
    labels, tasks, cells = _rows(experiments)
    header = ["method"] + [title for _, title in tasks] + (["avg"] if len(tasks) > 1 else [])
    header += ["saved act. MiB", "peak MiB", "train s", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label in labels:
        row, scores, present = [label], [], []
        for task, _ in tasks:
            exp = cells.get((label, task))
            if exp is None:
                row.append("–")
                continue
            present.append(exp)
            scores.append(exp["mean"]["score"])
            seeds = len(exp["runs"])
            row.append(f"{exp['mean']['score']:.1f}" + (f" ± {exp['std']['score']:.1f}" if seeds > 1 else ""))
        if len(tasks) > 1:
            row.append(f"{sum(scores) / len(scores):.1f}" if len(scores) == len(tasks) else "–")
        mean = lambda key: sum(e["mean"][key] for e in present) / len(present)  # noqa: E731
        row += [f"{mean('saved_activation_bytes') / 2**20:.1f}", f"{mean('peak_memory_bytes') / 2**20:.0f}",
                f"{sum(e['mean']['train_time_s'] for e in present):.0f}", f"{mean('tokens_per_s'):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    kinds = sorted({r["peak_memory_kind"] for e in experiments for r in e["runs"]})
    lines.append("")
    lines.append("Score: GLUE metric x 100 (accuracy; CoLA Matthews; MRPC/QQP mean of F1 and accuracy; STS-B mean of "
                 "Pearson and Spearman), best epoch on the eval split. Saved act.: bytes autograd keeps for one "
                 f"training batch (parameters excluded). Peak: {', '.join(kinds)}.")
    return "\n".join(lines)


def plot(experiments: list[dict], out: Path) -> None:
    """Two panels: score per task and method, and saved-activation memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, tasks, cells = _rows(experiments)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs, ys, errs = [], [], []
        for j, (task, _) in enumerate(tasks):
            exp = cells.get((label, task))
            if exp is not None:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(exp["mean"]["score"])
                errs.append(exp["std"]["score"])
        left.bar(xs, ys, width, yerr=errs, label=label, capsize=2)
    left.set_xticks(range(len(tasks)), [title for _, title in tasks])
    left.set_ylabel("GLUE score (x100)")
    left.set_title("Eval score, mean ± std over seeds")
    left.legend(fontsize=8)
    memory = []
    for label in labels:
        present = [e for (lab, _), e in cells.items() if lab == label]
        memory.append(sum(e["mean"]["saved_activation_bytes"] for e in present) / len(present) / 2**20)
    right.bar(range(len(labels)), memory, color=[f"C{i}" for i in range(len(labels))])
    right.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    right.set_ylabel("MiB")
    right.set_title("Saved activations, one training batch")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
