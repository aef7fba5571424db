"""NaN and Inf in sampled inputs, found without a device sync and reported as a clear error.

Sampling must not read values back to the host in a training step (each read stalls the GPU), yet a NaN or Inf in
a sampled layer's input must not go unnoticed. So each sampled call adds the sum of its row weights to a small
device counter per layer (a non-finite input makes the counter non-finite, and it stays so), and makes the kept
rows' scales NaN, so that the weight gradient of that step is NaN, as it is without sampling. ``Health.check``
reads the counters where reading costs nothing: on CPU directly, on CUDA from a copy that the previous check
queued and that has landed by then (checked with an event, never waited for). The sampler checks when a backward
is done with its layers (``wtacrs.sampler``), so ``loss.backward()`` raises ``NonFiniteInputError`` in the step
whose input was bad on CPU, before the optimizer step, and in the next step on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteInputError(FloatingPointError):
    """A sampled layer's input held NaN or Inf in an earlier training step."""


class Health:
    """Non-finite-input counters of a set of sampled layers (one per layer name), checked together."""

    def __init__(self) -> None:
        self.counters: dict[str, Tensor] = {}
        self._queued: tuple[list[str], Tensor, torch.cuda.Event] | None = None

    def counter(self, name: str, device: torch.device) -> Tensor:
        """The 0-d float32 counter a layer adds its row-weight sums to (created on first use, on ``device``)."""
        counter = self.counters.get(name)
        if counter is None or counter.device != device:
            counter = self.counters[name] = torch.zeros((), dtype=torch.float32, device=device)
        return counter

    def check(self) -> None:
        """Raise ``NonFiniteInputError`` if a counter read now is not finite. Never waits for the device."""
        if not self.counters:
            return
        names = list(self.counters)
        if all(self.counters[n].device.type == "cpu" for n in names):
            self._raise_if_bad(names, torch.stack([self.counters[n] for n in names]).tolist())  # one read
            return
        if self._queued is not None:
            queued_names, host, event = self._queued
            if not event.query():  # the copy has not landed yet: look again at the next check
                return
            self._queued = None
            self._raise_if_bad(queued_names, host.numpy().tolist())
        device = self.counters[names[0]].device  # a model spread over devices gathers its counters on one
        values = torch.stack([self.counters[n].to(device) for n in names])
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._queued = (names, host, event)

    def reset(self) -> None:
        for counter in self.counters.values():
            counter.zero_()
        self._queued = None

    def _raise_if_bad(self, names: list[str], values: list[float]) -> None:
        bad = [n or "<layer>" for n, v in zip(names, values) if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            self.reset()  # report each incident once
            raise NonFiniteInputError(
                f"the input of sampled layer(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} held NaN or Inf "
                "(or their row_scores were NaN, Inf or negative) in an earlier training step, so that step's weight "
                "gradient is NaN; look for an overflow in the forward (a learning rate too large, fp16 without loss "
                "scaling) or bad input data, and restore the weights from before it"
            )
