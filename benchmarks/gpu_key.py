"""The GPU key results in one command, within a fixed time (6 minutes by default) on one H100/H200.

    python -m benchmarks.gpu_key                 # one GPU: results/bench_gpu_<device>.json, .png, frontier files
    python -m benchmarks.gpu_key --quick         # the same code on CPU at tiny shapes (CI smoke run, < 2 minutes)

Every arm runs in its own process (forked from a server that has torch and transformers imported) with a time
limit. Tasks run in order of importance and a task starts only if its estimated time (a prior, then what the last
task of its kind took) fits in what is left of ``--time-budget``; the rest are listed as skipped at the end.

1. The issue table (T5-Base, fp32, batch 100, seq 128): ten arms eager, then compiled (``+compile``): peak memory
   (``torch.cuda.max_memory_allocated``), sentences/s (median of timed steps after warm-up), and from one more
   step each host syncs (``torch.cuda.set_sync_debug_mode("warn")`` warnings; the profiler's synchronize calls
   and device-to-host copies) and kernels launched (profiler).
2. The frontier: T5-Base and T5-Large (fp32, batch 100), BERT-Base and LLaMA-1B shapes (bf16 autocast, batch
   sized to the card): peak memory against throughput of the stock tools (checkpointing ``+gc``, selective
   checkpointing ``+sac``, the compiler's memory budget ``+budget@B``, ``+compile``, ``+offload``) and of ours,
   one plot per model with the Pareto frontier drawn, and which arms are on it.
3. Largest batch within 24 GiB and 80 GiB (``torch.cuda.set_per_process_memory_fraction``) for LoRA, LoRA+GC,
   LoRA+SAC and our arms: predicted from each arm's peak at two batch sizes (peak = fixed + slope x batch), then
   searched from that prediction to within 5% where the time allows; unsearched entries say "predicted".
4. The targets of the issues, met or not, with the measured numbers (``benchmarks.report.gpu_targets``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import report
from .common import GIB, RESULTS_DIR, parse_arm, run_metadata, settings_dict, write_json
from .memory_speed import format_row, run_arm

#: The issue table's arms (T5-Base, fp32, batch 100), run eager and compiled.
TABLE_ARMS = (
    "lora", "lora+gc", "lora+wta@0.3", "lora+masks", "lora+wta@0.3+masks", "lora+wta@0.3+masks+attn",
    "lora+wta@0.1+masks+attn", "full", "full+gc", "full+wta@0.3+masks+attn",
)
#: The stock tools each model's frontier compares, beside LoRA itself.
STOCK_ARMS = ("lora+gc", "lora+sac", "lora+offload", "lora+compile", "lora+budget@0.5", "lora+budget@0.1")
#: Largest-batch arms: the stock ones and ours; BEST_OURS stands for the LoRA sampling arm with the fewest bytes
#: per sentence measured by then (skipped if it is already in the list).
LARGEST_ARMS = ("lora", "lora+gc", "lora+sac", "lora+wta@0.3+masks+attn")
BEST_OURS = "best-ours"
LIMITS_GIB = (24.0, 80.0)


@dataclass
class Task:
    kind: str  # "arm" (memory, speed) or "largest" (largest batch within limit_gib)
    model: str
    arm: str
    section: str  # "table", "frontier" or "largest"
    profile: bool = False
    limit_gib: float | None = None


@dataclass
class Plan:
    quick: bool
    seq_len: int
    steps: int
    warmup: int
    models: dict[str, dict]  # name -> {"precision", "batch", "second_batch"}
    table_model: str
    frontier_models: list[str]
    tasks: list[Task] = field(default_factory=list)


def card_batch(per_80_gib: int, total_gib: float) -> int:
    """A batch sized to the card: ``per_80_gib`` on an 80 GiB card, in proportion elsewhere, a multiple of 16."""
    return max(16, int(per_80_gib * total_gib / 80) // 16 * 16)


def make_plan(quick: bool, total_gib: float) -> Plan:
    """The tasks in order of importance; the time budget cuts the tail."""
    if quick:
        # T5 and BERT stand-ins at tiny shapes; BERT in bf16 autocast as on the GPU.
        plan = Plan(True, 32, 2, 1, {"t5-tiny": {"precision": "fp32", "batch": 4, "second_batch": 2},
                                      "bert-tiny": {"precision": "bf16", "batch": 4, "second_batch": 2}},
                    "t5-tiny", ["t5-tiny", "bert-tiny"])
        t5, bert = "t5-tiny", "bert-tiny"
        tasks = [Task("arm", t5, a, "table", profile=True) for a in ("lora", "lora+gc", "lora+wta@0.3+masks+attn")]
        tasks += [Task("arm", t5, a, "frontier") for a in ("lora+sac", "lora+offload")]
        tasks += [Task("arm", bert, a, "frontier") for a in ("lora", "lora+wta@0.3+masks+attn")]
        tasks += [Task("arm", t5, "lora+compile", "table", profile=True)]
        plan.tasks = tasks
        return plan
    models = {
        "t5-base": {"precision": "fp32", "batch": 100, "second_batch": 50},
        "t5-large": {"precision": "fp32", "batch": 100, "second_batch": 50},
        "bert-base": {"precision": "bf16", "batch": card_batch(512, total_gib)},
        "llama-1b": {"precision": "bf16", "batch": card_batch(128, total_gib)},
    }
    for spec in models.values():
        spec.setdefault("second_batch", spec["batch"] // 2)
    plan = Plan(False, 128, 3, 1, models, "t5-base", list(models))
    ours = "lora+wta@0.3+masks+attn"
    t = plan.tasks
    t += [Task("arm", "t5-base", a, "table", profile=True) for a in TABLE_ARMS]
    t += [Task("arm", "t5-base", a + "+compile", "table", profile=True) for a in ("lora", ours)]
    t += [Task("arm", "t5-base", a, "frontier") for a in ("lora+sac", "lora+offload")]
    t += [Task("arm", "t5-large", a, "frontier") for a in ("lora", "lora+gc", "lora+sac", ours)]
    t += _largest("t5-base", LIMITS_GIB[0])
    t += [Task("arm", "t5-large", "lora+wta@0.1+masks+attn", "frontier")]
    t += [Task("arm", "t5-base", "lora+budget@0.5", "frontier")]
    t += [Task("arm", "bert-base", a, "frontier") for a in ("lora", "lora+gc", "lora+sac", ours)]
    t += [Task("arm", "llama-1b", a, "frontier") for a in ("lora", "lora+gc", "lora+sac", ours)]
    t += _largest("t5-large", LIMITS_GIB[0])
    t += [Task("arm", "t5-base", a + "+compile", "table", profile=True) for a in TABLE_ARMS if a not in ("lora", ours)]
    t += [Task("arm", "t5-base", a, "frontier") for a in (
        ours + "+sac", ours + "+offload", ours + "+budget@0.5", "full+sac", "full+offload")]
    for model in ("t5-base", "t5-large", "bert-base", "llama-1b"):
        queued = {task.arm for task in t if task.model == model and task.kind == "arm"}
        t += [Task("arm", model, a, "frontier") for a in (*STOCK_ARMS, ours + "+compile") if a not in queued]
    for model in ("t5-base", "t5-large"):
        t += _largest(model, LIMITS_GIB[1])
    return plan


def _largest(model: str, limit_gib: float) -> list[Task]:
    return [Task("largest", model, a, "largest", limit_gib=limit_gib) for a in (*LARGEST_ARMS, BEST_OURS)]


#: Seconds a task takes before anything is measured (process start, build, warm-up, steps; compiling).
PRIOR_S = {
    "t5-base": (15, 75), "t5-large": (25, 150), "bert-base": (12, 45), "llama-1b": (25, 90),
    "t5-tiny": (6, 45), "bert-tiny": (6, 45),
}


def _kind(task: Task) -> tuple[str, str]:
    return task.model, "compiled" if parse_arm(task.arm).compile else "eager"


def estimate(task: Task, history: dict, rows: list[dict]) -> float:
    """Expected seconds for ``task``: the last same-kind task's time, else the prior; for a largest-batch search,
    a process start plus three probes at the predicted batch."""
    eager, compiled = PRIOR_S[task.model]
    if task.arm == BEST_OURS:
        return 0.0  # resolved (and estimated) when it comes up
    if task.kind == "arm":
        return history.get(_kind(task), compiled if parse_arm(task.arm).compile else eager)
    row = _measured(rows, task.model, task.arm)
    if not row:
        return float("inf")
    guess = predicted_batch(row, task.limit_gib * GIB) or row["batch_size"]
    return history.get((task.model, "eager"), eager) + 3 * guess / row["sentences_per_s"]


def _measured(rows: list[dict], model: str, arm: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["arm"] == arm and r.get("section") != "largest"
                 and r.get("step_s")), None)


def predicted_batch(row: dict, limit_bytes: float) -> int | None:
    """Largest batch with fixed + slope x batch <= limit, from the peaks at two batch sizes (None if unknown)."""
    slope, fixed = row.get("bytes_per_sentence"), row.get("fixed_bytes")
    if not slope or slope <= 0 or fixed is None:
        return None
    return max(0, int((limit_bytes - fixed) / slope))


def best_ours(rows: list[dict], model: str) -> str | None:
    """The eager LoRA sampling arm with the fewest bytes per sentence."""
    mine = [r for r in rows if r["model"] == model and r.get("bytes_per_sentence") and r.get("section") != "largest"
            and parse_arm(r["arm"]).sampled and parse_arm(r["arm"]).lora and not parse_arm(r["arm"]).compile]
    return min(mine, key=lambda r: r["bytes_per_sentence"])["arm"] if mine else None


def device_slug(name: str) -> str:
    """``cuda: NVIDIA H200`` -> ``nvidia-h200``; ``cpu: x86_64, 2 cores`` -> ``cpu``."""
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.split(":", 1)[-1].lower()).strip("-")


def run(args: argparse.Namespace) -> dict:
    cuda = args.device.startswith("cuda")
    total_gib = torch.cuda.get_device_properties(args.device).total_memory / GIB if cuda else 0.0
    plan = make_plan(args.quick, total_gib)
    start = time.perf_counter()
    deadline = start + args.time_budget
    rows: list[dict] = []
    history: dict = {}
    skipped: list[dict] = []
    queue = list(plan.tasks)
    while queue:
        task = queue.pop(0)
        if task.arm == BEST_OURS:
            best = best_ours(rows, task.model)
            if best is None or best in LARGEST_ARMS:
                continue
            queue.insert(0, Task(task.kind, task.model, best, task.section, limit_gib=task.limit_gib))
            continue
        if task.kind == "largest" and not cuda:
            skipped.append({**asdict(task), "reason": "needs CUDA (no memory limit to search against on CPU)"})
            continue
        left = deadline - time.perf_counter()
        need = estimate(task, history, rows)
        if need > left:
            why = "its arm was not measured" if need == float("inf") else f"needs ~{need:.0f} s, {left:.0f} s left"
            skipped.append({**asdict(task), "reason": why})
            print(f"skip {task.section} {task.model} {task.arm}: {why}", flush=True)
            continue
        model = plan.models[task.model]
        spec = {"model": task.model, "arm": task.arm, "precision": model["precision"], "device": args.device,
                "batch_size": model["batch"], "seq_len": plan.seq_len, "steps": plan.steps, "warmup": plan.warmup,
                "max_batch": args.max_batch, "section": task.section, "profile": task.profile,
                # Compiled arms would compile again for a second batch size; their slope is not needed.
                "second_batch": None if parse_arm(task.arm).compile else model["second_batch"],
                # On CUDA the peak is the measure; saved bytes cost a step more and are taken on CPU only.
                "saved_bytes": not cuda, "threads": args.threads}
        if parse_arm(task.arm).compile:
            spec["warmup"] = plan.warmup + 1  # the first call compiles; one more step runs the compiled code
        if task.kind == "largest":
            measured = _measured(rows, task.model, task.arm)
            spec.update(steps=0, saved_bytes=False, second_batch=None, profile=False, memory_limit_gib=task.limit_gib,
                        search_largest_batch=True, limit_gib=task.limit_gib,
                        largest_guess=predicted_batch(measured, task.limit_gib * GIB) if measured else None)
        began = time.perf_counter()
        # A task that overruns its estimate a lot is stopped, so that the ones after it still run.
        row = run_arm(spec, timeout=max(1.0, min(deadline - began, max(30.0, 2.5 * need))))
        history[(task.model, "largest" if task.kind == "largest" else _kind(task)[1])] = time.perf_counter() - began
        row["wall_s"] = time.perf_counter() - began
        rows.append(row)
        print(format_row(row), flush=True)
    result = {
        "study": "gpu_key",
        "meta": run_metadata(),
        "settings": {**settings_dict(args), "table_model": plan.table_model,
                     "table_batch": plan.models[plan.table_model]["batch"], "seq_len": plan.seq_len,
                     "steps": plan.steps, "warmup": plan.warmup, "frontier_models": plan.frontier_models,
                     "precisions": {m: s["precision"] for m, s in plan.models.items()},
                     "batches": {m: s["batch"] for m, s in plan.models.items()},
                     "card_gib": round(total_gib, 1) if cuda else None},
        "rows": rows,
        "skipped": skipped,
        "largest": largest_summary(rows, plan) if cuda else [],
        "wall_s": time.perf_counter() - start,
    }
    result["targets"] = report.gpu_targets(result)
    return result


def largest_summary(rows: list[dict], plan: Plan) -> list[dict]:
    """Per (model, limit): each arm's largest batch, searched where a search ran, else predicted."""
    out = []
    for model in ("t5-base", "t5-large"):
        if model not in plan.models:
            continue
        for limit in LIMITS_GIB:
            arms: dict[str, dict] = {}
            names = list(LARGEST_ARMS) + [a for a in [best_ours(rows, model)] if a and a not in LARGEST_ARMS]
            for arm in names:
                searched = next((r for r in rows if r["model"] == model and r["arm"] == arm
                                 and r.get("section") == "largest" and r.get("limit_gib") == limit
                                 and r.get("largest_batch") is not None), None)
                measured = _measured(rows, model, arm)
                entry = {"predicted": predicted_batch(measured, limit * GIB) if measured else None}
                if searched:
                    entry.update(searched=True, largest_batch=searched["largest_batch"],
                                 fails_at=searched.get("fails_at"), probes=searched.get("probes"),
                                 limit_bytes=searched.get("memory_limit_bytes"))
                else:
                    entry.update(searched=False, largest_batch=entry["predicted"])
                arms[arm] = entry
            out.append({"model": model, "limit_gib": limit, "arms": arms})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Output: tables, plots.


