"""Targets check, Pareto frontiers and Markdown tables from results files.

    python -m benchmarks.report results/bench_memory_cpu.json results/bench_overhead_cpu.json
    python -m benchmarks.report results/bench_gpu_<device>.json

Study 1's targets (LoRA+WTA-CRS against LoRA on T5-Base at batch 100): peak memory >= 2.7x lower at @0.3, step
time <= 5% above LoRA's at equal batch, largest batch >= 6.4x LoRA's (@0.1, the paper's best case), and where every
arm sits on the memory-throughput plane relative to LoRA+GC (``targets``, ``frontier``).

The GPU script's targets (``gpu_targets``): LoRA+WTA-CRS@0.3 with masks and sampled attention at <= 1.15x LoRA's
step time eager and <= 1.05x compiled against compiled LoRA; an arm with peak <= 2x LoRA+GC's at >= 1.3x its
throughput; an arm of ours (sampling) on the Pareto frontier of peak memory against throughput that beats every arm
without sampling for some range of memory limits; LoRA+WTA-CRS@0.3's largest batch >= 6.4x LoRA's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import GIB, parse_arm

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


# ---------------------------------------------------------------------------------------------------------------
# The memory-throughput plane of the GPU script: Pareto frontier and the ranges where sampling wins.

EAGER_STEP_TARGET = 1.15
COMPILED_STEP_TARGET = 1.05
GC_MEMORY_TARGET, GC_SPEED_TARGET = 2.0, 1.3
#: The arm the step-time targets are about (issue table's best LoRA arm) and its reference.
STEP_ARM = "lora+wta@0.3+masks+attn"


def memory_key(rows: list[dict]) -> str:
    """Peak allocated memory where measured (CUDA), else the saved-activation bytes (CPU)."""
    return _memory_key(rows)[0]


def plane(rows: list[dict], model: str, precision: str | None = None) -> list[dict]:
    """The rows of one model (and precision) that have both a memory figure and a throughput."""
    rows = [r for r in rows if r["model"] == model and (precision is None or r["precision"] == precision)]
    key = memory_key(rows) if rows else "saved_bytes"
    return [r for r in rows if r.get(key) and r.get("sentences_per_s")]


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points (name, memory, throughput) no other point dominates (less or equal memory and more or
    equal throughput, one of them strictly), by increasing memory."""
    front = []
    for name, mem, speed in points:
        dominated = any(
            (m <= mem and s >= speed) and (m < mem or s > speed) for n, m, s in points if n != name
        )
        if not dominated:
            front.append((mem, name))
    return [name for _, name in sorted(front)]


def winning_range(points: list[tuple[str, float, float]], name: str, rivals: set[str]) -> tuple[float, float] | None:
    """Memory limits [lo, hi) under which ``name`` is faster than every rival that fits: from its own memory up to
    the memory of the first rival at least as fast (hi = inf if none). None if a rival with no more memory is at
    least as fast."""
    _, mem, speed = next(p for p in points if p[0] == name)
    faster = [m for n, m, s in points if n in rivals and s >= speed]
    hi = min(faster, default=float("inf"))
    return (mem, hi) if hi > mem else None


def frontier_summary(rows: list[dict], model: str, precision: str) -> dict:
    """Frontier of one model: arms on it, and for each arm of ours (sampling) the memory range where it beats every
    arm without sampling."""
    pts_rows = plane(rows, model, precision)
    key = memory_key(pts_rows) if pts_rows else "saved_bytes"
    points = [(r["arm"], r[key], r["sentences_per_s"]) for r in pts_rows]
    front = pareto_front(points)
    rivals = {r["arm"] for r in pts_rows if not parse_arm(r["arm"]).sampled}
    ranges = {}
    for r in pts_rows:
        if parse_arm(r["arm"]).sampled:
            ranges[r["arm"]] = winning_range(points, r["arm"], rivals)
    return {"model": model, "precision": precision, "memory_key": key, "front": front, "winning_ranges": ranges,
            "arms": [r["arm"] for r in pts_rows]}


def _gib(nbytes: float) -> str:
    return "∞" if nbytes == float("inf") else f"{nbytes / GIB:.3g}"


def frontier_table(rows: list[dict], model: str, precision: str) -> str:
    """Markdown: every arm of one model with memory, throughput, compiled or not, attention, on the frontier or
    not, and (sampling arms) the memory limits under which it beats every arm without sampling."""
    summary = frontier_summary(rows, model, precision)
    key = summary["memory_key"]
    label = "peak GiB" if key == "peak_allocated_bytes" else "saved act. GiB"
    lines = [f"| arm | {label} | sent/s | attention | on frontier | beats every no-sampling arm for limits (GiB) |",
             "|---|---|---|---|---|---|"]
    by_arm = {r["arm"]: r for r in plane(rows, model, precision)}
    for arm in sorted(by_arm, key=lambda a: by_arm[a][key]):
        r = by_arm[arm]
        wins = "–"
        if arm in summary["winning_ranges"]:
            rng = summary["winning_ranges"][arm]
            wins = f"[{_gib(rng[0])}, {_gib(rng[1])})" if rng else "none"
        lines.append(f"| {arm} | {r[key] / GIB:.3g} | {r['sentences_per_s']:.1f} | {r.get('attention', '–')} | "
                     f"{'yes' if arm in summary['front'] else ''} | {wins} |")
    return "\n".join(lines)


