"""Count the activation memory autograd keeps for backward, the way PyTorch users measure it on CPU."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class SavedTensors:
    """Context manager recording every tensor autograd saves for backward while it is active.

    Bytes are de-duplicated by storage (a tensor saved by several ops, or views of one buffer, count once)
    and counted at the storage's full size, which is what stays allocated. Parameters are excluded: tensors
    that are ``nn.Parameter`` and any storage of ``exclude`` (e.g. ``model.parameters()``).

    Example::

        with SavedTensors(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        print(saved.nbytes)
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if not isinstance(t, nn.Parameter):
            key = _storage_key(t)
            if key not in self._excluded:
                self._storages[key] = t.untyped_storage().nbytes()
        return t

    def __contains__(self, t: Tensor) -> bool:
        """Whether ``t``'s storage (``t`` itself or any view of its buffer) was saved."""
        return _storage_key(t) in self._storages

    @property
    def nbytes(self) -> int:
        """Total bytes of the distinct storages saved so far."""
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())
