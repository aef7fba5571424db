"""Learning that only the sampled gradients can drive: every parameter but the sampled weights is frozen, so a
broken estimator (a zero, wrong or badly scaled weight gradient) cannot hide behind biases, heads or LoRA's B.

Each test trains the same model three times from the same start on the same batch: with exact gradients, with
sampled gradients (apply_wtacrs, default settings), and with the sampled weights' gradients zeroed. The zeroed run
must not move (so the test can fail), and the sampled run must close most of the loss gap the exact run closes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_batch, tiny_lora_model, tiny_model

import wtacrs

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 40


def train(family: str, style: str, mode: str) -> tuple[float, float]:
    """(first loss, loss after STEPS Adam steps) with only the sampled weights trainable; ``mode`` is "exact",
    "sampled" or "zeroed" (sampled, with those weights' gradients replaced by zeros)."""
    model = tiny_model(family) if style == "full" else tiny_lora_model(family)
    batch = tiny_batch(family, padded=True)
    names = wtacrs.targets.resolve_targets(model, style).names
    trained = {f"{name}.weight" for name in names}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    if mode != "exact":
        wtacrs.apply_wtacrs(model, budget=0.3, targets=style)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(trained)
    if mode == "zeroed":
        for p in params:
            p.register_hook(torch.zeros_like)
    optimizer = torch.optim.Adam(params, lr=3e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
    return losses[0], losses[-1]


@pytest.mark.parametrize(("family", "style"), [("bert", "lora"), ("llama", "full")])
def test_only_the_sampled_gradients_train(family, style):
    start, exact = train(family, style, "exact")
    start_sampled, sampled = train(family, style, "sampled")
    _, zeroed = train(family, style, "zeroed")
    print(f"\n{family} {style}: loss {start:.4f} -> exact {exact:.4f}, sampled {sampled:.4f}, zeroed {zeroed:.4f}")
    assert start_sampled == pytest.approx(start, rel=1e-6)  # the same start: the forward is exact
    assert zeroed == pytest.approx(start, rel=1e-6), "with the sampled gradients zeroed nothing may learn"
    assert exact < start, "the exact run must learn, or the comparison says nothing"
    # Gradient noise costs a little of the progress, not most of it.
    assert start - sampled > 0.75 * (start - exact), (start, exact, sampled)
