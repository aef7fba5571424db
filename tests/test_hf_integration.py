"""Patched Hugging Face models: shared samples, the per-example gradient-norm cache, gradient checkpointing, autocast
and the Trainer. Unbiasedness checks run the tiny models in float64 (``sampled_gradients.check_model_unbiased``)."""

from __future__ import annotations

import copy

import pytest
import torch
from sampled_gradients import Recorder, check_model_unbiased, flat_gradients, sampled_layers
from tiny_models import BATCH, SEQ, tiny_batch, tiny_lora_model, tiny_model

import wtacrs
from wtacrs.hf import ExampleIdCollator
from wtacrs.memory import SavedTensors
from wtacrs.patch import EXAMPLE_IDS_KEY
from wtacrs.sampling import num_kept_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_bytes(model, batch) -> int:
    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(**batch).loss
    del loss
    return saved.nbytes


def samples_per_forward(model, batch) -> int:
    """How many distinct samples (``KeptRows``) one training forward made."""
    with Recorder(model) as rec:
        model(**batch).loss.backward()
    return len({id(k) for kept in rec.kept.values() for k in kept})


def loss_only(model, batch) -> dict[str, torch.Tensor]:
    return {"loss": model(**batch).loss}


def stock_gradient(model, batch) -> torch.Tensor:
    """The exact gradient: the unpatched model's, from a copy."""
    stock = copy.deepcopy(model)
    return flat_gradients(stock, loss_only(stock, batch))


def test_qkv_share_one_sample_and_store_a_third():
    batch = tiny_batch("bert")
    targets = ["query", "key", "value"]
    frozen = tiny_model("bert")
    for name, module in frozen.named_modules():
        if name.endswith(tuple(targets)):
            module.weight.requires_grad_(False)
    baseline = saved_bytes(frozen, batch)  # everything but what the Q/K/V weight gradients need
    stored = {}
    for share in (True, False):
        model = tiny_model("bert")
        wtacrs.apply_wtacrs(model, budget=0.3, targets=targets, share_inputs=share)
        stored[share] = saved_bytes(model, batch) - baseline
        assert samples_per_forward(model, batch) == (2 if share else 6)  # two layers: one each, or one per projection
    print(f"\nQ/K/V stored bytes: shared {stored[True]}, separate {stored[False]}")
    per_sample = num_kept_rows(BATCH * SEQ, 0.3) * (32 * 4 + 8 + 4)  # k rows of 32 floats, an index and a scale each
    rest = stored[True] - 2 * per_sample  # the batch's token ids (for the token statistics), stored once either way
    assert stored[False] - 6 * per_sample == rest and 0 <= rest <= BATCH * SEQ * 8


def test_shared_sample_keeps_each_gradient_unbiased():
    """LLaMA, every linear sampled, one sample shared by q/k/v and by gate/up: each layer's gradient stays unbiased
    (default probabilities, warmed token statistics, so WTA keeps winners)."""
    model = tiny_model("llama").double()
    batch = tiny_batch("llama", padded=True)
    exact = stock_gradient(model, batch)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="all-linear", share_inputs=True)
    for _ in range(4):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    assert samples_per_forward(model, batch) < len(sampled_layers(model))
    _, winners = check_model_unbiased(model, lambda: loss_only(model, batch), exact, name="llama all-linear shared")
    assert winners > 0


def test_lora_a_projections_share_their_input_when_dropout_is_zero():
    model = tiny_lora_model("bert", dropout=0.0)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="lora")
    assert samples_per_forward(model, tiny_batch("bert")) == 2  # one per layer for its three lora_A


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
    model(**batch, use_cache=False)  # a cache in the captured arguments would grow when the layer runs again
    handle.remove()
    with SavedTensors(exclude=model.parameters()) as saved:
        layer(*captured["args"], **captured["kwargs"])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return saved.nbytes