def table_markdown(result: dict) -> str:
    """The issue table, eager and compiled side by side, with syncs and kernels per step."""
    rows = [r for r in result["rows"] if r.get("section") == "table"]
    key = report.memory_key(rows) if rows else "saved_bytes"
    cuda = key == "peak_allocated_bytes"
    head = ("| arm | compiled | attention | peak GiB | sent/s | host syncs (sync debug / profiler) | D2H copies | "
            "kernels | launch calls | graph breaks |" if cuda else
            "| arm | compiled | attention | saved act. GiB | sent/s | sync-forcing aten ops | aten op events | "
            "graph breaks |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        arm = parse_arm(r["arm"])
        base = r["arm"].removesuffix("+compile")
        mem = f"{r[key] / GIB:.3g}" if r.get(key) else "–"
        speed = f"{r['sentences_per_s']:.1f}" if r.get("sentences_per_s") else f"error: {r.get('error', '')[:60]}"
        breaks = str(r.get("graph_breaks", "–")) if arm.compile else "–"
        if cuda:
            cells = [base, "yes" if arm.compile else "", r.get("attention", "–"), mem, speed,
                     f"{r.get('sync_warnings_per_step', '–')} / {r.get('host_syncs_per_step', '–')}",
                     str(r.get("d2h_copies_per_step", "–")), str(r.get("kernels_per_step", "–")),
                     str(r.get("launch_calls_per_step", "–")), breaks]
        else:
            cells = [base, "yes" if arm.compile else "", r.get("attention", "–"), mem, speed,
                     str(r.get("sync_ops_per_step", "–")), str(r.get("aten_ops_per_step", "–")), breaks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def largest_markdown(result: dict) -> str:
    lines = ["| model | limit GiB | arm | largest batch | how | x LoRA |", "|---|---|---|---|---|---|"]
    for item in result.get("largest", []):
        lora = item["arms"].get("lora", {}).get("largest_batch")
        for arm, e in item["arms"].items():
            if e.get("largest_batch") is None:
                lines.append(f"| {item['model']} | {item['limit_gib']:g} | {arm} | – | not measured | – |")
                continue
            how = (f"searched ({e['probes']} probes; fails at {e['fails_at']})" if e.get("searched")
                   else "predicted (peak at two batch sizes)")
            ratio = f"{e['largest_batch'] / lora:.2f}x" if lora else "–"
            lines.append(f"| {item['model']} | {item['limit_gib']:g} | {arm} | {e['largest_batch']} | {how} | {ratio} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """Everything the run found, as Markdown: setting, issue table, frontier tables, largest batch, targets."""
    s, meta = result["settings"], result["meta"]
    out = [f"# GPU key results: {meta['device']}", "",
           f"{meta['date_utc']}, `{meta['command']}`, commit {meta['git_commit']}, torch {meta['versions']['torch']}, "
           f"transformers {meta['versions']['transformers']}, peft {meta['versions']['peft']}; wall time "
           f"{result['wall_s']:.0f} s of a {s['time_budget']:.0f} s budget. Seq {s['seq_len']}, {s['steps']} timed "
           f"steps (median) after warm-up; each arm in its own process. Batches: "
           + ", ".join(f"{m} {b} ({s['precisions'][m]})" for m, b in s["batches"].items()) + ".", "",
           f"## Issue table ({s['table_model']}, batch {s['table_batch']})", "", table_markdown(result), ""]
    for model in s["frontier_models"]:
        precision = s["precisions"][model]
        if not report.plane(result["rows"], model, precision):
            continue
        out += [f"## Frontier: {model} ({precision}, batch {s['batches'][model]})", "",
                report.frontier_table(result["rows"], model, precision), ""]
    if result.get("largest"):
        out += ["## Largest batch", "", largest_markdown(result), ""]
    out += ["## Targets", "", *[f"- {line}" for line in result["targets"]], ""]
    errors = [r for r in result["rows"] if r.get("error")]
    if errors:
        out += ["## Errors", "", *[f"- {r['model']} {r['arm']} ({r['section']}): {r['error']}" for r in errors], ""]
    if result["skipped"]:
        out += ["## Skipped (time budget)", "",
                *[f"- {t['section']} {t['model']} {t['arm']}" + (f" at {t['limit_gib']:g} GiB" if t["limit_gib"] else "")
                  + f": {t['reason']}" for t in result["skipped"]], ""]
    return "\n".join(out)


def _style(arm: str) -> tuple[str, str]:
    a = parse_arm(arm)
    colour = "tab:red" if a.sampled else ("tab:blue" if a.lora else "tab:grey")
    return colour, "^" if a.compile else "o"


def plot_table(result: dict, path: Path) -> Path | None:
    """Issue table: memory-throughput plane (eager circles, compiled triangles) and kernels (or aten ops) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("section") == "table" and r.get("sentences_per_s")]
    if not rows:
        return None
    key = report.memory_key(rows)
    count_key = "kernels_per_step" if key == "peak_allocated_bytes" else "aten_ops_per_step"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        colour, marker = _style(r["arm"])
        ax.scatter(r[key] / GIB, r["sentences_per_s"], color=colour, marker=marker)
        ax.annotate(r["arm"], (r[key] / GIB, r["sentences_per_s"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("peak allocated GiB" if key == "peak_allocated_bytes" else "saved activations GiB")
    ax.set_ylabel("sentences / s")
    ax.set_title("memory-throughput (circles eager, triangles compiled; red: sampling)", fontsize=8)
    ax.grid(alpha=0.3)
    counted = [r for r in rows if r.get(count_key) is not None]
    bx.barh([r["arm"] for r in counted], [r[count_key] for r in counted],
            color=[_style(r["arm"])[0] for r in counted])
    bx.set_xlabel("kernels per step (profiler)" if count_key == "kernels_per_step" else "aten op events per step")
    bx.tick_params(axis="y", labelsize=6)
    bx.grid(alpha=0.3, axis="x")
    s = result["settings"]
    fig.suptitle(f"{s['table_model']}, batch {s['table_batch']}, seq {s['seq_len']}, "
                 f"{s['precisions'][s['table_model']]} ({result['meta']['device']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(result: dict, model: str, path: Path) -> Path | None:
    """One model's memory-throughput plane with the Pareto frontier drawn as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precision = result["settings"]["precisions"][model]
    rows = report.plane(result["rows"], model, precision)
    if not rows:
        return None
    summary = report.frontier_summary(result["rows"], model, precision)
    key = summary["memory_key"]
    by_arm = {r["arm"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for r in rows:
        colour, marker = _style(r["arm"])
        on = r["arm"] in summary["front"]
        ax.scatter(r[key] / GIB, r["sentences_per_s"], color=colour, marker=marker,
                   edgecolor="black" if on else colour, s=50 if on else 25, zorder=3)
        ax.annotate(r["arm"], (r[key] / GIB, r["sentences_per_s"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    xs, ys = [], []
    for arm in summary["front"]:  # staircase: best throughput available at each memory
        x, y = by_arm[arm][key] / GIB, by_arm[arm]["sentences_per_s"]
        if ys:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    ax.plot(xs, ys, color="black", lw=1, alpha=0.6, label="Pareto frontier")
    ax.set_xlabel("peak allocated GiB" if key == "peak_allocated_bytes" else "saved activations GiB (CPU)")
    ax.set_ylabel("sentences / s")
    ax.set_title(f"{model}, {precision}, batch {result['settings']['batches'][model]}, seq "
                 f"{result['settings']['seq_len']} ({result['meta']['device']})\n"
                 "red: sampling (ours), blue: LoRA, grey: full; triangles compiled; up-left is better", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few arms: a smoke run on any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the tasks (default 345, 6 minutes in all with start and plots; --quick: 100)")
    parser.add_argument("--max-batch", type=int, default=16384, help="largest batch a search may try")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per arm (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.time_budget is None:
        args.time_budget = 100.0 if args.quick else 345.0
    if args.time_budget <= 0:
        parser.error(f"--time-budget must be > 0 seconds; got {args.time_budget}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--quick runs on CPU)")
    result = run(args)
    slug = device_slug(result["meta"]["device"]) + ("_quick" if args.quick else "")
    out = write_json(args.out_dir / f"bench_gpu_{slug}.json", result)
    plot_table(result, out.with_suffix(".png"))
    for model in result["settings"]["frontier_models"]:
        plot_frontier(result, model, args.out_dir / f"bench_frontier_{slug}_{model}.png")
    md = args.out_dir / f"bench_frontier_{slug}.md"
    md.write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"wrote {out}, {md} and plots; {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
