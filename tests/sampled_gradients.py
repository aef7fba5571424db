"""Sampled gradients of whole patched models, for the model-level unbiasedness checks.

``check_model_unbiased`` draws the flat gradient of every trainable parameter (for one or several losses from the
same forward) many times and hands them to ``conftest.check_unbiased``. To give that check sharp projections it
first records one forward (``Recorder``, eager introspection through hooks): each sampled layer's input, output
gradient and kept rows, hence the row terms ``outer(dy_i, x_i)`` of its weight gradient and which rows are
winners (``conftest.RowTerms``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from conftest import (
    RowTerms, Verdict, check_unbiased, float64_rounding, row_term_branches, scale_rounding, winner_count,
)
from torch import nn

import wtacrs
from wtacrs.patch import _STATE_ATTR


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_gradients(model: nn.Module, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradients of every trainable parameter for each loss in turn, flat and concatenated."""
    params = [p for _, p in trainable(model)]
    flats = []
    for i, loss in enumerate(losses.values()):
        grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(losses), allow_unused=True)
        flats.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.cat(flats)


def sampled_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (wtacrs.SampledLinear, wtacrs.SampledConv1D)) and m.weight.requires_grad}


class Recorder:
    """While active: per sampled layer, its input, its output gradient in each backward, and every ``KeptRows`` it
    used (a layer run again, by gradient checkpointing, adds one)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = sampled_layers(model)
        self.x: dict[str, torch.Tensor] = {}
        self.dy: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        self.kept: dict[str, list] = {name: [] for name in self.layers}

    def __enter__(self) -> "Recorder":
        self.handles = []
        for name, m in self.layers.items():
            self.handles.append(m.register_forward_pre_hook(partial(self._input, name)))
            self.handles.append(m.register_forward_hook(partial(self._output, name)))
        sampler = getattr(self.model, _STATE_ATTR).sampler
        real_keep = sampler.keep

        def keep(layer, x, row_scores=None):
            kept, report = real_keep(layer, x, row_scores)
            if layer.sampler_name in self.kept:
                self.kept[layer.sampler_name].append(kept)
            return kept, report

        sampler.keep = keep
        self.sampler = sampler
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        del self.sampler.keep

    def _input(self, name, module, args):
        self.x.setdefault(name, args[0].detach())

    def _output(self, name, module, args, out):
        if len(self.kept[name]) == 1:  # the first forward; a recomputation's output gets no gradient of its own
            out.register_hook(lambda g: self.dy[name].append(g.detach()))

    def row_terms(self, sizes: list[int], names: tuple[str, ...]) -> list[RowTerms]:
        """The row terms of every recorded layer's weight gradient, for each loss, placed in a flat draw made of one
        block per loss (``sizes``: the trainable parameters' sizes in ``named_parameters`` order)."""
        offsets, at = {}, 0
        for (name, _), size in zip(trainable(self.model), sizes):
            offsets[name] = at
            at += size
        parts = []
        for name, layer in self.layers.items():
            x = self.x[name].reshape(-1, self.x[name].shape[-1])
            kept = self.kept[name][0]
            winners = torch.zeros(x.shape[0], dtype=torch.bool)
            if kept.indices is not None:
                winners[kept.indices[: winner_count(kept.scales)].long()] = True
            start = offsets[f"{name}.weight"]
            for i, loss in enumerate(names):
                dy = self.dy[name][i].reshape(-1, self.dy[name][i].shape[-1])
                terms = torch.einsum("io,ij->ioj", dy, x)
                if isinstance(layer, wtacrs.SampledConv1D):
                    terms = terms.transpose(1, 2)
                parts.append(RowTerms(slice(i * at + start, i * at + start + layer.weight.numel()),
                                      terms.reshape(x.shape[0], -1), winners, f"/{loss}" if len(names) > 1 else ""))
        return parts


class ModelDraws:
    """``n`` -> (n, entries) sampled gradients of ``model`` for the losses ``forward()`` returns. With ``hold_stats``
    every draw starts from the token statistics the model has now (so the draws are independent and alike)."""

    def __init__(self, model: nn.Module, forward: Callable[[], dict[str, torch.Tensor]], hold_stats: bool = True):
        self.model, self.forward = model, forward
        stats = getattr(model, _STATE_ATTR).sampler.stats
        self.stats = stats if hold_stats else None
        self.state = None if self.stats is None else (stats.table, stats.scores)

    def restore(self) -> None:
        if self.stats is not None:
            self.stats.table, self.stats.scores = self.state

    def one(self) -> torch.Tensor:
        self.restore()
        return flat_gradients(self.model, self.forward())

    def __call__(self, n: int) -> torch.Tensor:
        return torch.stack([self.one() for _ in range(n)])


def check_model_unbiased(
    model: nn.Module, forward: Callable[[], dict[str, torch.Tensor]], exact: torch.Tensor, name: str,
    hold_stats: bool = True, pilot: int = 20,
) -> tuple[Verdict, int]:
    """Record one draw, then check the mean of many draws against ``exact`` (float64 models: entries computed
    exactly must match to float64 rounding); returns the verdict and the number of winner rows of the recorded
    forward (over all sampled layers)."""
    draws = ModelDraws(model, forward, hold_stats)
    with Recorder(model) as rec:
        draws.restore()
        losses = forward()
        names = tuple(losses)
        flat_gradients(model, losses)
    parts = rec.row_terms([p.numel() for _, p in trainable(model)], names)
    winners = sum(int(p.winners.sum()) for p in parts) // len(names)
    branches, directions = row_term_branches(parts, exact.numel())
    per_loss = exact.numel() // len(names)
    rounding = torch.cat([float64_rounding(exact[i * per_loss:(i + 1) * per_loss]) for i in range(len(names))])
    rounding += scale_rounding(parts, exact.numel())
    verdict = check_unbiased(draws, exact, branches, rounding=rounding, pilot=pilot, directions=directions,
                             name=f"{name} ({winners} winner rows)")
    return verdict, winners

