"""Smoke runs of the benchmark studies at their smallest sizes: each writes a results file, a plot and sane numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The benchmarks are scripts beside the package, not part of it.
sys.path.insert(0, str(REPO))

from benchmarks import common, memory_speed, overhead, report, variance  # noqa: E402


def _check_meta(meta: dict) -> None:
    assert meta["device"].startswith(("cpu", "cuda"))
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert meta["date_utc"].endswith("Z") and meta["command"].startswith("python -m ")


def test_parse_arm_table():
    assert common.parse_arm("lora+wta@0.1+gc") == common.Arm("lora+wta@0.1+gc", lora=True, budget=0.1,
                                                              checkpointing=True)
    assert common.parse_arm("full+offload").offload
    for bad in ("adapter", "lora+wta@x", "full+fast"):
        with pytest.raises(ValueError, match="arm"):
            common.parse_arm(bad)


def test_memory_speed_smoke(tmp_path):
    out = tmp_path / "mem.json"
    argv = ["--models", "t5-tiny", "--arms", "lora", "lora+wta@0.3", "--batch-size", "2", "--seq-len", "32",
            "--steps", "1", "--warmup", "0", "--out", str(out)]
    assert memory_speed.main(argv) == 0
    result = json.loads(out.read_text())
    _check_meta(result["meta"])
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"lora", "lora+wta@0.3"} and not any("error" in r for r in rows.values())
    # Each arm ran in its own process and trained the same number of parameters.
    assert rows["lora"]["trainable_params"] == rows["lora+wta@0.3"]["trainable_params"] > 0
    # Sampling the LoRA A inputs stores fewer bytes than keeping them whole.
    assert rows["lora+wta@0.3"]["saved_bytes"] < rows["lora"]["saved_bytes"]
    assert rows["lora"]["sentences_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    lines = report.targets(result, model="t5-tiny")
    assert lines[0].startswith("memory: LoRA / LoRA+WTA-CRS@0.3 saved-activation bytes")
    assert "not measured" in lines[2]  # no largest batch on CPU


def test_overhead_smoke(tmp_path):
    out = tmp_path / "ov.json"
    argv = ["--shapes", "tiny", "--rows", "128", "--reps", "2", "--warmup", "0", "--e2e-model", "t5-tiny",
            "--pairs", "lora:lora+wta@0.3", "--e2e-batch", "2", "--e2e-steps", "1", "--seq-len", "16",
            "--out", str(out)]
    assert overhead.main(argv) == 0
    result = json.loads(out.read_text())
    _check_meta(result["meta"])
    assert [r["budget"] for r in result["layers"]] == [None, 0.3, 0.1]
    assert all(r["median_s"] > 0 and r["ratio"] > 0 for r in result["layers"])
    assert result["e2e"][0]["arm"] == "lora+wta@0.3" and result["e2e"][0]["ratio"] > 0
    assert "sampled_linear fwd+bwd" in overhead.table(result)
    assert out.with_suffix(".png").stat().st_size > 0


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit):
        memory_speed.main(["--arms", "lora+wta@abc", "--out", "unused.json"])
    with pytest.raises(SystemExit):
        variance.main(["--mc-trials", "1"])
