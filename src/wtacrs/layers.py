"""Drop-in layers whose training backward uses ``sampled_linear``: ``SampledLinear`` for ``nn.Linear`` and
``SampledConv1D`` for GPT-2's ``transformers.pytorch_utils.Conv1D`` (transformers is imported only to convert)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import DEFAULT_FLOOR, check_floor, exact_linear, sampled_linear
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
    # Set by apply_wtacrs: the model's shared RowSampler, this layer's name there, and whether the batch's
    # padding mask applies to this layer's input rows.
    module.sampler = None
    module.sampler_name = ""
    module.padding_aware = False
    module.last_sample = ""  # what the last training forward stored, for describe()


def _sampled_forward(module: nn.Module, x: Tensor, row_scores: Tensor | None, transposed: bool) -> Tensor:
    if not (module.training and torch.is_grad_enabled() and module.weight.requires_grad and module.budget < 1.0):
        return exact_linear(x, module.weight, module.bias, transposed)
    return _sampled_training_forward(module, x, row_scores, transposed)


# Sampling draws a data-dependent number of rows (one host sync) and keeps Python-side state (the shared-sample
# table, describe()'s notes), so torch.compile runs it eagerly: one graph break per sampled layer in training.
# Eval, no-grad and frozen-weight calls stay in the compiled graph.
@torch.compiler.disable
def _sampled_training_forward(module: nn.Module, x: Tensor, row_scores: Tensor | None, transposed: bool) -> Tensor:
    sampler = module.sampler
    kept = None
    if sampler is not None:
        kept = sampler.keep(module, x)
    out = sampled_linear(
        x, module.weight, module.bias, module.budget, module.method, row_scores, module.generator,
        min_rows=module.min_rows, floor=module.floor, kept=kept, transposed=transposed,
    )
    if sampler is not None:
        sampler.after_forward(module, out)
    return out


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
