"""The key GPU subset in one script (sized for about 8 minutes on one H100), tables printed last.

1. T5-Base and T5-Large, fp32, batch 100, seq 128, every arm (each in a fresh process): peak memory, step time.
2. Largest batch on T5-Base for LoRA and LoRA+WTA-CRS@0.1 (``--memory-limit`` GiB emulates a smaller card).
3. Overhead: per-layer sampled_linear vs F.linear at 12,800 rows, and the end-to-end step-time ratio
   LoRA+WTA-CRS@0.3 / LoRA at batch 100 (interleaved steps in one process).
Then the targets check (``benchmarks.report``).

    python -m benchmarks.gpu_key                  # one GPU
    python -m benchmarks.gpu_key --quick          # tiny shapes, runs anywhere (CPU smoke run)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import memory_speed, overhead, report
from .common import DEFAULT_ARMS, RESULTS_DIR, run_metadata, write_json

LARGEST_BATCH_ARMS = ("lora", "lora+wta@0.1")


def settings(quick: bool, device: str) -> dict:
    if quick:
        return {"models": ["t5-tiny"], "batch": 4, "seq": 32, "steps": 2, "warmup": 1, "rows": 256,
                "shapes": ["tiny"], "e2e_model": "t5-tiny", "max_batch": 64, "timeout": 300}
    return {"models": ["t5-base", "t5-large"], "batch": 100, "seq": 128, "steps": 5, "warmup": 2, "rows": 12800,
            "shapes": ["t5-base", "t5-large", "lora-A r32"], "e2e_model": "t5-base", "max_batch": 4096,
            "timeout": 150}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run on any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
    parser.add_argument("--memory-limit", type=float, default=None, help="GiB, for the largest-batch search")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    s = settings(args.quick, args.device)
    tag = f"{args.device.split(':')[0]}{'_quick' if args.quick else ''}"
    start = time.perf_counter()

    mem_args = argparse.Namespace(
        models=s["models"], arms=args.arms, precisions=["fp32"], batch_size=s["batch"], seq_len=s["seq"],
        steps=s["steps"], warmup=s["warmup"], device=args.device,
        largest_batch_arms=[a for a in LARGEST_BATCH_ARMS if a in args.arms], max_batch=s["max_batch"],
        memory_limit=args.memory_limit, timeout=s["timeout"], threads=None,
    )
    memory_speed.check_args(mem_args)
    mem = memory_speed.run_study(mem_args)
    # Largest batch only for T5-Base (first model): drop the search results of the others to keep the table clear.
    for row in mem["rows"]:
        if row["model"] != s["models"][0]:
            row.pop("largest_batch", None)
    mem_path = write_json(args.out_dir / f"bench_gpu_key_memory_{tag}.json", mem)
    memory_speed.plot(mem, mem_path.with_suffix(".png"))

    ov_args = argparse.Namespace(
        device=args.device, rows=s["rows"], shapes=s["shapes"], budgets=[0.3, 0.1], precisions=["fp32"],
        reps=7, warmup=s["warmup"], e2e_model=s["e2e_model"], pairs=["lora:lora+wta@0.3", "lora:lora+wta@0.1"],
        e2e_batch=s["batch"], e2e_steps=max(5, s["steps"]), seq_len=s["seq"], out=None, no_plot=False,
    )
    ov = overhead.run_study(ov_args)
    ov_path = write_json(args.out_dir / f"bench_gpu_key_overhead_{tag}.json", ov)
    overhead.plot(ov, ov_path.with_suffix(".png"))

    print("\n=== memory and speed (fp32, batch %d, seq %d) ===" % (s["batch"], s["seq"]))
    print(memory_speed.table(mem))
    print("\n=== overhead ===")
    print(overhead.table(ov))
    print("\n=== targets ===")
    for model in s["models"]:
        print("\n".join(report.frontier(mem, model)))
    print("\n".join(report.targets(mem, ov, model=s["models"][0])))
    print(f"\n{run_metadata()['device']}; wall time {time.perf_counter() - start:.0f} s; wrote {mem_path}, {ov_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
