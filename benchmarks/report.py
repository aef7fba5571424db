"""Targets check and Markdown tables from results files.

    python -m benchmarks.report results/bench_memory_cpu.json results/bench_overhead_cpu.json

The targets (LoRA+WTA-CRS against LoRA on T5-Base at batch 100):
peak memory >= 2.7x lower at @0.3, step time <= 5% above LoRA's at equal batch, largest batch >= 6.4x LoRA's
(@0.1, the paper's best case), and where every arm sits on the memory-throughput plane relative to LoRA+GC.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import GIB

MEMORY_TARGET = 2.7
STEP_TARGET = 1.05
BATCH_TARGET = 6.4


def _memory_key(rows: list[dict]) -> tuple[str, str]:
    if any(r.get("peak_allocated_bytes") is not None for r in rows):
        return "peak_allocated_bytes", "peak allocated memory"
    return "saved_bytes", "saved-activation bytes (CPU: no peak-memory counter; parameters and optimizer excluded)"


def _find(rows: list[dict], model: str, arm: str, precision: str = "fp32") -> dict | None:
    return next((r for r in rows if r["model"] == model and r["arm"] == arm and r["precision"] == precision), None)


def targets(memory: dict, overhead: dict | None = None, model: str = "t5-base") -> list[str]:
    """One line per target: measured value, the target, met / not met / not measured, and on what.
    (The memory-throughput plane is ``frontier``.)"""
    rows = memory["rows"]
    key, what = _memory_key(rows)
    setting = f"{model}, batch {memory['settings']['batch_size']}, {memory['meta']['device']}"
    lines = []
    lora, sampled = _find(rows, model, "lora"), _find(rows, model, "lora+wta@0.3")
    if lora and sampled and lora.get(key) and sampled.get(key):
        ratio = lora[key] / sampled[key]
        verdict = "met" if ratio >= MEMORY_TARGET else "NOT met"
        lines.append(f"memory: LoRA / LoRA+WTA-CRS@0.3 {what} = {ratio:.2f}x (target >= {MEMORY_TARGET}x): "
                     f"{verdict} [{setting}]")
    else:
        lines.append("memory: not measured (LoRA or LoRA+WTA-CRS@0.3 row missing)")

    # The end-to-end pair may use another model (smaller shapes on CPU); the line names it.
    e2e = next((e for e in (overhead or {}).get("e2e", []) if e["reference"] == "lora" and e["arm"] == "lora+wta@0.3"),
               None)
    if e2e:
        verdict = "met" if e2e["ratio"] <= STEP_TARGET else "NOT met"
        lines.append(f"step time: LoRA+WTA-CRS@0.3 / LoRA at equal batch = {e2e['ratio']:.3f} (target <= "
                     f"{STEP_TARGET}): {verdict} [{e2e['model']}, batch {e2e['batch_size']}, interleaved steps, "
                     f"{overhead['meta']['device']}]")
    elif lora and sampled and "step_s" in lora and "step_s" in sampled:
        ratio = sampled["step_s"] / lora["step_s"]
        verdict = "met" if ratio <= STEP_TARGET else "NOT met"
        lines.append(f"step time: LoRA+WTA-CRS@0.3 / LoRA = {ratio:.3f} (target <= {STEP_TARGET}): {verdict} "
                     f"[{setting}, separate processes]")
    else:
        lines.append("step time: not measured")

    lb_lora, lb_sampled = _find(rows, model, "lora"), _find(rows, model, "lora+wta@0.1")
    if lb_lora and lb_sampled and lb_lora.get("largest_batch") and lb_sampled.get("largest_batch"):
        ratio = lb_sampled["largest_batch"] / lb_lora["largest_batch"]
        verdict = "met" if ratio >= BATCH_TARGET else "NOT met"
        capped = " (search capped)" if lb_sampled.get("capped_at") else ""
        lines.append(f"largest batch: LoRA+WTA-CRS@0.1 {lb_sampled['largest_batch']}{capped} / LoRA "
                     f"{lb_lora['largest_batch']} = {ratio:.2f}x (target >= {BATCH_TARGET}x): {verdict} [{setting}]")
    else:
        lines.append("largest batch: not measured (needs CUDA; CPU has no memory limit to search against)")
    return lines


def frontier(memory: dict, model: str, precision: str = "fp32") -> list[str]:
    """Where each arm sits relative to LoRA+GC: less/more memory, faster/slower."""
    rows = [r for r in memory["rows"] if r["model"] == model and r["precision"] == precision and "step_s" in r]
    key, _ = _memory_key(rows)
    ref = next((r for r in rows if r["arm"] == "lora+gc"), None)
    if ref is None:
        return ["memory-throughput plane: no LoRA+GC row"]
    out = [f"memory-throughput plane vs LoRA+GC ({model} {precision}: {ref[key] / GIB:.3g} GiB, "
           f"{ref['sentences_per_s']:.2f} sent/s):"]
    for r in rows:
        if r is ref:
            continue
        mem = r[key] / ref[key]
        speed = r["sentences_per_s"] / ref["sentences_per_s"]
        if mem <= 1 and speed >= 1:
            where = "dominates LoRA+GC (less memory, faster)"
        elif mem >= 1 and speed <= 1:
            where = "dominated by LoRA+GC (more memory, slower)"
        elif mem > 1:
            where = "faster, more memory (a trade-off)"
        else:
            where = "less memory, slower (a trade-off)"
        out.append(f"  {r['arm']:<20} memory {mem:6.2f}x, throughput {speed:5.2f}x of LoRA+GC: {where}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    results = [json.loads(Path(p).read_text()) for p in argv]
    memory = next((r for r in results if r.get("study") == "memory_speed"), None)
    overhead = next((r for r in results if r.get("study") == "overhead"), None)
    if memory is None:
        print("need a memory_speed results file", file=sys.stderr)
        return 2
    from .memory_speed import table

    print(table(memory))
    print()
    model = memory["rows"][0]["model"]
    print("\n".join(targets(memory, overhead, model) + frontier(memory, model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
