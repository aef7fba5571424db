"""Per-model sampling state shared by the layers that ``apply_wtacrs`` installs.

* One sample per shared input: layers that read the same tensor in one forward (Q/K/V of an attention, gate/up
  of an MLP, the LoRA ``A`` projections under one input) get the same ``KeptRows``, so the rows are stored once.
  Each layer's estimate stays unbiased: it is the same unbiased estimator, only correlated across layers.
* Padding: rows of padding tokens (``attention_mask == 0``) get probability 0 and are never kept; their output
  gradient is exactly zero, so the estimate stays unbiased.
* Gradient-norm probabilities: with a ``GradNormCache`` and example ids, rows are weighted by cached gradient
  norms times activation norms.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from torch import Tensor

from .gradcache import GradNormCache
from .ops import KeptRows, keep_rows

if TYPE_CHECKING:
    from .layers import SampledLinear


class RowSampler:
    def __init__(self, share_inputs: bool = True, grad_cache: GradNormCache | None = None) -> None:
        self.share_inputs = share_inputs
        self.grad_cache = grad_cache
        self.example_ids: Tensor | None = None
        self.token_mask: Tensor | None = None
        # id(x) -> (weak reference to x, x's version, layer settings, rows kept of x). Entries leave with x.
        self._shared: dict[int, tuple[weakref.ref, int, tuple, KeptRows]] = {}

    def begin_batch(self, example_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> None:
        """Set the batch's example ids and padding mask; called by a forward pre-hook on the patched model."""
        if self.grad_cache is not None:
            self.grad_cache.commit()
        # A sample is shared within one forward only: an input tensor fed again (the same batch twice) must get
        # fresh rows, or the steps' estimates would all repeat the first step's error.
        self._shared.clear()
        self.example_ids = example_ids
        self.token_mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None

    def keep(self, layer: "SampledLinear", x: Tensor) -> KeptRows:
        settings = (layer.budget, layer.method, layer.min_rows, layer.floor, id(layer.generator), layer.padding_aware)
        entry = self._shared.get(id(x)) if self.share_inputs else None
        if entry is not None and entry[0]() is x and entry[1] == x._version and entry[2] == settings:
            layer.last_sample = _summary(entry[3], shared=True)
            return entry[3]
        lead_shape = tuple(x.shape[:-1])
        row_mask = None
        if layer.padding_aware and self.token_mask is not None and tuple(self.token_mask.shape) == lead_shape:
            row_mask = self.token_mask
        row_scores = None
        if self.grad_cache is not None and self.example_ids is not None and len(lead_shape) == 2:
            if lead_shape[0] == len(self.example_ids):
                row_scores = self.grad_cache.lookup(layer.sampler_name, self.example_ids, lead_shape[1])
        kept = keep_rows(
            x, layer.budget, layer.method, row_scores, layer.generator, layer.min_rows, layer.floor, row_mask=row_mask
        )
        layer.last_sample = _summary(kept)
        if self.share_inputs:
            key = id(x)
            self._shared[key] = (weakref.ref(x, lambda _ref, key=key: self._shared.pop(key, None)), x._version,
                                 settings, kept)
        return kept

    def after_forward(self, layer: "SampledLinear", output: Tensor) -> None:
        """Record the output's gradient norms in backward, for the next forward over the same examples."""
        if self.grad_cache is None or self.example_ids is None or not output.requires_grad:
            return
        if output.dim() != 3 or output.shape[0] != len(self.example_ids):
            return
        cache, name, ids = self.grad_cache, layer.sampler_name, self.example_ids
        output.register_hook(lambda grad: cache.record(name, ids, grad))


def _summary(kept: KeptRows, shared: bool = False) -> str:
    """What a layer stored in its last training forward, for ``describe`` (shapes only: no device sync)."""
    if kept.already_saved_by is not None:
        return f"whole input, already saved by {kept.already_saved_by}: exact gradient, no extra memory"
    if kept.indices is None:
        return f"all {kept.num_rows} rows (budget covers every row)"
    rows = kept.rows.shape[0]
    where = "shared with the layers reading the same input" if shared else "its own sample"
    return f"{rows}/{kept.num_rows} rows ({rows / max(kept.num_rows, 1):.0%}), {where}"
