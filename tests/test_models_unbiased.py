"""Unbiased sampled gradients across model families, fine-tuning styles, losses and row probabilities.

For ten Hugging Face families (tiny random-initialised configs, ``tiny_models``), full fine-tuning and PEFT LoRA
(random B, so that A gets a gradient), on a right-padded batch: the mean of the sampled gradients of every
trainable parameter equals the exact gradient, for two losses drawn from the same forward passes,

* ``pad``: a loss that reads the padded positions (language models: labels = the pad token there, not -100;
  classifiers: the classification loss plus a term on every position's last hidden state), and
* ``ignore``: one that ignores them (labels -100; the classification loss alone),

and for the row probabilities a user can get:

* ``tokens``: the default, with token statistics warmed by a few steps of the ``ignore`` loss (so for the ``pad``
  loss they are stale: they say the padded rows carry no gradient), held at that state for every draw;
* ``tokens-empty``: the default at its first step (no statistics yet), every draw a first step;
* ``activations``: ``||x_i||`` alone.

The models run in float64, so the only error left is the estimator's: parameters whose gradient is exact must
match to float64 rounding, and the sampled ones within the statistical bound of ``conftest.check_unbiased``, which
has enough draws to catch a 5% scale bias of the winners or of the drawn rows (each loss) with probability 0.99.
Each case also shows that WTA-CRS picked winners where the probabilities are gradient-aware, that the outputs
are those of the stock model, and that autograd saves fewer bytes than for the stock model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sampled_gradients import check_model_unbiased, flat_gradients
from tiny_models import CAUSAL, CLASSIFIER, SEQ2SEQ, family_kind, tiny_batch, tiny_lora_model, tiny_model
from torch import nn

import wtacrs
from wtacrs.memory import SavedTensors

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("bert", "roberta", "distilbert", "t5v1.1", "gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen3")
#: Steps of ``warm_loss`` that warm the token statistics before the draws.
WARM_STEPS = 4
#: Every family runs the default (token statistics, warmed) in both styles; the first step and activation norms run
#: in a few of them (the draws cost a forward and two backwards each).
CASES = [(f, style, "tokens") for f in FAMILIES for style in ("full", "lora")] + [
    ("bert", "lora", "tokens-empty"), ("gpt_neox", "full", "tokens-empty"), ("qwen3", "lora", "tokens-empty"),
    ("distilbert", "full", "activations"), ("opt", "lora", "activations"), ("mistral", "full", "activations"),
]


def build(family: str, style: str) -> nn.Module:
    return (tiny_model(family) if style == "full" else tiny_lora_model(family)).double()


def padded_batch(family: str) -> dict[str, torch.Tensor]:
    """The padded batch with labels that ignore the padding (``labels``) and that read it (``pad_labels``)."""
    batch = tiny_batch(family, padded=True)
    batch["pad_labels"] = tiny_batch(family, padded=True, loss_on_padding=True)["labels"]
    return batch


def losses(family: str, model: nn.Module, batch: dict, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward; the ``pad`` and ``ignore`` losses of its outputs."""
    kind = family_kind(family)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if kind == SEQ2SEQ:  # the decoder's inputs come from the labels (the same for both: -100 becomes the pad token)
        inputs["labels"] = batch["pad_labels"]
    out = model(**inputs, output_hidden_states=kind == CLASSIFIER)
    logits = out.logits
    if kind == CLASSIFIER:
        # The classification loss plus a term on each position's last hidden state: over every position, or over
        # the real ones only.
        classify = F.cross_entropy(logits, batch["labels"])
        per_position = (out.hidden_states[-1] @ probe).square()
        real = batch["attention_mask"].bool()
        return {"pad": classify + per_position.mean(), "ignore": classify + per_position[real].mean()}
    pad_labels, ignore_labels = batch["pad_labels"], batch["labels"]
    if kind == CAUSAL:
        logits, pad_labels, ignore_labels = logits[:, :-1], pad_labels[:, 1:], ignore_labels[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    return {"pad": F.cross_entropy(flat, pad_labels.reshape(-1)),
            "ignore": F.cross_entropy(flat, ignore_labels.reshape(-1))}


def warm_loss(family: str, model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss that warms the token statistics: one that reads little (the last real token of each causal LM
    input, the first example's targets of an encoder-decoder, the classification), as when a loss reads only an
    answer. It concentrates the gradient on a few tokens, so the statistics are far from uniform and WTA keeps
    winners; for the ``pad`` and ``ignore`` losses they are stale."""
    kind = family_kind(family)
    labels = torch.full_like(batch["labels"], -100) if kind != CLASSIFIER else batch["labels"]
    if kind == CAUSAL:
        last = batch["attention_mask"].sum(1) - 1
        labels[torch.arange(len(last)), last] = batch["input_ids"][torch.arange(len(last)), last]
    elif kind == SEQ2SEQ:  # the first example's targets only: its encoder rows alone get a gradient
        labels[0] = batch["labels"][0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    if kind == SEQ2SEQ:  # the same decoder inputs as the other losses
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["pad_labels"])
    return model(**inputs).loss


def saved_bytes(model: nn.Module, fn) -> int:
    with SavedTensors(exclude=model.parameters()) as saved:
        fn()
    return saved.nbytes


@pytest.mark.parametrize(("family", "style", "mode"), CASES)
def test_mean_of_sampled_gradients_is_the_exact_gradient(family, style, mode):
    model = build(family, style)
    batch = padded_batch(family)
    probe = torch.randn(model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    stock = copy.deepcopy(model)
    stock_losses = losses(family, stock, batch, probe)
    exact = flat_gradients(stock, stock_losses)
    stock_saved = saved_bytes(stock, lambda: losses(family, stock, batch, probe))

    wtacrs.apply_wtacrs(model, budget=0.3, targets=style, probs="activations" if mode == "activations" else "tokens")
    torch.manual_seed(0)
    patched_losses = losses(family, model, batch, probe)
    for name in stock_losses:  # the forward is exact (float64: summation order shows only below 1e-12)
        torch.testing.assert_close(patched_losses[name], stock_losses[name], rtol=1e-12, atol=0)
    del patched_losses
    if mode == "tokens":
        for _ in range(WARM_STEPS):
            warm_loss(family, model, batch).backward()
        model.zero_grad(set_to_none=True)
    assert saved_bytes(model, lambda: losses(family, model, batch, probe)) < stock_saved

    _, winners = check_model_unbiased(model, lambda: losses(family, model, batch, probe), exact,
                                      name=f"{family} {style} {mode}")
    if mode == "tokens":
        assert winners > 0, "WTA-CRS picked no winners"
