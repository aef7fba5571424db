"""``wtacrs compare``: the paper-style table (arms x tasks, average) and a plot from finetune results files.

An arm is a method with its settings: ``LoRA``, ``LoRA+GC`` (gradient checkpointing), ``LoRA+WTA-CRS@0.3`` (the
defaults: token-statistics probabilities, compact masks), and variants named by what differs from the defaults
(``activation probs``, ``gradcache probs``, ``+attn``, ``no masks``). Scores are the mean over seeds ± its
standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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
    """Every experiment of the given files, each with its file's ``config``; a later file's (task, arm) replaces
    an earlier one's."""
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
            exp = dict(exp, config=document.get("config", {}))
            found[(exp["task"], _label(exp))] = exp
    return list(found.values())


def _label(exp: dict) -> str:
    """The arm: method (and budget), then what differs from ``apply_wtacrs``'s defaults."""
    config = exp.get("config", {})
    label = _METHOD_TITLES.get(exp["method"], exp["method"])
    if exp["budget"] is not None:
        label += f"@{exp['budget']:g}"
    if config.get("gc"):
        label += "+GC"
    if "wtacrs" in exp["method"]:
        if config.get("attention"):
            label += "+attn"
        if config.get("probs", "tokens") != "tokens":
            label += f", {config['probs'].replace('activations', 'activation')} probs"
        if config.get("masks") is False:
            label += ", no masks"
    return label


def _se(exp: dict, key: str) -> float:
    """Standard error over seeds of ``key`` (a metric or a run number)."""
    runs = exp["runs"]
    values = [r["metrics"][key] if key in r["metrics"] else r[key] for r in runs]
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def _rows(experiments: list[dict]) -> tuple[list[str], list[tuple[str, str]], dict]:
    """Arm labels in the paper's method order (then as given), (task, title) columns in first-seen order, cells by
    (label, task)."""
    order = {m: i for i, m in enumerate(METHODS)}
    ranked = sorted(experiments, key=lambda e: (order.get(e["method"], len(order)), -(e["budget"] or 1.0)))
    labels = list(dict.fromkeys(_label(e) for e in ranked))
    tasks = list(dict.fromkeys((e["task"], e["task_title"]) for e in experiments))
    return labels, tasks, {(_label(e), e["task"]): e for e in experiments}


def table(experiments: list[dict]) -> str:
    """A Markdown table: GLUE score per task (mean ± standard error over seeds), their average, and per arm the
    mean saved-activation memory of one training batch, peak memory, and training time per run summed over tasks."""
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
            row.append(f"{exp['mean']['score']:.1f}" + (f" ± {_se(exp, 'score'):.1f}" if seeds > 1 else ""))
        if len(tasks) > 1:
            row.append(f"{sum(scores) / len(scores):.1f}" if len(scores) == len(tasks) else "–")
        mean = lambda key: sum(e["mean"][key] for e in present) / len(present)  # noqa: E731
        row += [f"{mean('saved_activation_bytes') / 2**20:.1f}", f"{mean('peak_memory_bytes') / 2**20:.0f}",
                f"{sum(e['mean']['train_time_s'] for e in present):.0f}", f"{mean('tokens_per_s'):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    seeds = sorted({len(e["runs"]) for e in experiments})
    lines.append("Score: GLUE metric x 100 (accuracy; CoLA Matthews; MRPC/QQP mean of F1 and accuracy; STS-B mean of "
                 f"Pearson and Spearman), best epoch on the eval split; mean ± standard error over "
                 f"{'/'.join(map(str, seeds))} seed(s). Saved act.: bytes autograd keeps for one training batch "
                 f"(parameters excluded). Peak: {_peak_kind(experiments)}. Train s: one run's training time, summed over tasks.")
    return "\n".join(lines)


def plot(experiments: list[dict], out: Path) -> None:
    """Four panels, one colour per arm: score (per task; mean ± standard error over seeds, each seed a dot), saved
    activations, peak memory and training time per run (means over tasks). The score and peak-memory axes are
    zoomed to the data (they do not start at 0; the panel says so); the other two start at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, tasks, cells = _rows(experiments)
    colours = [f"C{i}" for i in range(len(labels))]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.2), gridspec_kw={"width_ratios": [max(2, len(tasks)), 1, 1, 1]})
    score_ax, saved_ax, peak_ax, time_ax = axes
    width = 0.8 / len(labels)
    seeds_all = []
    for i, label in enumerate(labels):
        for j, (task, _) in enumerate(tasks):
            exp = cells.get((label, task))
            if exp is None:
                continue
            x = j + (i - (len(labels) - 1) / 2) * width
            seeds = [r["metrics"]["score"] for r in exp["runs"]]
            seeds_all += seeds
            score_ax.errorbar(x, exp["mean"]["score"], yerr=_se(exp, "score"), fmt="o", color=colours[i], ms=7,
                              capsize=4, label=label if j == 0 else None)
            score_ax.plot([x + width / 4] * len(seeds), seeds, ".", color="grey", ms=4)
    low, high = min(seeds_all), max(seeds_all)
    pad = max(1.0, 0.25 * (high - low))
    score_ax.set_ylim(low - pad, high + pad)
    score_ax.set_xticks(range(len(tasks)), [title for _, title in tasks])
    score_ax.set_xlim(-0.5, len(tasks) - 0.5)
    score_ax.set_ylabel("score (x100)")
    score_ax.set_title("Eval score: mean ± s.e. over seeds (dots: seeds)", fontsize=9)
    score_ax.grid(alpha=0.3, axis="y")
    score_ax.legend(fontsize=7)

    def per_arm(key: str) -> tuple[list[float], list[float]]:
        means, errors = [], []
        for label in labels:
            present = [e for (lab, _), e in cells.items() if lab == label]
            means.append(sum(e["mean"][key] for e in present) / len(present))
            errors.append(math.sqrt(sum(_se(e, key) ** 2 for e in present)) / len(present))
        return means, errors

    positions = range(len(labels))
    saved = [m / 2**20 for m in per_arm("saved_activation_bytes")[0]]
    peak = [m / 2**20 for m in per_arm("peak_memory_bytes")[0]]
    times, time_errors = per_arm("train_time_s")
    for ax, values, errors, title, unit in (
        (saved_ax, saved, None, "Saved activations, one batch", "MiB"),
        (peak_ax, peak, None, f"Peak memory ({_peak_kind(experiments)})", "MiB"),
        (time_ax, times, time_errors, "Training time per run (± s.e.)", "s"),
    ):
        bars = ax.bar(positions, values, color=colours, yerr=errors, capsize=3)
        ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=7)
        ax.set_xticks(positions, labels, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=9)
    spread = max(peak) - min(peak)
    peak_ax.set_ylim(min(peak) - max(spread, 1.0), max(peak) + 0.3 * max(spread, 1.0))
    peak_ax.set_ylabel("MiB (axis zoomed)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _peak_kind(experiments: list[dict]) -> str:
    kinds = sorted({r["peak_memory_kind"] for e in experiments for r in e["runs"]})
    return ", ".join(k.replace("process_peak_rss", "process peak RSS").replace("cuda_max_allocated",
                                                                             "CUDA max allocated") for k in kinds)
