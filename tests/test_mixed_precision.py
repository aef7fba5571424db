"""Mixed precision through whole patched models: bf16 autocast, and fp16 autocast with a gradient scaler.

Kept rows are stored in the autocast dtype, their scales in fp32; the loss equals the stock model's under the same
autocast; the sampled gradient averages to the stock model's gradient under the same autocast (up to the rounding
that separates two low-precision computations of one product).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import z_threshold
from tiny_models import tiny_batch, tiny_model
from torch import nn

import wtacrs
from wtacrs.app.demo import heavy_tailed_rows

D, CLASSES = 16, 4


class Block(nn.Module):
    """Pre-norm MLP block with a residual and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 4 * D)
        self.down = nn.Linear(4 * D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(torch.tanh(h))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Block()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return heavy_tailed_rows(96, D, 1.5, g).reshape(4, 24, D), torch.randint(0, CLASSES, (4, 24), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, CLASSES), y.reshape(-1))

DTYPES = [torch.bfloat16, torch.float16]
#: Rounding allowed between the stock and the sampled low-precision gradient, relative to the entry and to the
#: largest entry (bf16 keeps 8 significant bits, fp16 11).
ROUNDING = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


def saved_dtypes(fn) -> tuple[set[torch.dtype], object]:
    dtypes: set[torch.dtype] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            dtypes.add(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return dtypes, out


def unscaled_gradient(model, x, y, dtype, scale: float) -> torch.Tensor:
    """The gradient of the loss scaled by ``scale`` in backward (as GradScaler does), divided back in fp32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_of(model, x, y)
    (loss * scale).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_gradient_averages_to_the_stock_low_precision_gradient(dtype):
    x, y = batch()
    # fp16 needs loss scaling (small gradients underflow); bf16 has fp32's range and runs unscaled.
    scale = 2.0**12 if dtype == torch.float16 else 1.0
    exact = unscaled_gradient(net(), x, y, dtype, scale).double()
    model = wtacrs.apply_wtacrs(net(), budget=0.3, targets=["up", "down"])
    torch.manual_seed(0)
    draws = torch.stack([unscaled_gradient(model, x, y, dtype, scale) for _ in range(200)]).double()
    assert bool(torch.isfinite(draws).all())
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    rounding = ROUNDING[dtype] * (exact.abs() + exact.abs().max())
    excess = (mean - exact).abs() - z_threshold(exact.numel()) * se - rounding
    assert excess.max() <= 0
    assert se[: model.up.weight.numel()].max() > 0, "nothing was sampled"


@pytest.mark.parametrize("dtype", DTYPES)
def test_hugging_face_training_steps_store_low_precision_rows(dtype):
    stock = tiny_model("llama")
    model = wtacrs.apply_wtacrs(tiny_model("llama"), budget=0.3, targets="full")
    inputs = tiny_batch("llama", padded=True)
    with torch.autocast("cpu", dtype=dtype):
        stock_loss = stock(**inputs).loss
        dtypes, out = saved_dtypes(lambda: model(**inputs).loss)
    assert torch.equal(out, stock_loss), "sampling must not change the forward"
    assert {dtype, torch.float32, torch.int64} <= dtypes  # kept rows, scales, indices
    kept = [m.last_sample for m in model.modules() if isinstance(m, wtacrs.SampledLinear)]
    assert kept and all("rows" in k for k in kept)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**inputs).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "no step was taken"


def test_fp16_overflow_is_caught_by_the_scaler_not_the_op():
    """A scale so large that the fp16 gradients overflow: the sampled op passes inf on, the scaler skips the step
    and lowers its scale, and the weights stay unchanged."""
    x, y = batch()
    model = wtacrs.apply_wtacrs(net(), budget=0.3, targets=["up", "down"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_of(model, x, y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**40
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
