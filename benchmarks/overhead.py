"""Study 3: time overhead of sampling.

1. Per layer shape: ``wtacrs.sampled_linear`` forward+backward against ``F.linear`` forward+backward on the same
   input (N token rows), at each budget. Reps of the two are interleaved and the median of the per-rep ratios is
   reported, which cancels slow drifts in machine load. With each time, the ops of one call (``torch.profiler``):
   top-level ops (dispatcher calls from Python or autograd: the host-side overhead) and kernels (ops that compute;
   a Triton kernel counts as one), and whether the Triton kernels ran (CUDA) or their references (CPU).
2. End to end: full optimizer steps of a reference arm and a sampled arm at the same batch, both models in this
   process with the same weights, steps interleaved; median of per-step ratios.

    python -m benchmarks.overhead                                   # CPU defaults (small)
    python -m benchmarks.overhead --rows 12800 --e2e-model t5-base --e2e-batch 100   # one GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import MODELS, RESULTS_DIR, make_batch, run_metadata, settings_dict, study_main, synchronize

#: (label, in_features, out_features): the linear shapes of the benchmark models.
SHAPES = {
    "t5-base": [("attn q/k/v/o", 768, 768), ("ffn wi", 768, 3072), ("ffn wo", 3072, 768)],
    "t5-large": [("attn q/k/v/o", 1024, 1024), ("ffn wi", 1024, 4096), ("ffn wo", 4096, 1024)],
    "llama-1b": [("attn q/o", 2048, 2048), ("mlp gate/up", 2048, 5632), ("mlp down", 5632, 2048)],
    "lora-A r32": [("lora_A (t5-base)", 768, 32), ("lora_A (t5-large)", 1024, 32)],
    "tiny": [("tiny", 64, 256)],
}
DEFAULT_PAIRS = ("lora:lora+wta@0.3", "lora:lora+wta@0.1", "full:full+wta@0.3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _interleaved(fns: list, device: str, warmup: int, reps: int) -> list[list[float]]:
    """Times of each function over ``reps`` rounds, the functions called in turn within each round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
    return times


def layer_overhead(rows: int, d_in: int, d_out: int, budgets: list[float], dtype: torch.dtype, device: str,
                   warmup: int, reps: int) -> list[dict]:
    from wtacrs import sampled_linear

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, d_in, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(d_out, d_in, device=device, dtype=dtype, generator=g) / d_in**0.5).requires_grad_()
    bias = torch.zeros(d_out, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, d_out, device=device, dtype=dtype, generator=g)

    def step(fn):
        def run():
            fn(x, weight, bias).backward(grad)
            x.grad = weight.grad = bias.grad = None

        return run

    fns = [step(F.linear)] + [step(lambda x_, w, b, budget=b_: sampled_linear(x_, w, b, budget)) for b_ in budgets]
    times = _interleaved(fns, device, warmup, reps)
    counts = [op_counts(fn, device) for fn in fns]
    base = times[0]
    out = [{"budget": None, "median_s": statistics.median(base), "ratio": 1.0, **counts[0]}]
    for budget, t, c in zip(budgets, times[1:], counts[1:]):
        ratios = [s / b for s, b in zip(t, base)]
        out.append({"budget": budget, "median_s": statistics.median(t), "ratio": statistics.median(ratios), **c})
    return out


#: Ops that launch no kernel: views, allocations, metadata.
_NO_KERNEL = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
    "aten::numpy_T", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::slice",
    "aten::select", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::resize_", "aten::resolve_conj", "aten::resolve_neg", "aten::unbind", "aten::split", "aten::narrow",
    "aten::lift_fresh", "aten::_unsafe_view", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::result_type", "aten::promote_types",
})


