"""One sample of the input rows for the LoRA ``A`` projections that read it through dropout.

With LoRA dropout > 0, PEFT computes ``lora_B(lora_A(dropout(x)))`` for each adapted layer, each with its own
dropout: q, k and v's ``A`` projections read three different tensors made from one ``x``. Sampling each on its own
stores three samples of rows of x's size. Here each such dropout is a compact dropout (1-bit mask, bit-identical
to ``nn.Dropout``; ``wtacrs.masks``) that tells the sampler which ``x`` and mask its output came from; the ``A``
projection then keeps rows of ``x`` itself (one shared sample for all adapters reading ``x``) and, in backward,
rebuilds its rows of ``dropout(x)`` from them and the rows of its dropout's mask, which the dropout saves for its
own backward anyway. Stored for three adapters: one sample of x's rows instead of three.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .masks import CompactDropout, dropout_with_mask

if TYPE_CHECKING:
    from .sampler import RowSampler

#: ``<parent>.lora_A.<adapter>`` -> the adapter's dropout is ``<parent>.lora_dropout.<adapter>``.
_LORA_A = re.compile(r"(?P<parent>.*)\.lora_A\.(?P<adapter>[^.]+)")


class LoraDropout(CompactDropout):
    """A LoRA adapter's dropout that tells the model's sampler where its output came from."""

    def __init__(self, p: float, sampler: "RowSampler") -> None:
        super().__init__(p=p)
        self.sampler = sampler

    def forward(self, x: Tensor) -> Tensor:
        out, packed, value = dropout_with_mask(x, self.p, self.training)
        if packed is not None:
            self.sampler.note_dropout(out, x, packed, value)
        return out


class _Swap:
    def __init__(self, parent: nn.ModuleDict, key: str, old: nn.Module) -> None:
        self.parent, self.key, self.old = parent, key, old

    def undo(self) -> None:
        self.parent[self.key] = self.old


def share_through_lora_dropout(model: nn.Module, sampled_names: list[str], sampler: "RowSampler") -> list[_Swap]:
    """Give every sampled ``lora_A.<adapter>`` whose dropout is a plain ``nn.Dropout`` with p > 0 a ``LoraDropout``;
    returns the undo records."""
    modules = dict(model.named_modules())
    swaps = []
    for name in sampled_names:
        match = _LORA_A.fullmatch(name)
        dropouts = getattr(modules.get(match.group("parent")) if match else None, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        adapter = match.group("adapter")
        old = dropouts[adapter] if adapter in dropouts else None
        if type(old) is nn.Dropout and old.p > 0 and not old.inplace:
            new = LoraDropout(old.p, sampler)
            new.train(old.training)
            dropouts[adapter] = new
            swaps.append(_Swap(dropouts, adapter, old))
    return swaps
