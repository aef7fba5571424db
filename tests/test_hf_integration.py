"""Shared samples, padding, gradient-norm cache, gradient checkpointing and the HF Trainer with a patched model."""

from __future__ import annotations

import copy

import pytest
import torch

import wtacrs
from wtacrs import ops
from wtacrs.hf import ExampleIdCollator
from wtacrs.patch import EXAMPLE_IDS_KEY
from test_patch import assert_unbiased, gradient_moments, gradients, saved_bytes
from wtacrs.memory import SavedTensors
from tiny_models import BATCH, SEQ, tiny_batch, tiny_lora_model, tiny_model


@pytest.fixture
def kept_log(monkeypatch):
    """Every KeptRows the sampler creates, in order."""
    log = []

    def spy(*args, **kwargs):
        kept = ops.keep_rows(*args, **kwargs)
        log.append(kept)
        return kept

    monkeypatch.setattr(wtacrs.sampler, "keep_rows", spy)
    return log


def test_qkv_share_one_sample_and_store_a_third(kept_log):
    batch = tiny_batch("bert")
    targets = ["query", "key", "value"]
    frozen = tiny_model("bert")
    for name, module in frozen.named_modules():
        if name.endswith(tuple(targets)):
            module.weight.requires_grad_(False)
    baseline = saved_bytes(frozen, batch)  # everything but the inputs saved for the Q/K/V weight gradients
    stored = {}
    for share in (True, False):
        model = tiny_model("bert")
        wtacrs.apply_wtacrs(model, budget=0.3, targets=targets, share_inputs=share)
        kept_log.clear()
        stored[share] = saved_bytes(model, batch) - baseline
        assert len(kept_log) == (2 if share else 6)  # two layers: one sample each, or one per projection
    ratio = stored[True] / stored[False]
    print(f"\nQ/K/V stored bytes: shared {stored[True]}, separate {stored[False]}, ratio {ratio:.3f}")
    assert ratio == pytest.approx(1 / 3, rel=0.1)


def test_shared_sample_keeps_each_gradient_unbiased():
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    exact = gradients(copy.deepcopy(model), batch)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="all-linear", share_inputs=True)
    mean, se = gradient_moments(model, batch, draws=500)
    assert_unbiased(mean, se, exact)


def test_lora_a_projections_share_their_input_when_dropout_is_zero(kept_log):
    model = tiny_lora_model("bert", dropout=0.0)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="lora")
    model(**tiny_batch("bert")).loss.backward()
    assert len(kept_log) == 2  # one per layer for its three lora_A


def test_padding_rows_are_never_kept_and_gradient_stays_unbiased(kept_log):
    model = tiny_model("bert")
    batch = tiny_batch("bert", padded=True)
    pad_rows = torch.nonzero(batch["attention_mask"].reshape(-1) == 0).flatten()
    exact = gradients(copy.deepcopy(model), batch)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full")
    model(**batch).loss.backward()
    assert kept_log and all(k.indices is not None for k in kept_log)
    for kept in kept_log:
        assert not torch.isin(kept.indices.long(), pad_rows).any()
    mean, se = gradient_moments(model, batch, draws=500)
    assert_unbiased(mean, se, exact)


def recomputed_layer_bytes(model, batch) -> int:
    """Bytes one decoder layer saves when checkpointing recomputes it in backward: the same layer run without
    checkpointing, on the inputs it receives in the model."""
    checkpointing = model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    layer = model.model.layers[0]
    captured = {}
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    model(**batch)
    handle.remove()
    with SavedTensors(exclude=model.parameters()) as saved:
        layer(*captured["args"], **captured["kwargs"])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return saved.nbytes


