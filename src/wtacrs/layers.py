"""``SampledLinear``: a drop-in ``nn.Linear`` whose training backward uses ``sampled_linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import DEFAULT_FLOOR, sampled_linear
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method


class SampledLinear(nn.Linear):
    """``nn.Linear`` that, in training with grad enabled, keeps only sampled input rows for ``grad_weight``.

    Its parameters are named and shaped like ``nn.Linear``'s, so state dicts are interchangeable. In eval mode
    or under ``torch.no_grad()`` it runs plain ``F.linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        budget: float = 0.3,
        method: Method = "wta_crs",
        min_rows: int = DEFAULT_MIN_ROWS,
        floor: float = DEFAULT_FLOOR,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._configure(budget, method, min_rows, floor, generator)

    def _configure(self, budget, method, min_rows, floor, generator) -> None:
        check_budget(budget)
        check_method(method)
        self.budget = float(budget)
        self.method = method
        self.min_rows = min_rows
        self.floor = floor
        self.generator = generator

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        budget: float = 0.3,
        method: Method = "wta_crs",
        min_rows: int = DEFAULT_MIN_ROWS,
        floor: float = DEFAULT_FLOOR,
        generator: torch.Generator | None = None,
    ) -> "SampledLinear":
        """A ``SampledLinear`` sharing ``linear``'s weight and bias (no copy; training one trains the other)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear; got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new._configure(budget, method, min_rows, floor, generator)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this module's parameters."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def forward(self, x: Tensor, row_scores: Tensor | None = None) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        return sampled_linear(
            x, self.weight, self.bias, self.budget, self.method, row_scores, self.generator,
            min_rows=self.min_rows, floor=self.floor,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, budget={self.budget}, method={self.method!r}"
