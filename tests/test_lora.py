"""One sample of x for the LoRA A projections that read it through their own dropouts (wtacrs.lora)."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import transformers
from torch import nn

import wtacrs
from wtacrs.lora import LoraDropout
from wtacrs.memory import SavedTensors

from conftest import max_abs_z, z_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, ROWS = 32, 4 * 12
KEPT = math.ceil(0.3 * ROWS)  # 15 rows per sample at budget 0.3


def lora_bert(lora_dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=2,
    )
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=["query", "key", "value"]))
    for name, p in model.named_parameters():  # B = 0 (PEFT's init) would give A a zero gradient
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, 128, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=g)}


def with_own_generator(model: nn.Module, seed: int) -> nn.Module:
    """Sampling draws from its own generator, so that the dropout masks (the default generator) repeat per seed."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, wtacrs.SampledLinear):
            module.generator = generator
    return model


def kept_samples(model: nn.Module) -> int:
    """How many (KEPT, HIDDEN) float tensors a training step saves: the kept rows of the A projections' inputs
    (nothing else in this model has 15 rows)."""
    found = []

    def pack(t):
        if t.is_floating_point() and tuple(t.shape) == (KEPT, HIDDEN):
            found.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch()).loss.backward()
    return len(set(found))


def test_adapters_reading_x_through_dropout_store_one_sample_of_x():
    shared = wtacrs.apply_wtacrs(lora_bert(), 0.3, probs="activations")
    separate = wtacrs.apply_wtacrs(lora_bert(), 0.3, probs="activations", share_inputs=False)
    assert sum(isinstance(m, LoraDropout) for m in shared.modules()) == 6
    assert not any(isinstance(m, LoraDropout) for m in separate.modules())
    # Two layers x one sample of x (15 rows) shared by q/k/v's A, against three samples each without sharing.
    assert kept_samples(shared) == 2
    assert kept_samples(separate) == 6
    lines = wtacrs.describe(shared).splitlines()
    assert sum("shared with the layer before it" in line for line in lines) == 4


def test_forward_is_stock_lora_and_remove_restores_the_dropouts():
    stock = lora_bert()
    # Sampling from its own generator leaves the default one to the dropouts, so both models draw the same masks.
    model = with_own_generator(wtacrs.apply_wtacrs(copy.deepcopy(stock), 0.3), seed=7)
    torch.manual_seed(3)
    expected = stock(**batch()).logits
    torch.manual_seed(3)
    assert torch.equal(model(**batch()).logits, expected)  # the same dropout draws, the same kernels
    wtacrs.remove_wtacrs(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]


def test_a_gradients_are_unbiased_through_the_shared_sample():
    """With the dropout masks fixed (same seed each step) the mean of many sampled A gradients is the exact one."""
    model = with_own_generator(wtacrs.apply_wtacrs(lora_bert(), 0.3, probs="activations"), seed=5)
    reference = copy.deepcopy(model)
    wtacrs.remove_wtacrs(reference)
    names = [n for n, p in model.named_parameters() if "lora_A" in n]
    torch.manual_seed(0)
    reference(**batch()).loss.backward()
    exact = torch.cat([p.grad.reshape(-1) for n, p in reference.named_parameters() if n in names])
    draws = []
    for _ in range(400):
        model.zero_grad()
        torch.manual_seed(0)
        model(**batch()).loss.backward()
        draws.append(torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in names]))
    assert max_abs_z(torch.stack(draws), exact) < z_threshold(exact.numel())