def test_gradient_checkpointing_replays_the_same_rows_stays_unbiased_and_stores_less():
    """With checkpointing, forward keeps only layer inputs and each layer's saved tensors exist only while it is
    recomputed in backward. The recomputation keeps exactly the rows the forward kept (the token statistics do not
    change in between, and checkpointing restores the random state), the gradient stays unbiased, and the
    per-layer footprint shrinks without adding to what forward keeps."""
    model = tiny_model("llama").double()
    batch = tiny_batch("llama", padded=True)
    exact = stock_gradient(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept_by_forward = saved_bytes(model, batch)
    recomputed = recomputed_layer_bytes(model, batch)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full")
    for _ in range(4):  # warmed token statistics: gradient-aware probabilities with winners
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)

    with Recorder(model) as rec:
        model(**batch).loss.backward()
    for name, kept in rec.kept.items():
        assert len(kept) == 2, f"{name} ran {len(kept)} times"  # the forward and its recomputation
        first, again = kept
        assert torch.equal(first.indices, again.indices) and torch.equal(first.scales, again.scales), name

    assert saved_bytes(model, batch) == kept_by_forward
    sampled_recomputed = recomputed_layer_bytes(model, batch)
    print(f"\nper-layer recomputation: stock {recomputed} B, sampled {sampled_recomputed} B")
    assert sampled_recomputed < recomputed
    _, winners = check_model_unbiased(model, lambda: loss_only(model, batch), exact, name="llama checkpointed")
    assert winners > 0


class CacheState:
    """Save and restore a GradNormCache, so that every draw sees the same (stale) table."""

    def __init__(self, cache: wtacrs.GradNormCache) -> None:
        self.cache = cache
        self.tags = {k: v.clone() for k, v in cache._tags.items()}
        self.norms = {k: v.clone() for k, v in cache._norms.items()}

    def restore(self) -> None:
        self.cache._pending.clear()
        self.cache._tags = {k: v.clone() for k, v in self.tags.items()}
        self.cache._norms = {k: v.clone() for k, v in self.norms.items()}


def test_gradient_norm_cache_fills_and_a_stale_cache_keeps_the_gradient_unbiased():
    """The cache is filled from a step whose loss ignores the padded positions (their rows' output gradients are
    zero there), then the loss reads them: the cached norms say zero for those rows, and only the floor keeps them
    drawable. The mean of the sampled gradients is the exact one."""
    model = tiny_model("llama").double()
    ignore = tiny_batch("llama", padded=True)
    reads = tiny_batch("llama", padded=True, loss_on_padding=True)
    ids = torch.arange(BATCH)
    exact = stock_gradient(model, reads)
    cache = wtacrs.GradNormCache(capacity=16, max_length=SEQ)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full", probs=cache)
    model(**ignore, **{EXAMPLE_IDS_KEY: ids}).loss.backward()
    assert cache.nbytes() == 0  # norms are committed when the next batch begins
    model(**ignore, **{EXAMPLE_IDS_KEY: ids})
    assert cache.nbytes() > 0
    pad = ~ignore["attention_mask"].bool()
    name = next(iter(sampled_layers(model)))
    cached = cache.lookup(name, ids, SEQ)
    assert bool((cached[pad] == 0).all()) and bool((cached[~pad] > 0).any())  # stale for the loss that reads padding
    model.zero_grad(set_to_none=True)
    state = CacheState(cache)

    def forward():
        state.restore()
        return loss_only(model, {**reads, EXAMPLE_IDS_KEY: ids})

    check_model_unbiased(model, forward, exact, name="llama GradNormCache, stale")


def test_gradient_norm_cache_lookup_falls_back_for_unknown_examples():
    cache = wtacrs.GradNormCache(capacity=8, max_length=4)
    assert cache.lookup("m", torch.tensor([0, 1]), 4) is None
    cache.record("m", torch.tensor([3]), torch.ones(1, 4, 2) * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None])
    cache.commit()
    scores = cache.lookup("m", torch.tensor([3, 5]), 3)
    root2 = 2**0.5
    assert torch.allclose(scores[0], torch.tensor([1.0, 2.0, 3.0]) * root2, rtol=1e-3)  # fp16 storage
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
def test_autocast_keeps_rows_in_autocast_dtype(dtype):
    model = tiny_lora_model("llama")
    wtacrs.apply_wtacrs(model, targets="lora")
    with Recorder(model) as rec:
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**tiny_batch("llama")).loss
        loss.backward()
    kept = [k for ks in rec.kept.values() for k in ks]
    assert kept and all(k.rows.dtype == dtype and k.scales.dtype == torch.float32 for k in kept)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_trainer_trains_the_sampled_weights(tmp_path):
    """transformers.Trainer with a patched model, the gradient-norm cache and the id collator; only the sampled
    weights are trainable, so the loss can only fall through their sampled gradients."""
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
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full", probs=cache)
    sampled = {f"{name}.weight" for name in sampled_layers(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in sampled)
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
    print(f"\nTrainer losses: {losses[0]:.4f} ... {losses[-1]:.4f}")
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert cache.nbytes() > 0
