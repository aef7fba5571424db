"""Drop-in layers whose training backward uses the sampled linear op: ``SampledLinear`` for ``nn.Linear`` and
``SampledConv1D`` for GPT-2's ``transformers.pytorch_utils.Conv1D`` (transformers is imported only to convert)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import DEFAULT_FLOOR, apply_sampled_linear, check_floor, check_row_scores, compute_dtype, exact_linear
from .sampler import RowSampler
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, check_min_rows


def _configure(module: nn.Module, budget, method, min_rows, floor, generator) -> None:
    """Check and set the sampling options shared by the sampled layers (plain attributes, not state)."""
    check_budget(budget)
    check_method(method)
    check_floor(floor)
    check_min_rows(min_rows)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    module.budget = float(budget)
    module.method = method
    module.min_rows = min_rows
    module.floor = floor
    module.generator = generator
    # A layer on its own samples through a sampler of its own; apply_wtacrs gives the layers of a model one shared
    # sampler (one sample per shared input, token statistics) and sets the layer's name and stack in it.
    module.sampler = RowSampler()
    module.sampler_name = ""
    module.stack = "encoder"
    module.last_sample = ""  # what the last eager training forward stored, for describe()


def _sampled_forward(module: nn.Module, x: Tensor, row_scores: Tensor | None, transposed: bool) -> Tensor:
    if not (module.training and torch.is_grad_enabled() and module.weight.requires_grad and module.budget < 1.0):
        return exact_linear(x, module.weight, module.bias, transposed)
    if row_scores is not None:
        check_row_scores(row_scores, x)
    sampler: RowSampler = module.sampler
    dtype = compute_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    kept, report = sampler.keep(module, x, row_scores)
    out = apply_sampled_linear(x, module.weight, module.bias, kept, transposed, report)
    sampler.after_forward(module, out)
    return out


class SampledLinear(nn.Linear):
    """``nn.Linear`` that, in training with grad enabled, keeps only sampled input rows for ``grad_weight``.

    Its parameters are named and shaped like ``nn.Linear``'s, so state dicts are interchangeable. In eval mode
    or under ``torch.no_grad()`` it runs plain ``F.linear``. ``forward(x, row_scores)`` takes optional per-row
    estimates of the output-gradient norms (see ``wtacrs.ops.row_probabilities``).
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
        _configure(self, budget, method, min_rows, floor, generator)

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
        _configure(new, budget, method, min_rows, floor, generator)
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
        return _sampled_forward(self, x, row_scores, transposed=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, budget={self.budget}, method={self.method!r}"


class SampledConv1D(nn.Module):
    """GPT-2's ``Conv1D`` (``y = addmm(b, x, W)``, weight (in, out)) with a sampled weight gradient in training.

    Parameters and attributes (``weight``, ``bias``, ``nf``, ``nx``) match ``Conv1D``'s, so state dicts are
    interchangeable; the forward is bit-identical to ``Conv1D``'s. Eval mode or no grad runs the plain product.
    """

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        budget: float = 0.3,
        method: Method = "wta_crs",
        min_rows: int = DEFAULT_MIN_ROWS,
        floor: float = DEFAULT_FLOOR,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)
        _configure(self, budget, method, min_rows, floor, generator)

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        *,
        budget: float = 0.3,
        method: Method = "wta_crs",
        min_rows: int = DEFAULT_MIN_ROWS,
        floor: float = DEFAULT_FLOOR,
        generator: torch.Generator | None = None,
    ) -> "SampledConv1D":
        """A ``SampledConv1D`` sharing ``conv``'s weight and bias (no copy)."""
        from transformers.pytorch_utils import Conv1D

        if not isinstance(conv, Conv1D):
            raise ValueError(f"from_conv1d needs a transformers Conv1D; got {type(conv).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = conv.nf, conv.nx
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        _configure(new, budget, method, min_rows, floor, generator)
        return new

    def to_conv1d(self) -> nn.Module:
        """A plain ``transformers`` ``Conv1D`` sharing this module's parameters."""
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = self.nf, self.nx
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def forward(self, x: Tensor, row_scores: Tensor | None = None) -> Tensor:
        return _sampled_forward(self, x, row_scores, transposed=True)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, budget={self.budget}, method={self.method!r}"
