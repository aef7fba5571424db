"""Reproduce the paper's GLUE protocol at MiniLM-L6 scale: four methods x the shared GLUE tasks x 3 seeds.

    python scripts/reproduce_glue.py                # one GPU: sized for about 8 minutes on an H100
    python scripts/reproduce_glue.py --quick        # any CPU: a few minutes, a smoke test of the whole path

Protocol (method.md section 5, scaled down): all-MiniLM-L6-v2, max length 128, batch 32, fp32, 3 epochs with
the best epoch chosen on the eval split, seeds 0 1 2; LoRA r=32, alpha=32, dropout 0.1 on query/key/value;
WTA-CRS at budget 0.3. Tasks are the GLUE data in ../shared/data (CoLA, SST-2, MRPC, RTE, STS-B; the pair tasks
are re-splits of GLUE train, so scores compare across our arms, not with published GLUE dev numbers). Train
sets are capped at 3,000 examples and eval sets at 1,000 to fit the time.

Writes ``results/glue[-quick].json`` (one results file, every task and method) and prints the comparison
table; ``--plot`` also writes its PNG.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from wtacrs.app import report
from wtacrs.app.finetune import METHODS, RunConfig, finetune, write_results

ROOT = Path(__file__).resolve().parents[1]
#: task -> folder under the shared data root
TASK_FOLDERS = {"cola": "senteval", "sst2": "senteval", "mrpc": "glue-pairs", "rte": "glue-pairs", "stsb": "glue-pairs"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: for CPU")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tasks", nargs="+", default=list(TASK_FOLDERS), choices=list(TASK_FOLDERS))
    parser.add_argument("--out", help="results file (default results/glue.json, or results/glue-quick.json)")
    parser.add_argument("--plot", action="store_true", help="also write the PNG beside the results file")
    args = parser.parse_args(argv)

    quick = args.quick
    seeds = [0] if quick else [0, 1, 2]
    config = RunConfig(
        model="minilm", epochs=1 if quick else 3, batch_size=32, max_length=64 if quick else 128, lr=None,
        budget=0.3, probs="activation", gc=False, bf16=False, lora_r=32, lora_alpha=32, weight_decay=0.01,
        warmup=0.06, max_train=96 if quick else 3000, max_eval=96 if quick else 1000, device="auto",
    )
    out = Path(args.out or ROOT / "results" / ("glue-quick.json" if quick else "glue.json"))
    command = shlex.join(["python", "scripts/reproduce_glue.py"] + sys.argv[1:])
    started = time.perf_counter()
    merged = None
    for task in args.tasks:
        results = finetune([task], list(METHODS), seeds, config, data_dir=str(Path(args.data_root) / TASK_FOLDERS[task]),
                           quiet=not sys.stderr.isatty(), command=command)
        if merged is None:
            merged = results
        else:
            merged["experiments"] += results["experiments"]
            merged["data"].update(results["data"])
        merged["wall_time_s"] = time.perf_counter() - started
        write_results(merged, out)  # after every task, so a cut-off run keeps what it finished
    experiments = report.load_experiments([str(out)])
    print(report.table(experiments))
    if args.plot:
        report.plot(experiments, out.with_suffix(".png"))
    print(f"results: {out} ({merged['wall_time_s']:.0f} s on {merged['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
