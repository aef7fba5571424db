"""Study 1: memory and speed of every fine-tuning arm, side by side, each arm in a fresh process.

Per (model, precision, arm) it records the bytes kept for backward (any device; ``wtacrs.memory.SavedTensors``
plus selective checkpointing's own cache), the peak allocated CUDA memory, the median step time of ``--steps``
optimizer steps after ``--warmup`` (as sentences/s and tokens/s), the attention implementation the model ran, and,
on CUDA with ``--largest-batch-arms``, the largest batch that fits (``--memory-limit`` GiB emulates a smaller card).
Models are random-init configs with the public shapes. Each arm runs in a process of its own, forked from a server
that has torch and transformers imported.

    python -m benchmarks.memory_speed --models t5-base --batch-size 4 --steps 3        # CPU, small
    python -m benchmarks.memory_speed --models t5-base t5-large --batch-size 100 --largest-batch-arms lora  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
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
    synchronize,
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

    def __init__(self, model_name: str, arm_name: str, precision: str, device: str,
                 dropout: float | None = None, lr: float = 1e-5) -> None:
        self.arm = parse_arm(arm_name)
        self.precision, self.device = precision, device
        torch.manual_seed(0)
        self.prepared = prepare_model(model_name, self.arm, device, dropout)
        self.model = self.prepared.model
        params = [p for p in self.prepared.module.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.total = sum(p.numel() for p in self.prepared.module.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def loss(self, batch: dict) -> torch.Tensor:
        with _precision_context(self.precision, self.device), _offload_context(self.arm.offload, self.device):
            return self.model(**batch).loss

    def step(self, batch: dict) -> torch.Tensor:
        """One optimizer step; returns the loss (detached; reading it would synchronise)."""
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def saved_bytes(self, batch: dict) -> int:
        """Bytes kept for backward in one forward (activations only; parameters excluded): what autograd saves
        plus, for ``+sac``, what the checkpoints keep in their own caches."""
        from wtacrs.memory import SavedTensors

        selective = self.prepared.selective if not self.arm.compile else None  # compiled: autograd saves all
        recording = selective.recording() if selective else contextlib.nullcontext()
        # Measured without the offload hooks (innermost hooks win); offloading moves exactly these bytes.
        with _precision_context(self.precision, self.device), recording, \
                SavedTensors(exclude=self.prepared.module.parameters()) as saved:
            loss = self.model(**batch).loss
        cached = selective.cached_tensors() if selective else {}
        extra = sum(t.untyped_storage().nbytes() for t in cached.values() if t not in saved)
        del cached
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return saved.nbytes + extra


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _fits(trainer: Trainer, model_name: str, batch_size: int, seq_len: int) -> bool:
    try:
        trainer.step(make_batch(model_name, batch_size, seq_len, trainer.device))
        synchronize(trainer.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        _free(trainer.device)


def search_largest(fits: Callable[[int], bool], guess: int, max_batch: int, tolerance: float = 0.05,
                   max_probes: int = 8) -> dict:
    """Largest batch ``b <= max_batch`` with ``fits(b)``, assuming fitting is monotone in ``b``.

    Starts at ``guess`` (a prediction), steps away from it by ``tolerance`` and doubles the step while the answer
    does not change (a gallop), then bisects until the bracket is within ``tolerance`` (or 1 sentence). Returns
    ``largest_batch`` (fits; 0 if nothing did), ``fails_at`` (the smallest batch seen to fail, None if none),
    ``probes``, and ``capped_at`` (``max_batch`` when even that fitted). ``max_probes`` bounds the time spent."""
    lo, hi, probes, step = 0, None, 0, tolerance
    b = min(max(1, guess), max_batch)
    while probes < max_probes:
        probes += 1
        if fits(b):
            lo = b
        else:
            hi = b
        if hi is None:
            if lo >= max_batch:
                break
            b = min(max_batch, max(lo + 1, int(lo * (1 + step))))
        elif lo == 0:
            if hi == 1:
                break
            b = min(hi - 1, max(1, math.ceil(hi / (1 + step))))
        else:
            if hi - lo <= 1 or hi <= lo * (1 + tolerance):
                break
            b = (lo + hi) // 2
        step *= 2
    return {"largest_batch": lo, "fails_at": hi, "probes": probes,
            "capped_at": max_batch if hi is None and lo >= max_batch else None}


#: Profiler event names: host calls that launch a kernel, and those that wait for the device.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
#: aten ops that read a device value on the host (each one a sync on a GPU); counted on any device.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::_unique2")


def profile_step(trainer: Trainer, batch: dict) -> dict:
    """Per step: host syncs (CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` warnings, and the profiler's
    synchronize calls and device-to-host copies), kernels and launch calls (CUDA), aten op events and
    sync-forcing aten ops (any device), from one profiled step after warm-up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.startswith("cuda")
    out: dict = {}
    if cuda:
        synchronize(trainer.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        synchronize(trainer.device)
        out["sync_warnings_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainer.step(batch)
        synchronize(trainer.device)
    events = prof.events()
    names = Counter(e.name for e in events)
    out["aten_ops_per_step"] = sum(n for name, n in names.items() if name.startswith("aten::"))
    out["sync_ops_per_step"] = sum(names[n] for n in SYNC_OPS)
    if cuda:
        device_events = [e for e in events if e.device_type == DeviceType.CUDA]
        out["kernels_per_step"] = sum(not e.name.startswith(("Memcpy", "Memset")) for e in device_events)
        out["d2h_copies_per_step"] = sum("DtoH" in e.name for e in device_events)
        out["launch_calls_per_step"] = sum(names[n] for n in LAUNCH_CALLS)
        out["host_syncs_per_step"] = sum(names[n] for n in SYNC_CALLS)
    return out


def _compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "compiled_graphs": counters["stats"].get("unique_graphs", 0)}


def run_worker(spec: dict) -> dict:
    """One arm, as ``spec`` asks: saved bytes, timed steps, peak memory, and optionally a profiled step, the peak
    at a second batch size (for a per-sentence slope) and a largest-batch search (CUDA)."""
    device = spec["device"]
    cuda = device.startswith("cuda")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    limit = None
    if cuda and spec.get("memory_limit_gib"):
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, spec["memory_limit_gib"] * GIB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        limit = fraction * total
    start = time.perf_counter()
    trainer = Trainer(spec["model"], spec["arm"], spec["precision"], device, spec.get("dropout"))
    result: dict = {"trainable_params": trainer.trainable, "total_params": trainer.total,
                    "attention": trainer.prepared.attention, "memory_limit_bytes": limit,
                    "build_s": time.perf_counter() - start}
    bs, seq = spec["batch_size"], spec["seq_len"]
    batch = make_batch(spec["model"], bs, seq, device)
    try:
        if spec.get("saved_bytes", True):
            result["saved_bytes"] = saved = trainer.saved_bytes(batch)
            # What stays on the accelerator: offloaded activations live in host memory.
            result["saved_bytes_on_device"] = 0 if (trainer.arm.offload and cuda) else saved
        _free(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if spec["steps"]:  # 0: no timing
            start = time.perf_counter()
            median, times = median_time(lambda: trainer.step(batch), device, spec["warmup"], spec["steps"])
            result.update(
                step_s=median, step_times_s=times, sentences_per_s=bs / median, tokens_per_s=bs * seq / median,
                warmup_s=time.perf_counter() - start - sum(times),  # includes compiling, for compiled arms
                peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
            )
            if spec.get("profile"):
                result.update(profile_step(trainer, batch))
        del batch
        trainer.optimizer.zero_grad(set_to_none=True)
        _free(device)
        second = spec.get("second_batch")
        if second and cuda and "peak_allocated_bytes" in result:
            torch.cuda.reset_peak_memory_stats(device)
            trainer.step(make_batch(spec["model"], second, seq, device))
            synchronize(device)
            peak2 = torch.cuda.max_memory_allocated(device)
            slope = (result["peak_allocated_bytes"] - peak2) / (bs - second)
            result.update(second_batch_peak_bytes=peak2, bytes_per_sentence=slope,
                          fixed_bytes=result["peak_allocated_bytes"] - slope * bs)
            _free(device)
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory at batch {bs}: {str(exc).splitlines()[0]}"
    if trainer.arm.compile:
        result.update(_compile_counters())
    if spec.get("search_largest_batch"):
        if cuda:
            guess = spec.get("largest_guess") or bs
            result.update(search_largest(lambda b: _fits(trainer, spec["model"], b, seq), guess, spec["max_batch"],
                                         max_probes=spec.get("max_probes", 8)))
        else:
            result["largest_batch"] = None  # no memory limit to search against on CPU
    return result


# ---------------------------------------------------------------------------------------------------------------
# Parent: every arm in a fresh process.

#: Imported once by the fork server, so that each arm's process starts without importing them again. None of
#: them touches CUDA when imported; each arm's process initialises its own CUDA context.
PRELOAD = ("torch", "transformers", "peft", "transformers.models.t5.modeling_t5",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
           )
_FORK_UNSAFE = "no arm process could be forked from the preloaded server, or CUDA could not start in it"
_use_subprocess = False


def _forked_worker(spec: dict, conn) -> None:
    try:
        if spec["device"].startswith("cuda"):
            try:
                torch.zeros(1, device=spec["device"])
            except RuntimeError as exc:
                conn.send({"error": f"{_FORK_UNSAFE}: {exc}"})
                return
        conn.send(run_worker(spec))
    except BaseException as exc:  # the parent records it as this arm's error
        conn.send({"error": f"{type(exc).__name__}: {exc}"[:2000]})
    finally:
        conn.close()


def _run_forked(spec: dict, timeout: float | None) -> dict:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_forked_worker, args=(spec, sender), daemon=True)
    proc.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            return receiver.recv()
        return {"error": f"timed out after {timeout:.0f} s"}
    except EOFError:
        proc.join(5)
        return {"error": f"worker died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receiver.close()


def _run_subprocess(spec: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory_speed", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def run_arm(spec: dict, timeout: float | None = None) -> dict:
    """Run one arm in a fresh process (forked from a server that has the libraries imported; a fresh
    interpreter if CUDA cannot start there) and return its result, or the error it died with."""
    global _use_subprocess
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # availability checks that leave CUDA unstarted
    if not _use_subprocess:
        try:
            out = _run_forked(spec, timeout)
        except OSError as exc:  # the fork server could not start
            out = {"error": f"{_FORK_UNSAFE}: {exc}"}
        if not str(out.get("error", "")).startswith(_FORK_UNSAFE):
            return {**spec, **out}
        print(f"{out['error']}; each arm runs in a fresh interpreter from now on", file=sys.stderr, flush=True)
        _use_subprocess = True
    return {**spec, **_run_subprocess(spec, timeout)}


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
    head = f"{row['model']:<10} {row['precision']:<4} {row['arm']:<28} "
    if "saved_bytes" not in row and "step_s" not in row:
        return f"{head} ERROR {row.get('error')}"
    parts = [f"attn {row.get('attention')}"]
    if "saved_bytes" in row:
        parts.append(f"saved {row['saved_bytes'] / GIB:8.3g} GiB")
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
                        help="full|lora then any of +gc, +sac, +offload, +masks, +attn, +compile, +wta@B, "
                             "+budget@B, e.g. lora+wta@0.3+masks+attn+compile (see benchmarks/README.md)")
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