def test_gradient_checkpointing_keeps_rows_unbiased_and_stores_less():
    """With checkpointing, forward keeps only layer inputs; each layer's saved tensors exist only while it is
    recomputed in backward. Sampling must keep the gradient unbiased (the recomputation draws the same rows) and
    shrink that per-layer footprint, without adding to what forward keeps."""
    family = "llama"
    batch = tiny_batch(family)
    model = tiny_model(family)
    exact = gradients(copy.deepcopy(model), batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept_by_forward = saved_bytes(model, batch)
    recomputed = recomputed_layer_bytes(model, batch)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full")
    assert saved_bytes(model, batch) == kept_by_forward
    sampled_recomputed = recomputed_layer_bytes(model, batch)
    print(f"\nper-layer recomputation: stock {recomputed} B, sampled {sampled_recomputed} B")
    assert sampled_recomputed < recomputed
    mean, se = gradient_moments(model, batch, draws=500)
    assert_unbiased(mean, se, exact)


def test_gradient_norm_cache_fills_and_keeps_gradient_unbiased():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    exact = gradients(copy.deepcopy(model), batch)
    cache = wtacrs.GradNormCache(capacity=16, max_length=SEQ)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full", grad_cache=cache)
    ids = torch.arange(BATCH)
    step_batch = {**batch, EXAMPLE_IDS_KEY: ids}
    model(**step_batch).loss.backward()
    assert cache.nbytes() == 0  # norms are committed when the next batch begins
    mean, se = gradient_moments(model, step_batch, draws=500)
    assert cache.nbytes() > 0
    assert_unbiased(mean, se, exact)


def test_gradient_norm_cache_lookup_falls_back_for_unknown_examples():
    cache = wtacrs.GradNormCache(capacity=8, max_length=4)
    assert cache.lookup("m", torch.tensor([0, 1]), 4) is None
    cache.record("m", torch.tensor([3]), torch.ones(1, 4, 2) * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None])
    cache.commit()
    scores = cache.lookup("m", torch.tensor([3, 5]), 3)
    root2 = 2**0.5
    assert torch.allclose(scores[0], torch.tensor([1.0, 2.0, 3.0]) * root2, rtol=1e-3)
    assert torch.allclose(scores[1], scores[0].mean().expand(3), rtol=1e-3)  # unknown: the batch's mean
    assert cache.nbytes() == 8 * 8 + 8 * 4 * 2
    with pytest.raises(ValueError, match="capacity and max_length"):
        wtacrs.GradNormCache(capacity=0, max_length=4)


def test_example_id_collator_moves_ids_and_refuses_missing_ones():
    collate = ExampleIdCollator(lambda feats: {"x": torch.tensor([f["x"] for f in feats])})
    batch = collate([{"x": 1, "example_id": 7}, {"x": 2, "example_id": 9}])
    assert batch[EXAMPLE_IDS_KEY].tolist() == [7, 9] and batch["x"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="have no 'example_id'"):
        collate([{"x": 1}])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_rows_in_autocast_dtype(dtype, kept_log):
    model = tiny_lora_model("llama")
    wtacrs.apply_wtacrs(model, targets="lora")
    with torch.autocast("cpu", dtype=dtype):
        loss = model(**tiny_batch("llama")).loss
    loss.backward()
    assert kept_log and all(k.rows.dtype == dtype and k.scales.dtype == torch.float32 for k in kept_log)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_trainer_few_steps_loss_goes_down(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Repeat(torch.utils.data.Dataset):
        def __init__(self, batch):
            self.rows = [{k: v[i] for k, v in batch.items()} | {"example_id": i} for i in range(BATCH)]

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return self.rows[i % BATCH]

    model = tiny_model("bert")
    cache = wtacrs.GradNormCache(capacity=BATCH, max_length=SEQ)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full", grad_cache=cache)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
        learning_rate=3e-3, num_train_epochs=1, logging_steps=1, report_to=[], save_strategy="no",
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
    )

    def stack(features):
        return {k: torch.stack([torch.as_tensor(f[k]) for f in features]) for k in features[0]}

    trainer = Trainer(model=model, args=args, train_dataset=Repeat(tiny_batch("bert")),
                      data_collator=ExampleIdCollator(stack))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert cache.nbytes() > 0
