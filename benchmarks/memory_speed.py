"""Study 1: memory and speed of every fine-tuning arm, side by side, each arm in a fresh process.

Per (model, precision, arm) it records the bytes autograd saves for backward (any device; ``wtacrs.memory.
SavedTensors``), the peak allocated CUDA memory, the median step time of ``--steps`` optimizer steps after
``--warmup`` (as sentences/s and tokens/s), and, on CUDA with ``--largest-batch``, the largest batch that fits
(``--memory-limit`` GiB emulates a smaller card). Models are random-init configs with the public shapes.

    python -m benchmarks.memory_speed --models t5-base --batch-size 4 --steps 3        # CPU, small
    python -m benchmarks.memory_speed --models t5-base t5-large --batch-size 100 --largest-batch   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

from .common import (
    DEFAULT_ARMS,
    GIB,
    MODELS,
    REPO_ROOT,
    RESULTS_DIR,
    make_batch,
    study_main,
    median_time,
    parse_arm,
    prepare_model,
    run_metadata,
    settings_dict,
)

PRECISIONS = ("fp32", "bf16")
RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------------------
# Worker: one arm in this process.


def _precision_context(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _offload_context(offload: bool, device: str):
    if offload:
        return torch.autograd.graph.save_on_cpu(pin_memory=device.startswith("cuda"))
    return contextlib.nullcontext()


class Trainer:
    """One model, one optimizer, one arm: ``step(batch)`` is a full AdamW step."""

    def __init__(self, model_name: str, arm_name: str, precision: str, device: str) -> None:
        self.arm = parse_arm(arm_name)
        self.precision, self.device = precision, device
        torch.manual_seed(0)
        self.model = prepare_model(model_name, self.arm, device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.total = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)

    def loss(self, batch: dict) -> torch.Tensor:
        with _precision_context(self.precision, self.device), _offload_context(self.arm.offload, self.device):
            return self.model(**batch).loss

    def step(self, batch: dict) -> None:
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def saved_bytes(self, batch: dict) -> int:
        """Bytes autograd keeps for backward in one forward (activations only; parameters excluded)."""
        from wtacrs.memory import SavedTensors

        # Measured without the offload hooks (innermost hooks win); offloading moves exactly these bytes.
        with _precision_context(self.precision, self.device), SavedTensors(exclude=self.model.parameters()) as saved:
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return saved.nbytes


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _fits(trainer: Trainer, model_name: str, batch_size: int, seq_len: int) -> bool:
    try:
        trainer.step(make_batch(model_name, batch_size, seq_len, trainer.device))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        _free(trainer.device)


def largest_batch(trainer: Trainer, model_name: str, seq_len: int, start: int, max_batch: int) -> dict:
    """Largest batch with one full step that does not run out of memory: doubling, then bisection to 1 sentence."""
    lo, hi, probes = 0, None, 0
    bs = max(1, start)
    while bs <= max_batch:
        probes += 1
        if _fits(trainer, model_name, bs, seq_len):
            lo, bs = bs, bs * 2
        else:
            hi = bs
            break
    if hi is None:
        return {"largest_batch": lo, "capped_at": max_batch, "probes": probes}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probes += 1
        if _fits(trainer, model_name, mid, seq_len):
            lo = mid
        else:
            hi = mid
    return {"largest_batch": lo, "capped_at": None, "probes": probes}


def run_worker(spec: dict) -> dict:
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.startswith("cuda") and spec.get("memory_limit_gib"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_limit_gib"] * GIB / total), device)
    trainer = Trainer(spec["model"], spec["arm"], spec["precision"], device)
    result: dict = {"trainable_params": trainer.trainable, "total_params": trainer.total}
    bs, seq = spec["batch_size"], spec["seq_len"]
    batch = make_batch(spec["model"], bs, seq, device)
    try:
        saved = trainer.saved_bytes(batch)
        result["saved_bytes"] = saved
        # What stays on the accelerator: offloaded activations live in host memory.
        result["saved_bytes_on_device"] = 0 if (trainer.arm.offload and device.startswith("cuda")) else saved
        _free(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        if spec["steps"]:  # 0: saved bytes only
            median, times = median_time(lambda: trainer.step(batch), device, spec["warmup"], spec["steps"])
            result.update(
                step_s=median, step_times_s=times, sentences_per_s=bs / median, tokens_per_s=bs * seq / median,
                peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
            )
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory at batch {bs}: {str(exc).splitlines()[0]}"
    del batch
    trainer.optimizer.zero_grad(set_to_none=True)
    _free(device)
    if spec.get("search_largest_batch"):
        if device.startswith("cuda"):
            result.update(largest_batch(trainer, spec["model"], seq, bs, spec["max_batch"]))
        else:
            result["largest_batch"] = None  # no memory limit to search against on CPU
    return result


# ---------------------------------------------------------------------------------------------------------------
# Parent: every arm in a fresh process.


def run_arm(spec: dict, timeout: float | None = None) -> dict:
    """Run one arm in a fresh Python process and return its result (or the error it died with)."""
    cmd = [sys.executable, "-m", "benchmarks.memory_speed", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**spec, **json.loads(line[len(RESULT_PREFIX):])}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**spec, "error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def run_study(args: argparse.Namespace) -> dict:
    rows = []
    for model in args.models:
        for precision in args.precisions:
            for arm in args.arms:
                spec = {
                    "model": model, "arm": arm, "precision": precision, "device": args.device,
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                    "warmup": args.warmup, "search_largest_batch": arm in args.largest_batch_arms,
                    "max_batch": args.max_batch, "memory_limit_gib": args.memory_limit,
                    "threads": args.threads,
                }
                row = run_arm(spec, args.timeout)
                rows.append(row)
                print(format_row(row), flush=True)
    settings = settings_dict(args)
    return {"study": "memory_speed", "meta": run_metadata(), "settings": settings, "rows": rows}


def format_row(row: dict) -> str:
    head = f"{row['model']:<10} {row['precision']:<4} {row['arm']:<20} "
    if "saved_bytes" not in row:
        return f"{head} ERROR {row.get('error')}"
    parts = [f"saved {row['saved_bytes'] / GIB:8.3g} GiB"]
    if row.get("peak_allocated_bytes") is not None:
        parts.append(f"peak {row['peak_allocated_bytes'] / GIB:7.2f} GiB")
    if "step_s" in row:
        parts.append(f"step {row['step_s']:7.3f} s  {row['sentences_per_s']:8.1f} sent/s")
    if row.get("largest_batch") is not None:
        parts.append(f"largest batch {row['largest_batch']}")
    if row.get("error"):
        parts.append(f"ERROR {row['error']}")
    return head + "  ".join(parts)


def table(result: dict, reference: str = "lora") -> str:
    """Markdown table: one row per (model, precision, arm), ratios against ``reference`` of the same model."""
    on_cuda = any(r.get("peak_allocated_bytes") is not None for r in result["rows"])
    if not any("step_s" in r for r in result["rows"]):
        return saved_table(result, reference)
    mem_key = "peak_allocated_bytes" if on_cuda else "saved_bytes"
    mem_label = "peak GiB" if on_cuda else "saved act. GiB"
    lines = [
        f"| model | prec | arm | {mem_label} | {reference} / arm (memory) | step s | sent/s | step vs {reference} |"
        + (" largest batch |" if on_cuda else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if on_cuda else ""),
    ]
    refs = {(r["model"], r["precision"]): r for r in result["rows"] if r["arm"] == reference and mem_key in r}
    for r in result["rows"]:
        ref = refs.get((r["model"], r["precision"]))
        mem = r.get(mem_key)
        ratio = f"{ref[mem_key] / mem:.2f}x" if ref and mem else "–"
        step = r.get("step_s")
        step_ratio = f"{100 * (step / ref['step_s'] - 1):+.0f}%" if ref and step and "step_s" in ref else "–"
        cells = [
            r["model"], r["precision"], r["arm"], f"{mem / GIB:.3g}" if mem is not None else "error",
            ratio, f"{step:.2f}" if step else "–", f"{r['sentences_per_s']:.1f}" if step else "–", step_ratio,
        ]
        if on_cuda:
            cells.append(str(r.get("largest_batch") or "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def saved_table(result: dict, reference: str = "lora") -> str:
    """Markdown table of saved-activation bytes only (runs with ``--steps 0``)."""
    lines = [f"| model | prec | arm | saved act. GiB | MiB / sentence | {reference} / arm |", "|---|---|---|---|---|---|"]
    refs = {(r["model"], r["precision"]): r for r in result["rows"] if r["arm"] == reference and "saved_bytes" in r}
    for r in result["rows"]:
        if "saved_bytes" not in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['arm']} | error: {r.get('error')} | – | – |")
            continue
        ref = refs.get((r["model"], r["precision"]))
        ratio = f"{ref['saved_bytes'] / r['saved_bytes']:.2f}x" if ref else "–"
        per_sentence = r["saved_bytes"] / r["batch_size"] / 2**20
        lines.append(f"| {r['model']} | {r['precision']} | {r['arm']} | {r['saved_bytes'] / GIB:.3g} | "
                     f"{per_sentence:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Memory–throughput plane per model (one panel each): x = memory, y = sentences/s, one point per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "step_s" in r]
    if not rows:
        return plot_saved(result, path)
    models = list(dict.fromkeys(r["model"] for r in rows))
    on_cuda = any(r.get("peak_allocated_bytes") is not None for r in rows)
    mem_key = "peak_allocated_bytes" if on_cuda else "saved_bytes"
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.8), squeeze=False)
    markers = {"fp32": "o", "bf16": "s"}
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model):
            x, y = r[mem_key] / GIB, r["sentences_per_s"]
            colour = "tab:red" if "wta" in r["arm"] else ("tab:blue" if r["arm"].startswith("lora") else "tab:grey")
            ax.scatter(x, y, marker=markers.get(r["precision"], "o"), color=colour,
                       edgecolor="black" if "gc" in r["arm"] else colour)
            ax.annotate(f"{r['arm']} ({r['precision']})", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"{model}, batch {rows[0]['batch_size']}, seq {rows[0]['seq_len']}")
        ax.set_xlabel("peak allocated GiB" if on_cuda else "saved activations GiB (SavedTensors)")
        ax.set_ylabel("sentences / s (median step)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Memory–throughput plane ({result['meta']['device']}); up-left is better", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_saved(result: dict, path: Path) -> Path:
    """Saved-activation bytes per arm relative to LoRA (or the first arm), one group of bars per model/precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "saved_bytes" in r]
    groups = list(dict.fromkeys((r["model"], r["precision"]) for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 2.0 + 0.3 * len(groups) * len(arms)), 4.5))
    width = 0.8 / len(arms)
    cmap = plt.get_cmap("tab20")
    for j, arm in enumerate(arms):
        xs, ys = [], []
        for i, (model, precision) in enumerate(groups):
            r = next((r for r in rows if r["model"] == model and r["precision"] == precision and r["arm"] == arm), None)
            if r is not None:
                xs.append(i + j * width)
                ys.append(r["saved_bytes"] / GIB)
        ax.bar(xs, ys, width, label=arm, color=cmap(j % 20))
    ax.set_xticks([i + width * (len(arms) - 1) / 2 for i in range(len(groups))], [f"{m}\n{p}" for m, p in groups])
    ax.set_yscale("log")
    ax.set_ylabel("saved activations, GiB (log)")
    ax.set_title(f"Bytes autograd keeps for backward, batch {rows[0]['batch_size']}, seq {rows[0]['seq_len']} "
                 f"({result['meta']['device']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["t5-base"], choices=sorted(MODELS))
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        help="full|lora then +gc, +wta@B, +offload, +masks, e.g. lora+wta@0.1+gc")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported); 0: saved bytes only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--largest-batch-arms", nargs="*", default=[],
                        help="arms whose largest fitting batch is searched (CUDA only)")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="GiB; emulate a smaller card with torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per worker (default: torch's); 1 is steadier on a busy host")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per arm")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default results/bench_memory_<dev>.json)")
    parser.add_argument("--no-plot", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    for arm in args.arms:
        parse_arm(arm)
    unknown = set(args.largest_batch_arms) - set(args.arms)
    if unknown:
        raise ValueError(f"--largest-batch-arms must be among --arms; got {sorted(unknown)}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0 (0: saved bytes only); got {args.steps}")
    for name in ("batch_size", "seq_len", "max_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(RESULT_PREFIX + json.dumps(run_worker(json.loads(argv[1]))), flush=True)
        return 0
    return study_main(
        sys.modules[__name__], argv, lambda args: RESULTS_DIR / f"bench_memory_{args.device.split(':')[0]}.json"
    )

if __name__ == "__main__":
    sys.exit(main())
