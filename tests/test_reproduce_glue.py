"""scripts/reproduce_glue.py without training: the commands it builds, the plan order under --jobs, resuming, and
the paired gap in its summary (the finetune processes are replaced by a stub that writes their results file)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("reproduce_glue", REPO / "scripts" / "reproduce_glue.py")
glue = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = glue  # dataclasses look their module up
_spec.loader.exec_module(glue)


def test_every_arm_of_a_task_has_the_same_caps_and_lora_arms_their_lr():
    size = glue.SIZES[("minilm", "cpu")]
    commands = {arm: glue.finetune_command("minilm", "rte", arm, size, Path("data"), Path("out.json"), "cpu")
                for arm in glue.ARMS}
    caps = {arm: [argv[argv.index(o) + 1] for o in ("--max-train", "--max-eval", "--epochs", "--batch-size",
                                                     "--max-length", "--budget")] for arm, argv in commands.items()}
    assert len({tuple(c) for c in caps.values()}) == 1
    assert caps["lora"][4] == str(size.max_length_pairs)  # RTE is a sentence-pair task
    for arm, argv in commands.items():
        lr = argv[argv.index("--lr") + 1] if "--lr" in argv else None
        assert lr == (str(size.lora_lr) if arm.startswith("lora") else None), arm


def _fake_finetune(calls: list, scores: dict):
    """A stand-in for ``subprocess.run`` of a finetune command: writes its results file after a delay that makes
    later runs finish first."""
    lock = threading.Lock()
    real_run = glue.subprocess.run

    def run(argv, **kwargs):
        if "finetune" not in argv:  # platform.processor() runs uname
            return real_run(argv, **kwargs)
        task, arm = argv[argv.index("--task") + 1], argv[argv.index("--out") + 1].split("/")[-1][:-5]
        with lock:
            calls.append((task, arm))
            order = len(calls)
        time.sleep(0.05 / order)
        runs = [{"seed": s, "metrics": {"score": scores[(task, arm)][s]}, "train_time_s": 1.0,
                 "saved_activation_bytes": 2**20} for s in glue.SEEDS]
        doc = {"model": "m", "config": {}, "data": {}, "command": " ".join(argv), "device": "cpu", "date": "d",
               "load_average_1min": 0.0,
               "experiments": [{"task_title": task.upper(), "score_kind": "accuracy", "method": arm, "runs": runs}]}
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(doc))

        class Done:
            returncode = 0
            stderr = ""
        return Done()

    return run


def test_parallel_runs_keep_the_plan_order_resume_and_pair_the_gap_by_seed(tmp_path, monkeypatch):
    tasks, arms = ["sst2", "rte"], ["lora", "lora-wtacrs", "full", "full-wtacrs"]
    shared, own = {0: 0.0, 1: 5.0, 2: 1.0}, {0: 1.0, 1: 0.0, 2: 2.0}  # per seed: common to all arms / per arm
    scores = {(t, a): {s: 50 + 10 * i + shared[s] + j * own[s] for s in glue.SEEDS}
              for i, t in enumerate(tasks) for j, a in enumerate(arms)}
    calls: list = []
    monkeypatch.setattr(glue.subprocess, "run", _fake_finetune(calls, scores))
    argv = ["--models", "minilm", "--tasks", *tasks, "--arms", *arms, "--jobs", "3", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "glue.json")]
    assert glue.main(argv) == 0
    assert sorted(calls) == sorted((t, a) for t in tasks for a in arms)
    doc = json.loads((tmp_path / "glue.json").read_text())
    assert [(e["task"], e["arm"]) for e in doc["experiments"]] == [(t, a) for t in tasks for a in arms]
    rows = {r["arm"]: r for r in doc["summary"]["minilm"]["rows"]}
    for arm, base in [("lora-wtacrs", "lora"), ("full", "lora"), ("full-wtacrs", "lora"), ("full-wtacrs", "full")]:
        for t in tasks:
            diffs = [scores[(t, arm)][s] - scores[(t, base)][s] for s in glue.SEEDS]
            gap = rows[arm][f"gap_to_{base}"][t]
            assert gap["mean"] == pytest.approx(statistics.fmean(diffs))
            assert gap["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)))
    assert [a for a, r in rows.items() if "gap_to_full" in r] == ["full-wtacrs"]
    assert "| LoRA |" in (tmp_path / "glue.md").read_text()
    # Run again: every results file is there with the same settings, so nothing is trained twice.
    assert glue.main(argv) == 0
    assert len(calls) == len(tasks) * len(arms)


def test_jobs_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        glue.main(["--jobs", "0"])
    assert "--jobs must be at least 1; got 0" in capsys.readouterr().err
