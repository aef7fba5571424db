"""Smoke runs of the benchmark studies at their smallest sizes: each writes a results file, a plot and sane numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The benchmarks are scripts beside the package, not part of it.
sys.path.insert(0, str(REPO))

from benchmarks import common, gpu_key, gradient_noise, memory_speed, overhead, report, variance  # noqa: E402


def _check_meta(meta: dict) -> None:
    assert meta["device"].startswith(("cpu", "cuda"))
    assert meta["versions"]["torch"] and meta["versions"]["transformers"]
    assert meta["date_utc"].endswith("Z") and meta["command"].startswith("python -m ")


ARM_TABLE = [
    ("lora+wta@0.1+gc", dict(lora=True, budget=0.1, checkpointing=True)),
    ("full+offload", dict(offload=True)),
    ("lora+sac", dict(lora=True, selective=True)),
    ("lora+compile", dict(lora=True, compile=True)),
    ("lora+budget@0.5", dict(lora=True, compile=True, memory_budget=0.5)),
    ("lora+budget@0", dict(lora=True, compile=True, memory_budget=0.0)),
    ("lora+wta@0.3+masks+attn+sac", dict(lora=True, budget=0.3, compact_masks=True, attention=True, selective=True)),
    ("full+wta@0.3+masks+attn+budget@0.2", dict(budget=0.3, compact_masks=True, attention=True, compile=True,
                                                memory_budget=0.2)),
    ("lora+masks+offload+compile", dict(lora=True, compact_masks=True, offload=True, compile=True)),
]


@pytest.mark.parametrize("name, fields", ARM_TABLE)
def test_parse_arm_table(name, fields):
    assert common.parse_arm(name) == common.Arm(name, **fields)


@pytest.mark.parametrize("name, message", [
    ("adapter", "starts with 'full' or 'lora'"),
    ("lora+wta@x", r"'wta@B' needs a number B in \(0, 1\]; got 'x'"),
    ("lora+wta@0", r"'wta@B' needs a number B in \(0, 1\]; got '0'"),
    ("lora+budget@1.5", r"'budget@B' needs a number B in \[0, 1\]; got '1.5'"),
    ("full+fast", "unknown part 'fast'"),
    ("lora+attn", "needs 'wta@B' too"),
    ("lora+gc+sac", "'gc' and 'sac' both checkpoint"),
    ("lora+compile+budget@0.5", "compiles the model already"),
    ("lora+gc+gc", "'gc' given twice"),
])
def test_parse_arm_refuses(name, message):
    with pytest.raises(ValueError, match=message):
        common.parse_arm(name)


def test_sac_policy_keeps_matmuls_and_recomputes_the_rest():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert common.sac_policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    for op in (aten.relu.default, aten.native_dropout.default, aten.add.Tensor, aten._softmax.default,
               aten.native_layer_norm.default, aten.gelu.default):
        assert common.sac_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op


# ---------------------------------------------------------------------------------------------------------------
# Every arm builds and trains; arms that compute the same function as the stock arm give its loss and gradients.

TINY = "bert-tiny"  # one tiny model for the in-process arm tests (encoder only: the cheapest to compile)
#: Exact arms change what is stored, not what is computed. In float64 two orders of the same sums differ by a few
#: units of 2^-52 of the values summed, while a real difference (another dropout mask, a lost gradient term, a
#: sampled row) moves the loss by more than 1e-6: the tolerance, sqrt(float64 eps) ~ 1.5e-8 of the largest value,
#: is far from both. Gradients are compared at the scale of the largest gradient entry: one that is zero in exact
#: arithmetic (the key bias: softmax ignores a shift shared by all keys) holds rounding noise only.
EXACT_RTOL = math.sqrt(torch.finfo(torch.float64).eps)


def _one_step(arm: str, dropout: float | None = None, dtype: torch.dtype = torch.float64):
    """Loss and gradients of one forward/backward of ``arm`` on the tiny model, same weights and data for every
    arm, the dropout draws seeded alike."""
    trainer = memory_speed.Trainer(TINY, arm, "fp32", "cpu", dropout=dropout)
    trainer.prepared.module.to(dtype)
    batch = common.make_batch(TINY, 2, 16, "cpu")
    torch.manual_seed(1)
    loss = trainer.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.prepared.module.named_parameters() if p.grad is not None}
    return trainer, loss.detach(), grads


def _assert_same(arm: str, stock: str, dropout: float | None = None) -> memory_speed.Trainer:
    """``arm`` gives ``stock``'s loss and gradients; returns its trainer (its model has run once)."""
    _, ref_loss, ref_grads = _one_step(stock, dropout)
    trainer, loss, grads = _one_step(arm, dropout)
    assert abs(float(loss - ref_loss)) <= EXACT_RTOL * abs(float(ref_loss)), (arm, float(loss), float(ref_loss))
    assert grads.keys() == ref_grads.keys() and grads
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        err = float((grads[name] - ref).abs().max())
        assert err <= EXACT_RTOL * scale, (arm, name, err, scale)
    return trainer