def op_counts(fn, device: str) -> dict:
    """Ops of one call of ``fn`` (after a warm-up call): ``top_level_ops``, aten ops not called from inside another
    aten op, plus Triton launches; ``kernels``: on CUDA the kernels the GPU ran, on CPU the aten ops that compute
    (leaves that are not views, allocations or metadata)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    if cuda:
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        ours = _triton_kernel_names()
        triton = sum(e.name in ours for e in gpu)
        return {"top_level_ops": len(top) + triton, "kernels": len(gpu), "triton_kernels": triton}
    # An op computes if nothing it calls computes (allocations and views inside do not count).
    computing = [e for e in ops if e.name not in _NO_KERNEL]
    parents = {id(e.cpu_parent) for e in computing if e.cpu_parent is not None}
    kernels = [e for e in computing if id(e) not in parents]
    return {"top_level_ops": len(top), "kernels": len(kernels), "triton_kernels": 0}


def _triton_kernel_names() -> set[str]:
    import importlib

    names = set()
    for module in ("rows_triton", "bits_triton", "draws_triton", "stats_triton"):
        found = vars(importlib.import_module(f"wtacrs.kernels.{module}"))
        names |= {name for name, value in found.items() if type(value).__name__ == "JITFunction"}
    return names


def e2e_overhead(model: str, pairs: list[str], batch: int, seq: int, precision: str, device: str, warmup: int,
                 reps: int) -> list[dict]:
    """Per pair ``ref:arm``: median over interleaved steps of ``step(arm) / step(ref)`` at equal batch."""
    from .memory_speed import Trainer

    data = make_batch(model, batch, seq, device)
    out = []
    for pair in pairs:
        ref_name, arm_name = pair.split(":")
        ref, arm = Trainer(model, ref_name, precision, device), Trainer(model, arm_name, precision, device)
        t_ref, t_arm = _interleaved([lambda: ref.step(data), lambda: arm.step(data)], device, warmup, reps)
        out.append({
            "model": model, "batch_size": batch, "seq_len": seq, "precision": precision, "reference": ref_name,
            "arm": arm_name, "ref_step_s": statistics.median(t_ref), "arm_step_s": statistics.median(t_arm),
            "ratio": statistics.median(a / r for a, r in zip(t_arm, t_ref)),
            "ref_times_s": t_ref, "arm_times_s": t_arm,
        })
        print(f"e2e {model} bs {batch}: {arm_name} / {ref_name} step time = {out[-1]['ratio']:.3f}", flush=True)
        del ref, arm
    return out


def run_study(args: argparse.Namespace) -> dict:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    layers = []
    for precision in args.precisions:
        for group in args.shapes:
            for label, d_in, d_out in SHAPES[group]:
                for r in layer_overhead(args.rows, d_in, d_out, args.budgets, DTYPES[precision], args.device,
                                        args.warmup, args.reps):
                    layers.append({"group": group, "layer": label, "d_in": d_in, "d_out": d_out, "rows": args.rows,
                                   "precision": precision, **r})
                print(f"layer {group} {label} {d_in}->{d_out} {precision}: "
                      + ", ".join(f"@{r['budget']} {r['ratio']:.2f}x ({r['top_level_ops']} ops)"
                                  for r in layers[-len(args.budgets):]), flush=True)
    e2e = []
    if args.e2e_model:
        e2e = e2e_overhead(args.e2e_model, args.pairs, args.e2e_batch, args.seq_len, args.precisions[0],
                           args.device, args.warmup, args.e2e_steps)
    settings = settings_dict(args)
    from wtacrs.kernels.dispatch import use_triton

    kernels = "triton" if use_triton(torch.empty(0, device=args.device)) else "pytorch reference"
    return {"study": "overhead", "meta": run_metadata(), "settings": settings, "kernels": kernels, "layers": layers,
            "e2e": e2e}


def table(result: dict) -> str:
    budgets = result["settings"]["budgets"]
    lines = [f"Per layer, {result['settings']['rows']} rows: sampled_linear fwd+bwd time / F.linear fwd+bwd "
             f"(median of interleaved reps); ops of one call, top-level / kernels ({result['kernels']} kernels)",
             "| shape | prec | F.linear ms | F.linear ops | " + " | ".join(f"@{b:g}" for b in budgets) + " |",
             "|---|---|---|---|" + "---|" * len(budgets)]
    base_rows = [r for r in result["layers"] if r["budget"] is None]
    for base in base_rows:
        same = [r for r in result["layers"] if r["budget"] is not None and r["layer"] == base["layer"]
                and r["group"] == base["group"] and r["precision"] == base["precision"]]
        lines.append(f"| {base['group']} {base['layer']} {base['d_in']}->{base['d_out']} | {base['precision']} | "
                     f"{1e3 * base['median_s']:.2f} | {base['top_level_ops']} / {base['kernels']} | "
                     + " | ".join(f"{r['ratio']:.2f}x, {r['top_level_ops']} / {r['kernels']} ops" for r in same)
                     + " |")
    if result["e2e"]:
        lines += ["", "End to end, equal batch: step time of arm / step time of reference (median of interleaved steps)",
                  "| model | batch | prec | reference | arm | ref step s | arm step s | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in result["e2e"]:
            lines.append(f"| {e['model']} | {e['batch_size']} | {e['precision']} | {e['reference']} | {e['arm']} | "
                         f"{e['ref_step_s']:.3f} | {e['arm_step_s']:.3f} | {e['ratio']:.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = result["settings"]["budgets"]
    base_rows = [r for r in result["layers"] if r["budget"] is None]
    labels = [f"{r['group']}\n{r['layer']}\n{r['precision']}" for r in base_rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4.2))
    width = 0.8 / max(1, len(budgets))
    for j, b in enumerate(budgets):
        ratios = [next(r["ratio"] for r in result["layers"] if r["budget"] == b and r["layer"] == base["layer"]
                       and r["group"] == base["group"] and r["precision"] == base["precision"])
                  for base in base_rows]
        ax.bar([i + j * width for i in range(len(labels))], ratios, width, label=f"budget {b:g}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + width * (len(budgets) - 1) / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("fwd+bwd time / F.linear")
    title = f"sampled_linear overhead, {result['settings']['rows']} rows ({result['meta']['device']})"
    if result["e2e"]:
        title += "\nend to end: " + ", ".join(f"{e['arm']}/{e['reference']} {e['ratio']:.2f}x" for e in result["e2e"])
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=1024, help="token rows N (batch x sequence)")
    parser.add_argument("--shapes", nargs="+", default=["t5-base", "t5-large", "lora-A r32"], choices=sorted(SHAPES))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--e2e-model", default="t5-base", help="model of the end-to-end pairs ('' to skip)")
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="reference:arm")
    parser.add_argument("--e2e-batch", type=int, default=4)
    parser.add_argument("--e2e-steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="default results/bench_overhead_<device>.json")
    parser.add_argument("--no-plot", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    from .common import parse_arm

    if args.e2e_model and args.e2e_model not in MODELS:
        raise ValueError(f"--e2e-model must be one of {sorted(MODELS)}; got {args.e2e_model!r}")
    for pair in args.pairs:
        ref, sep, arm = pair.partition(":")
        if not sep:
            raise ValueError(f"--pairs entries are reference:arm, e.g. lora:lora+wta@0.3; got {pair!r}")
        parse_arm(ref)
        parse_arm(arm)
    for name in ("rows", "reps", "e2e_batch", "e2e_steps", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> int:
    return study_main(
        sys.modules[__name__], argv, lambda args: RESULTS_DIR / f"bench_overhead_{args.device.split(':')[0]}.json"
    )

if __name__ == "__main__":
    sys.exit(main())
