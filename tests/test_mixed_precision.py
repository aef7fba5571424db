"""Mixed precision through whole patched models: bf16 autocast, and fp16 autocast with a gradient scaler.

Kept rows are stored in the autocast dtype, their scales in fp32; the forward is the stock model's within bf16's own
error; the sampled weight gradient averages to the gradient of the low-precision computation, which is the stock
autocast gradient up to its rounding (bounds derived from the arithmetic, not hand-set).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    RowTerms, assert_within, check_unbiased, float64_rounding, row_term_branches, scale_rounding, sum_rounding,
    winner_count,
)
from sampled_gradients import Recorder
from tiny_models import tiny_batch, tiny_model
from torch import nn

import wtacrs
from wtacrs.app.demo import heavy_tailed_rows

D, CLASSES = 16, 4


class Block(nn.Module):
    """MLP block with a residual, then a norm and a head; ``up`` reads the heavy-tailed input rows, so WTA-CRS keeps
    winners there."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, 4 * D)
        self.down = nn.Linear(4 * D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(F.gelu(self.up(x)))
        return self.head(torch.tanh(self.norm(h)))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Block()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return heavy_tailed_rows(96, D, 1.5, g).reshape(4, 24, D), torch.randint(0, CLASSES, (4, 24), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, CLASSES), y.reshape(-1))

DTYPES = [torch.bfloat16, torch.float16]


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


def sampled_weight_gradients(model, x, y, dtype, scale: float) -> torch.Tensor:
    """The sampled layers' weight gradients of the loss scaled by ``scale`` in backward (as GradScaler does),
    divided back in fp32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_of(model, x, y)
    (loss * scale).backward()
    return torch.cat([model.up.weight.grad.reshape(-1), model.down.weight.grad.reshape(-1)]) / scale


def rounding_per_term(dtype: torch.dtype, terms: int) -> float:
    """Relative rounding of one sampled weight gradient under autocast, per unit of sum_t |scale_t outer(dy_t, x_t)|:
    bf16 rounds the scaled gradient rows to bf16, accumulates the product in fp32 and rounds its result to bf16;
    fp16 keeps the scaled rows and the product in fp32. (The inputs' own rounding to the autocast dtype is part of
    the target, not of the error.)"""
    fp32_sum = float(sum_rounding(torch.ones(()), terms, torch.float32))
    return fp32_sum + (2 * torch.finfo(torch.bfloat16).eps if dtype == torch.bfloat16 else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_gradient_is_unbiased_for_the_low_precision_gradient(dtype):
    """Under autocast the sampled layers keep low-precision rows. Each draw's weight gradients are within the
    rounding bound of the same slots summed in float64 (``sum_t scale_t outer(dy_t, x_t)`` over the low-precision
    dy and x that autocast produces), and those float64 sums average to sum_i outer(dy_i, x_i) with the power of
    conftest.check_unbiased. That target is the stock autocast gradient up to the stock product's rounding."""
    x, y = batch()
    # fp16 needs loss scaling (small gradients underflow); bf16 has fp32's range and runs unscaled.
    scale = 2.0**12 if dtype == torch.float16 else 1.0
    model = wtacrs.apply_wtacrs(net(), budget=0.3, targets=["up", "down"])
    torch.manual_seed(0)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(library gradient, its slots summed in float64, rounding bound) of one draw, and the row terms."""
        with Recorder(model) as rec:
            got = sampled_weight_gradients(model, x, y, dtype, scale).double()
        replay, bound, step.parts = [], [], []
        for name in ("up", "down"):
            low_x = rec.x[name].to(dtype).double().reshape(-1, rec.x[name].shape[-1])
            dy = rec.dy[name][0].double().reshape(-1, rec.dy[name][0].shape[-1]) / scale
            kept = rec.kept[name][0]
            slots = dy[kept.indices] * kept.scales.double()[:, None]
            replay.append((slots.T @ low_x[kept.indices]).reshape(-1))
            bound.append((slots.abs().T @ low_x[kept.indices].abs()).reshape(-1) * rounding_per_term(dtype, len(slots)))
            winners = torch.zeros(low_x.shape[0], dtype=torch.bool)
            winners[kept.indices[: winner_count(kept.scales)]] = True
            step.parts.append((torch.einsum("io,ij->ioj", dy, low_x).reshape(low_x.shape[0], -1), winners))
        return got, torch.cat(replay), torch.cat(bound)

    def sample(n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            got, replay, bound = step()
            assert_within(got, replay, bound / 2)
            out.append(replay)
        return torch.stack(out)

    step()
    parts, at = [], 0
    for terms, winners in step.parts:
        parts.append(RowTerms(slice(at, at + terms.shape[1]), terms, winners))
        at += terms.shape[1]
    assert sum(int(p.winners.sum()) for p in parts) > 0, "heavy-tailed rows should give WTA winners"
    target = torch.cat([p.terms.sum(0) for p in parts])

    stock_grad = sampled_weight_gradients(net(), x, y, dtype, scale).double()
    # The stock product: one fp32-accumulated sum over all 96 rows, its result rounded to the autocast dtype.
    stock_bound = (torch.cat([p.terms.abs().sum(0) for p in parts]) * float(sum_rounding(torch.ones(()), 96, torch.float32))
                   + torch.finfo(dtype).eps / 2 * stock_grad.abs())
    assert_within(stock_grad, target, stock_bound / 2)

    branches, directions = row_term_branches(parts, target.numel())
    check_unbiased(sample, target, branches, directions=directions,
                   rounding=float64_rounding(target) + scale_rounding(parts, target.numel()), name=f"autocast {dtype}")


def test_hugging_face_training_steps_store_low_precision_rows_and_train_the_sampled_weights():
    """LLaMA under bf16 autocast: the loss is the stock model's within the error of bf16 itself (measured against the
    fp32 loss), the saved tensors hold bf16 rows, fp32 scales and int64 indices, and AdamW steps (no weight decay)
    move the sampled weights."""
    dtype = torch.bfloat16
    stock = tiny_model("llama")
    model = wtacrs.apply_wtacrs(tiny_model("llama"), budget=0.3, targets="full")
    inputs = tiny_batch("llama", padded=True)
    fp32_loss = float(stock(**inputs).loss)
    with torch.autocast("cpu", dtype=dtype):
        stock_loss = float(stock(**inputs).loss)
        dtypes, out = saved_dtypes(lambda: model(**inputs).loss)
    # Two bf16 computations of one loss differ by at most about twice either's distance from the fp32 loss.
    assert abs(float(out) - stock_loss) <= 2 * abs(stock_loss - fp32_loss)
    assert {dtype, torch.float32, torch.int64} <= dtypes  # kept rows, scales, indices
    layers = [m for m in model.modules() if isinstance(m, wtacrs.SampledLinear)]
    assert layers and all("rows" in m.last_sample for m in layers)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    before = [m.weight.detach().clone() for m in layers]
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, m.weight) for a, m in zip(before, layers)), "a sampled weight did not move"


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