@pytest.mark.parametrize("arm, stock", [("lora+sac", "lora"), ("full+sac", "full"), ("lora+offload", "lora")])
def test_exact_eager_arms_give_the_stock_loss_and_gradients(arm, stock):
    # With dropout (0.1, the paper's): selective checkpointing recomputes the dropout masks from the forward's
    # random state, and offloading moves tensors without changing them.
    _assert_same(arm, stock)


def test_selective_checkpointing_keeps_less_than_stock_more_than_full_checkpointing():
    batch = common.make_batch(TINY, 2, 16, "cpu")
    saved = {arm: memory_speed.Trainer(TINY, arm, "fp32", "cpu").saved_bytes(batch)
             for arm in ("lora", "lora+gc", "lora+sac")}
    # gc keeps each block's input; sac keeps those and its matmul outputs (in the checkpoints' caches, counted
    # beside autograd's saved tensors); stock keeps every activation.
    assert saved["lora+gc"] < saved["lora+sac"] < saved["lora"], saved


def test_offload_moves_every_saved_tensor_off_autograd():
    from wtacrs.memory import SavedTensors

    trainer = memory_speed.Trainer(TINY, "lora+offload", "fp32", "cpu")
    batch = common.make_batch(TINY, 2, 16, "cpu")
    with SavedTensors(exclude=trainer.prepared.module.parameters()) as outer:
        trainer.loss(batch).backward()
    assert outer.nbytes == 0  # save_on_cpu's hooks are innermost: every save went through them
    assert trainer.saved_bytes(batch) > 0  # what it moves is counted without its hooks


@pytest.mark.parametrize("arm", ["lora+wta@0.3+masks+attn+sac", "lora+wta@0.3+masks+offload",
                                 "full+wta@0.3+masks+attn+gc", "lora+masks+sac"])
def test_combined_eager_arms_train(arm):
    trainer = memory_speed.Trainer(TINY, arm, "fp32", "cpu")
    batch = common.make_batch(TINY, 2, 16, "cpu")
    assert trainer.saved_bytes(batch) > 0
    assert torch.isfinite(trainer.step(batch))
    assert trainer.prepared.attention == ("eager" if "+attn" in arm else "sdpa")  # the attention it ran


def test_attention_sampling_switches_an_sdpa_model_to_eager():
    # LLaMA reads its attention implementation at run time in every supported transformers version (BERT only
    # from transformers 5), so apply_wtacrs can switch it after loading.
    import wtacrs

    model = common.build_model("llama-tiny")
    assert common.attention_implementation(model) == "sdpa"
    wtacrs.apply_wtacrs(model, sample_attention=True)
    assert common.attention_implementation(model) == "eager"