def _row(rows: list[dict], model: str, arm: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["arm"] == arm and r.get("step_s")), None)


def gpu_targets(result: dict) -> list[str]:
    """The issue targets, each a line: measured numbers and met / NOT met / not measured."""
    rows, setting = result["rows"], result["settings"]
    table_model = setting["table_model"]
    where = f"[{table_model}, batch {setting['table_batch']}, {result['meta']['device']}]"
    key = memory_key([r for r in rows if r["model"] == table_model])
    lines = []

    def ratio_line(label: str, arm: str, ref: str, target: float) -> None:
        a, b = _row(rows, table_model, arm), _row(rows, table_model, ref)
        if a and b:
            ratio = a["step_s"] / b["step_s"]
            lines.append(f"{label}: {arm} {a['step_s']:.3f} s / {ref} {b['step_s']:.3f} s = {ratio:.2f}x "
                         f"(target <= {target}x): {'met' if ratio <= target else 'NOT met'} {where}")
        else:
            lines.append(f"{label}: not measured ({arm} or {ref} missing) {where}")

    ratio_line("step time, eager", STEP_ARM, "lora", EAGER_STEP_TARGET)
    ratio_line("step time, compiled", STEP_ARM + "+compile", "lora+compile", COMPILED_STEP_TARGET)

    gc = _row(rows, table_model, "lora+gc")
    if gc and gc.get(key):
        meeting = [
            r for r in plane(rows, table_model)
            if r[key] <= GC_MEMORY_TARGET * gc[key] and r["sentences_per_s"] >= GC_SPEED_TARGET * gc["sentences_per_s"]
        ]
        found = ", ".join(
            f"{r['arm']} ({r[key] / gc[key]:.2f}x memory, {r['sentences_per_s'] / gc['sentences_per_s']:.2f}x "
            f"throughput{', ours' if parse_arm(r['arm']).sampled else ''})" for r in meeting
        )
        lines.append(f"memory <= {GC_MEMORY_TARGET}x LoRA+GC's ({gc[key] / GIB:.3g} GiB) at >= {GC_SPEED_TARGET}x "
                     f"its throughput ({gc['sentences_per_s']:.1f} sent/s): "
                     f"{'met by ' + found if meeting else 'NOT met by any arm'} {where}")
    else:
        lines.append(f"memory vs LoRA+GC: not measured (no lora+gc row) {where}")

    for model in setting["frontier_models"]:
        precision = setting["precisions"][model]
        summary = frontier_summary(rows, model, precision)
        if not summary["arms"]:
            lines.append(f"frontier {model}: not measured")
            continue
        winners = [(arm, rng) for arm, rng in summary["winning_ranges"].items() if rng and arm in summary["front"]]
        if winners:
            text = "; ".join(f"{arm} for limits [{_gib(lo)}, {_gib(hi)}) GiB" for arm, (lo, hi) in winners)
            lines.append(f"frontier {model} {precision}: met: on the frontier and faster than every arm without "
                         f"sampling: {text} ({len(summary['arms'])} arms)")
        else:
            lines.append(f"frontier {model} {precision}: NOT met: no sampling arm is on the frontier and faster than "
                         f"every no-sampling arm that fits ({len(summary['arms'])} arms; frontier: "
                         f"{', '.join(summary['front'])})")

    for item in result.get("largest", []):
        lines.extend(largest_batch_lines(item))
    if not result.get("largest"):
        lines.append("largest batch: not measured (needs CUDA)")
    return lines


def largest_batch_lines(item: dict) -> list[str]:
    """The 6.4x target for one (model, memory limit): LoRA+WTA-CRS@0.3 arms against LoRA, searched or predicted."""
    arms = item["arms"]
    lora = arms.get("lora")
    out = []
    for arm, entry in arms.items():
        if not arm.startswith("lora+wta@0.3"):
            continue
        if not lora or not lora.get("largest_batch") or not entry.get("largest_batch"):
            out.append(f"largest batch {item['model']} at {item['limit_gib']} GiB: {arm} vs lora not measured")
            continue
        ratio = entry["largest_batch"] / lora["largest_batch"]
        how = "searched" if entry.get("searched") and lora.get("searched") else "predicted from two batch sizes"
        out.append(f"largest batch {item['model']} at {item['limit_gib']} GiB: {arm} {entry['largest_batch']} / lora "
                   f"{lora['largest_batch']} = {ratio:.2f}x (target >= {BATCH_TARGET}x): "
                   f"{'met' if ratio >= BATCH_TARGET else 'NOT met'} ({how})")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    results = [json.loads(Path(p).read_text()) for p in argv]
    gpu = next((r for r in results if r.get("study") == "gpu_key"), None)
    if gpu is not None:
        from .gpu_key import markdown

        print(markdown(gpu))
        return 0
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
    for model, precision in dict.fromkeys((r["model"], r["precision"]) for r in memory["rows"]):
        if any(r.get("sentences_per_s") for r in plane(memory["rows"], model, precision)):
            print(f"\nfrontier {model} {precision}:\n" + frontier_table(memory["rows"], model, precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
