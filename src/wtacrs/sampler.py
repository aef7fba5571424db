"""Sampling state shared by the layers of one patched model (or owned by one standalone layer).

* Row probabilities: ``||x_i||`` times an estimate of the output-gradient norm of row ``i``, mixed with ``||x_i||``
  by the floor. The estimate comes from ``TokenGradStats`` (the default: running per-token norms, no example ids
  needed) or from a ``GradNormCache`` (the paper's per-example cache, needs example ids); ``probs="activations"``
  uses ``||x_i||`` alone. No row with a non-zero input gets probability 0, so the estimate is unbiased whatever
  the loss reads (padding included).
* One sample per shared input: consecutive sampled layers that read the same tensor (Q/K/V, gate/up, the LoRA
  ``A`` projections under one input) get the same ``KeptRows``, so the rows are stored once. Each layer's
  estimate stays unbiased: it is the same unbiased estimator, only correlated across layers. Only the most
  recent input is remembered, so nothing is kept alive longer than until the next sampled call.
* The probe: a small leaf tensor that every sampled call takes as an input and whose gradient its backward
  fills (the per-token gradient norms for ``TokenGradStats``, zeros otherwise). A hook that runs once autograd
  has accumulated that gradient, i.e. when the backward is done with the sampled layers, folds the norms into the
  statistics and checks the non-finite-input counters (``wtacrs.health``): in eager Python, outside any compiled
  graph, without a device sync.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .gradcache import GradNormCache
from .gradstats import TokenGradStats
from .health import Health
from . import kernels
from .ops import KeptRows, compute_dtype, keep_whole, row_probabilities, sample_kept_rows, sanitized_scores
from .sampling import num_kept_rows

if TYPE_CHECKING:
    from .layers import SampledLinear

STACKS = ("encoder", "decoder")


class RowSampler:
    def __init__(
        self,
        share_inputs: bool = False,
        stats: TokenGradStats | None = None,
        grad_cache: GradNormCache | None = None,
    ) -> None:
        self.share_inputs = share_inputs
        self.stats = stats
        self.grad_cache = grad_cache
        self.health = Health()
        # Per stack: (shape of the token ids, flat ids) of the batch, when token statistics apply.
        self.tokens: dict[str, tuple[tuple, Tensor] | None] = dict.fromkeys(STACKS)
        self.example_ids: Tensor | None = None
        self._ids: dict[str, Tensor | Callable[[], Tensor] | None] = dict.fromkeys(STACKS)
        self._probe: Tensor | None = None
        self._dropped: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # see note_dropout
        self._last: tuple[Tensor, tuple, KeptRows] | None = None  # the most recent sampled input and its rows

    compute_dtype = staticmethod(compute_dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_probe=None, _last=None, _dropped=None)  # the probe carries a hook: a copy makes its own
        return state

    def probe(self, device: torch.device) -> Tensor:
        """The probe on ``device``: (V, 2) with token statistics, else (1, 2)."""
        probe = self._probe
        if probe is None or probe.device != device:
            probe = self._new_probe(device)
        return probe

    @torch.compiler.disable
    def _new_probe(self, device: torch.device) -> Tensor:
        # A leaf that needs a gradient and carries a hook is made outside any compiled graph. The patched model's
        # forward pre-hook asks for it first (``wtacrs.patch``), so a compiled first step breaks the graph there,
        # at the top, and not inside a sampled or rebound forward.
        rows = self.stats.vocab_size if self.stats is not None else 1
        probe = self._probe = torch.zeros(rows, 2, device=device, requires_grad=True)
        probe.register_post_accumulate_grad_hook(self._after_backward)
        return probe

    def _after_backward(self, probe: Tensor) -> None:
        grad, probe.grad = probe.grad, None
        if self.stats is not None:
            self.stats.fold(grad)
        self.health.check()

    def begin_batch(
        self,
        token_ids: Tensor | Callable[[], Tensor] | None = None,
        decoder_token_ids: Tensor | Callable[[], Tensor] | None = None,
        example_ids: Tensor | None = None,
    ) -> None:
        """Start a forward: take the batch's token ids per stack (a tensor, or a function that makes it when a
        layer first needs it) and example ids. Nothing is computed here (a forward pre-hook that computes starts
        a graph of its own under ``torch.compile``)."""
        if self.grad_cache is not None:
            self.grad_cache.commit()
        # A sample is shared within one forward only: an input fed again (the same batch twice) gets fresh rows.
        self._last = None
        self._dropped = None
        self.example_ids = example_ids
        self._ids = {"encoder": token_ids, "decoder": decoder_token_ids}
        self.tokens = dict.fromkeys(STACKS)

    def _tokens(self, stack: str) -> tuple[tuple, Tensor] | None:
        """(shape of the token ids, flat ids) of the batch for ``stack``, made on first use."""
        if self.stats is None:
            return None
        tokens = self.tokens.get(stack)
        if tokens is None:
            ids = self._ids.get(stack)
            if ids is None:
                return None
            if callable(ids):
                ids = ids()
            self.stats.to(ids.device)
            tokens = self.tokens[stack] = (tuple(ids.shape), self.stats.token_ids(ids))
        return tokens

    def note_dropout(self, out: Tensor, x: Tensor, packed: Tensor, value: Tensor) -> None:
        """``out`` is a compact dropout of ``x`` with keep-mask ``packed`` and kept value ``value``
        (``wtacrs.lora.LoraDropout``): a layer reading ``out`` may keep rows of ``x`` instead."""
        self._dropped = (out, x, packed, value)

    def keep(self, layer: "SampledLinear", x: Tensor, row_scores: Tensor | None = None):
        """(kept rows, report) for a layer's training forward on ``x``: ``report`` = (probe, token ids) is what
        ``apply_sampled_linear`` needs to report to the probe (ids None without token statistics for these
        rows)."""
        tokens = self._tokens(layer.stack)
        if tokens is not None and tokens[0] != tuple(x.shape[:-1]):
            tokens = None
        if self.stats is not None:
            self.stats.to(x.device)
        report = (self.probe(x.device), None if tokens is None else tokens[1])
        dropped = self._dropped
        if dropped is not None and dropped[0] is x and row_scores is None and x.shape[-1] % 8 == 0:
            # Rows of the dropout's input, shared with the other adapters reading it; backward rebuilds this
            # layer's rows from them and its dropout's mask (wtacrs.lora).
            self._dropped = None
            kept, report = self.keep(layer, dropped[1])
            return dataclasses.replace(kept, dropout=(dropped[2], dropped[3]), already_saved_by=None), report
        settings = (layer.budget, layer.method, layer.min_rows, layer.floor, layer.generator)
        last = self._last
        if self.share_inputs and row_scores is None and last is not None and last[0] is x and last[1] == settings:
            kept = last[2]
            self._note(layer, kept, shared=True)
            return kept, report
        n = math.prod(x.shape[:-1])
        k = num_kept_rows(n, layer.budget, layer.min_rows)
        kept = keep_whole(x, k)
        if kept is None:
            with torch.no_grad():
                x2d = x.reshape(-1, x.shape[-1])
                if tokens is not None and row_scores is None:
                    probs = kernels.row_weights(x2d, self.stats.scores, tokens[1])
                else:
                    probs = row_probabilities(x2d, self._scores(layer, x, row_scores), layer.floor)
            counter = self.health.counter(layer.sampler_name, x.device)
            kept = sample_kept_rows(x2d, k, probs, layer.method, layer.generator, counter)
        if self.share_inputs:
            self._last = (x, settings, kept)
        self._note(layer, kept, shared=False)
        return kept, report

    def _scores(self, layer, x: Tensor, row_scores: Tensor | None) -> Tensor | None:
        """Row scores given by the caller or the per-example cache, or None for activation norms alone."""
        if row_scores is not None:
            return sanitized_scores(row_scores.reshape(-1).float())
        if self.grad_cache is not None and self.example_ids is not None and x.dim() == 3:
            if x.shape[0] == len(self.example_ids):
                scores = self.grad_cache.lookup(layer.sampler_name, self.example_ids, x.shape[1])
                return None if scores is None else scores.reshape(-1)
        return None

    def after_forward(self, layer: "SampledLinear", output: Tensor) -> None:
        """With a ``GradNormCache``: record the output's gradient norms in backward, for the next forward over the
        same examples (eager mode only)."""
        if self.grad_cache is None or self.example_ids is None or not output.requires_grad:
            return
        if output.dim() != 3 or output.shape[0] != len(self.example_ids):
            return
        cache, name, ids = self.grad_cache, layer.sampler_name, self.example_ids
        output.register_hook(lambda grad: cache.record(name, ids, grad))

    @staticmethod
    def _note(layer: nn.Module, kept: KeptRows, shared: bool) -> None:
        """What a layer stored in its last training forward, for ``describe`` (shapes only: no device sync)."""
        if torch.compiler.is_compiling():
            return
        if kept.already_saved_by is not None:
            layer.last_sample = f"whole input, already saved by {kept.already_saved_by}: exact gradient, no extra memory"
        elif kept.indices is None:
            layer.last_sample = f"all {kept.num_rows} rows (budget covers every row)"
        else:
            rows = kept.rows.shape[0]
            where = "shared with the layer before it (same input)" if shared else "its own sample"
            layer.last_sample = f"{rows}/{kept.num_rows} rows ({rows / max(kept.num_rows, 1):.0%}), {where}"