@pytest.fixture
def default_memory_budget():
    """The compiler's memory budget is process-wide; put the default back after the test."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=functorch_config.activation_memory_budget):
        yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("default_memory_budget")
def test_compiled_arms_give_the_stock_loss_and_the_budget_keeps_less():
    # Dropout 0: inductor draws its own random numbers. Saved bytes from the same compiled models (float64).
    batch = common.make_batch(TINY, 2, 16, "cpu")
    compiled = _assert_same("lora+compile", "lora", dropout=0.0).saved_bytes(batch)
    # Budget 0: the partitioner recomputes all it can (1 is its default); in between it depends on the model
    # (at these shapes 0.2 already keeps what the default keeps). Dynamo would reuse the graph compiled for the
    # other model of the same class, partition included: each benchmark arm has a process of its own.
    torch._dynamo.reset()
    budgeted = _assert_same("lora+budget@0", "lora", dropout=0.0).saved_bytes(batch)
    assert 0 < budgeted < compiled / 4, (budgeted, compiled)


@pytest.mark.usefixtures("default_memory_budget")
def test_compiled_sampling_arm_trains():
    # The first step is compiled too: the sampler's probe is made in the model's forward pre-hook, so its graph
    # break is at the top and not inside a rebound forward (whose resume function Dynamo would not find).
    trainer = memory_speed.Trainer(TINY, "lora+wta@0.3+masks+attn+compile", "fp32", "cpu")
    batch = common.make_batch(TINY, 2, 16, "cpu")
    assert trainer.saved_bytes(batch) > 0
    assert torch.isfinite(trainer.step(batch))
    assert trainer.prepared.attention == "eager"


# ---------------------------------------------------------------------------------------------------------------
# The GPU script's pieces that run anywhere: largest-batch search, frontier, plan; and its --quick run.


@pytest.mark.parametrize("guess", [1, 50, 137, 138, 400, 5000])
def test_search_largest_brackets_the_limit_from_any_guess(guess):
    probed = []

    def fits(b):
        probed.append(b)
        return b <= 137

    out = memory_speed.search_largest(fits, guess, max_batch=1000, tolerance=0.05, max_probes=20)
    assert out["largest_batch"] <= 137 < out["fails_at"]
    assert out["fails_at"] <= max(out["largest_batch"] * 1.05, out["largest_batch"] + 1)
    assert out["probes"] == len(probed) and out["capped_at"] is None
    if guess in (137, 138):  # a good prediction costs two probes
        assert out["probes"] == 2


def test_search_largest_stops_at_the_cap_and_the_probe_limit():
    assert memory_speed.search_largest(lambda b: True, 10, max_batch=64) == \
        {"largest_batch": 64, "fails_at": None, "probes": 7, "capped_at": 64}  # 10, 11, 12, 14, 19, 34, 64
    assert memory_speed.search_largest(lambda b: False, 10, max_batch=64) == \
        {"largest_batch": 0, "fails_at": 1, "probes": 8, "capped_at": None}  # 10, 9, 8, 7, 5, 3, 2, 1
    assert memory_speed.search_largest(lambda b: b <= 5000, 10, max_batch=10**6, max_probes=3)["probes"] == 3


def test_pareto_front_and_winning_range():
    pts = [("gc", 1.0, 100.0), ("ours", 3.0, 300.0), ("sac", 4.0, 250.0), ("lora", 10.0, 400.0),
           ("slow", 12.0, 50.0)]
    assert report.pareto_front(pts) == ["gc", "ours", "lora"]
    rivals = {"gc", "sac", "lora", "slow"}
    # Under limits from 3 GiB up to (not including) LoRA's 10 GiB, ours is the fastest arm that fits.
    assert report.winning_range(pts, "ours", rivals) == (3.0, 10.0)
    assert report.winning_range([("ours", 3.0, 90.0), ("gc", 1.0, 100.0)], "ours", {"gc"}) is None
    assert report.winning_range([("ours", 3.0, 500.0), ("gc", 1.0, 100.0)], "ours", {"gc"}) == (3.0, math.inf)


def test_predicted_batch_from_two_peaks():
    row = {"peak_allocated_bytes": 12 * common.GIB, "batch_size": 100, "bytes_per_sentence": 0.1 * common.GIB,
           "fixed_bytes": 2 * common.GIB}
    assert gpu_key.predicted_batch(row, 24 * common.GIB) == 220
    assert gpu_key.predicted_batch({"batch_size": 100}, 24 * common.GIB) is None


def test_gpu_plan_holds_every_arm_the_issues_ask_for():
    plan = gpu_key.make_plan(quick=False, total_gib=80.0)
    arms = {(t.model, t.arm) for t in plan.tasks if t.kind == "arm"}
    for arm in gpu_key.TABLE_ARMS:
        assert ("t5-base", arm) in arms and ("t5-base", arm + "+compile") in arms
    for model in plan.frontier_models:
        for arm in ("lora", *gpu_key.STOCK_ARMS):
            assert (model, arm) in arms, (model, arm)
        assert any(common.parse_arm(a).sampled and m == model for m, a in arms)
    largest = {(t.model, t.arm, t.limit_gib) for t in plan.tasks if t.kind == "largest"}
    for model in ("t5-base", "t5-large"):
        for limit in gpu_key.LIMITS_GIB:
            for arm in (*gpu_key.LARGEST_ARMS, gpu_key.BEST_OURS):
                assert (model, arm, limit) in largest
    for task in plan.tasks:  # every name parses
        task.arm == gpu_key.BEST_OURS or common.parse_arm(task.arm)
    # The issue table comes first, eager then the compiled pair the step-time target needs.
    assert [t.arm for t in plan.tasks[:12]] == [*gpu_key.TABLE_ARMS, "lora+compile",
                                                 "lora+wta@0.3+masks+attn+compile"]
    assert plan.models["bert-base"]["batch"] == 512 and plan.models["llama-1b"]["batch"] == 128
    assert gpu_key.make_plan(quick=False, total_gib=139.8).models["llama-1b"]["batch"] == 208


def test_gpu_key_quick(tmp_path):
    assert gpu_key.main(["--quick", "--time-budget", "75", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_gpu_cpu_quick.json").read_text())
    _check_meta(result["meta"])
    assert result["wall_s"] < 75 + 15  # one task may overrun its estimate; none runs past the budget
    ran = {r["arm"]: r for r in result["rows"]}
    # The compiled arm is last; a cold Inductor cache (a fresh machine) can take longer than its time limit,
    # which the script reports as that row's error and goes on. Every other arm must run.
    failed = [r for r in result["rows"] if r.get("error")]
    assert "lora" in ran and all(r["arm"].endswith("+compile") and r["error"].startswith("timed out") for r in failed)
    tasks = [(t.model, t.arm) for t in gpu_key.make_plan(quick=True, total_gib=0).tasks]
    assert len(result["rows"]) + len(result["skipped"]) == len(tasks)  # each task ran or is listed as skipped
    for row in (r for r in result["rows"] if r not in failed):
        assert row["sentences_per_s"] > 0 and row["saved_bytes"] > 0
        default = common.attention_implementation(common.build_model(row["model"]))
        assert row["attention"] == ("eager" if "+attn" in row["arm"] else default)
        if row.get("profile"):
            assert row["aten_ops_per_step"] > 0 and row["sync_ops_per_step"] >= 0
    assert any(line.startswith("step time, eager") for line in result["targets"])
    md = (tmp_path / "bench_frontier_cpu_quick.md").read_text()
    assert "## Frontier: t5-tiny" in md and "## Targets" in md
    assert (tmp_path / "bench_gpu_cpu_quick.png").stat().st_size > 0
    assert (tmp_path / "bench_frontier_cpu_quick_t5-tiny.png").stat().st_size > 0


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


@pytest.mark.parametrize("budget", [1.0, 0.3])
def test_gradient_noise_smoke(tmp_path, tiny_bert, monkeypatch, budget):
    """At budget 1 every arm's sampled gradient is its exact one; at 0.3 each arm's sampled weights get noise."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = {1: ["great", "fine", "lovely"], 0: ["awful", "dull", "weak"]}
    (tmp_path / "senteval").mkdir()
    (tmp_path / "senteval" / "train.tsv").write_text(
        "".join(f"{i % 2}\ta {words[i % 2][i % 3]} film , number {i}\n" for i in range(40)))
    (tmp_path / "senteval" / "dev.tsv").write_text("1\tgood\n0\tbad\n")
    out = tmp_path / "noise.json"
    argv = ["--model", str(tiny_bert), "--tasks", "sst2", "--data-root", str(tmp_path), "--batch-size", "8",
            "--draws", "3", "--batches", "2", "--warmup", "2", "--budget", str(budget), "--out", str(out)]
    assert gradient_noise.main(argv) == 0
    result = json.loads(out.read_text())
    _check_meta(result["meta"])
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == list(gradient_noise.ARMS)
    for row in rows.values():
        assert row["all"]["sgd"] > 0 and row["sampled"]["sgd"] > 0
        if budget == 1.0:
            assert row["all"]["sampling"] < 1e-12 and row["sampled"]["sampling"] < 1e-12, row
        else:
            assert row["sampled"]["sampling"] > 1e-7, row
    assert f"| sst2 | LoRA+WTA-CRS@{budget:g} (default) |" in gradient_noise.table(result)
    assert out.with_suffix(".png").stat().st_size > 0


def test_arm_runs_in_a_fresh_interpreter_where_forking_fails(monkeypatch):
    monkeypatch.setattr(memory_speed, "_use_subprocess", True)
    spec = {"model": "t5-tiny", "arm": "lora+sac", "precision": "fp32", "device": "cpu", "batch_size": 2,
            "seq_len": 16, "steps": 0, "warmup": 0}
    fresh = memory_speed.run_arm(spec, timeout=300)
    here = memory_speed.run_worker(spec)
    assert fresh["saved_bytes"] == here["saved_bytes"] > 0 and fresh["attention"] == here["attention"]


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit):
        memory_speed.main(["--arms", "lora+wta@abc", "--out", "unused.json"])
    with pytest.raises(SystemExit):
        variance.main(["--mc-trials", "1"])


def test_settings_name_paths_beside_the_repository_relative_to_it():
    import argparse

    args = argparse.Namespace(out=REPO / "results" / "x.json", data_root=REPO.parent / "shared" / "data",
                              other=Path("/elsewhere/file"), n=3)
    assert common.settings_dict(args) == {"out": "results/x.json", "data_root": "../shared/data",
                                          "other": "/elsewhere/file", "n": 3}
