"""Lossless compact masks: ReLU and dropout that keep 1 bit per element for backward instead of a full tensor.

Stock PyTorch saves ReLU's whole output (4 bytes per element in fp32) and, for dropout, a mask: a float tensor on
CPU (``F.dropout`` there multiplies by a ``bernoulli_`` noise tensor and autograd keeps the noise) or a bool tensor
on CUDA (``native_dropout``). Backward only needs to know, per element, whether the gradient passes. These ops
save that bit, packed eight to a byte (``wtacrs.kernels.pack_bits``), and give the same numbers as the stock ops:

* ``compact_relu(x)``: forward is ``torch.relu(x)``; backward is ``threshold_backward(grad, relu(x), 0)``, i.e. the
  gradient where the output is not ``<= 0`` (NaN outputs pass it, as in PyTorch) and ``+0.0`` elsewhere.
* ``compact_dropout(x, p, training)``: draws its mask exactly as ``F.dropout`` does on the same device (CPU:
  ``empty_like(x).bernoulli_(1 - p)``, then ``div_(1 - p)``, then ``x * noise``; CUDA/XPU: ``native_dropout``),
  consuming the same random numbers, so with the same seed the outputs and gradients are bit-identical to
  ``nn.Dropout`` / ``F.dropout`` in training mode.

Saved bytes per element: 1/8 instead of 4 (ReLU fp32 output, CPU dropout noise) or 1 (CUDA dropout mask).

``patch_compact_masks(model)`` puts them into a model in place, with no per-call interception:

* modules: every ``nn.ReLU`` (this includes transformers' ``ACT2FN["relu"]``, e.g. T5's ``DenseReluDense.act`` and
  OPT's ``activation_fn``) becomes ``CompactReLU``, every ``nn.Dropout`` (T5, BERT, GPT-2 and OPT dropout modules,
  PEFT LoRA's ``lora_dropout`` entries) becomes ``CompactDropout``; both subclass the originals.
* functional calls: a module whose ``forward`` (or the eager attention function it calls) calls ``dropout`` or
  ``relu`` functionally (the attention-probability dropout of eager attention, OPT's residual dropout) gets a copy
  of that forward in which those calls go to the compact ops (``wtacrs.rebind``).

Left as they are: GELU/SiLU/GELU-tanh and every other activation (not ReLU: their backward needs the input),
``nn.Dropout1d/2d/3d`` and ``AlphaDropout``, ``ReLU6``/``LeakyReLU``, functional calls in other helper functions,
and dropout inside fused kernels such as SDPA (which saves no mask on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import masked_grad, pack_bits, relu_with_mask
from .kernels.dispatch import device_constant
from .rebind import Replacements, calls_any, set_forward

__all__ = [
    "CompactDropout",
    "CompactReLU",
    "compact_dropout",
    "compact_relu",
    "dropout_with_mask",
    "patch_compact_masks",
    "unpatch",
]


class _CompactReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        out, packed = relu_with_mask(x, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(packed)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (packed,) = ctx.saved_tensors
        return masked_grad(grad_out, packed), None


def _dropout_kernel_is_fused(x: Tensor) -> bool:
    """Whether ``F.dropout`` on ``x``'s device runs ``native_dropout`` (ATen's ``is_fused_kernel_acceptable``)."""
    return x.device.type in ("cuda", "xpu", "lazy", "privateuseone")


def _dropout_parts(x: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """``F.dropout(x, p)`` in training, drawn exactly as ATen draws it on ``x``'s device, as ``(out, packed
    keep-mask, kept value)``: ``out = x * unpack(mask) * value``."""
    if _dropout_kernel_is_fused(x):
        out, keep = torch.native_dropout(x, p, True)
        return out, pack_bits(keep), _kept_value(p, torch.float32, x.device)
    # ATen's CPU path (_dropout): noise = bernoulli(1 - p) / (1 - p); out = x * noise.
    noise = torch.empty_like(x).bernoulli_(1.0 - p)  # empty_like keeps x's strides, as ATen's does
    packed = pack_bits(noise)  # 0s and 1s yet
    noise.div_(1.0 - p)
    return x * noise, packed, _kept_value(p, x.dtype, x.device)


@device_constant
def _kept_value(p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``1 / (1 - p)`` as a 0-d tensor, rounded as dropout's ``div_`` rounds it in ``dtype`` (made once)."""
    return torch.ones((), dtype=dtype, device=device).div_(1.0 - p)


class _CompactDropoutFunction(torch.autograd.Function):
    """Returns ``(out, packed keep-mask, kept value)`` of ``_dropout_parts``; the last two need no gradient and let
    an op that needs ``out`` keep ``x`` instead."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float):
        out, packed, value = _dropout_parts(x, p)
        ctx.scale = 1.0 / (1.0 - p) if _dropout_kernel_is_fused(x) else None
        ctx.mark_non_differentiable(packed, value)
        ctx.set_materialize_grads(False)  # no zero gradients made for the mask and value
        ctx.save_for_backward(packed, value)
        return out, packed, value

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, _grad_packed, _grad_value):
        if grad_out is None:
            return None, None
        packed, value = ctx.saved_tensors
        # native_dropout_backward's arithmetic where the mask came from native_dropout; else grad * noise.
        return masked_grad(grad_out, packed, value if ctx.scale is None else ctx.scale), None


def rebuild_dropout(x: Tensor, packed: Tensor, value: Tensor) -> Tensor:
    """``compact_dropout``'s output from its input, packed mask and kept value (bit-identical on CPU)."""
    return masked_grad(x, packed, value)


def compact_relu(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.relu(x, inplace)`` (same values and gradient) that saves a packed 1-bit mask for backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu_(x) if inplace else torch.relu(x)
    return _CompactReLUFunction.apply(x, inplace)


def _check_p(p: float) -> None:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1]; got {p}")


def compact_dropout(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout(x, p, training, inplace)`` that saves a packed 1-bit keep-mask for backward.

    Draws from the same random stream in the same way as ``F.dropout`` on ``x``'s device, so with the same seed
    the output and gradient are bit-identical. ``inplace=True`` writes the result back into ``x`` (as
    ``F.dropout`` does) when ``x`` needs no gradient, and returns a new tensor otherwise.
    """
    _check_p(p)
    if not training or p == 0.0 or p == 1.0 or x.numel() == 0 or not (torch.is_grad_enabled() and x.requires_grad):
        return F.dropout(x, p, training, inplace)
    return _CompactDropoutFunction.apply(x, float(p))[0]


def dropout_with_mask(x: Tensor, p: float, training: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``compact_dropout`` with its packed mask and kept value, ``(out, packed, value)``, so that an op needing
    ``out`` for backward can keep ``x`` and rebuild ``out`` (``rebuild_dropout``); ``(F.dropout(...), None, None)``
    where no mask is drawn. The mask is made even when ``x`` needs no gradient (the op reading ``out`` may)."""
    _check_p(p)
    if not training or p == 0.0 or p == 1.0 or x.numel() == 0:
        return F.dropout(x, p, training), None, None
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _dropout_parts(x, float(p))
    return _CompactDropoutFunction.apply(x, float(p))


class CompactReLU(nn.ReLU):
    """``nn.ReLU`` that keeps a 1-bit mask for backward instead of its output; see ``compact_relu``."""

    def forward(self, x: Tensor) -> Tensor:
        return compact_relu(x, self.inplace)

    @classmethod
    def from_module(cls, module: nn.ReLU) -> "CompactReLU":
        new = cls(inplace=module.inplace)
        new.train(module.training)
        return new


class CompactDropout(nn.Dropout):
    """``nn.Dropout`` that keeps a 1-bit keep-mask for backward; see ``compact_dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        return compact_dropout(x, self.p, self.training, self.inplace)

    @classmethod
    def from_module(cls, module: nn.Dropout) -> "CompactDropout":
        new = cls(p=module.p, inplace=module.inplace)
        new.train(module.training)
        return new


def _functional_dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    return compact_dropout(input, p, training, inplace)


def _functional_relu(input: Tensor, inplace: bool = False) -> Tensor:
    return compact_relu(input, inplace)


def _functional_relu_(input: Tensor) -> Tensor:
    return compact_relu(input, inplace=True)


class CompactFunctions(Replacements):
    """Functional dropout and ReLU calls in a forward's code go to the compact ops."""

    def functions(self) -> dict:
        return {"dropout": _functional_dropout, "relu": _functional_relu, "relu_": _functional_relu_}


#: Names whose functional calls the compact forward copies replace.
FUNCTIONAL_NAMES = {"dropout", "relu", "relu_"}

#: Attribute marking a model with compact masks.
_MARK_ATTR = "_wtacrs_compact_masks"


class ModuleSwap:
    """Undo record of a child module replaced in place."""

    def __init__(self, parent: nn.Module, name: str, old: nn.Module) -> None:
        self.parent, self.name, self.old = parent, name, old

    def undo(self) -> None:
        self.parent._modules[self.name] = self.old


class _Mark:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def undo(self) -> None:
        self.model.__dict__.pop(_MARK_ATTR, None)


def patch_compact_masks(model: nn.Module) -> list:
    """Put compact ReLU and dropout into ``model`` in place (see the module docstring for what is covered).

    Modules that already have an instance forward (``wtacrs.attention`` gives attention modules one that includes
    the compact ops) are left to it. Returns the undo list for ``unpatch``. A model that already has compact masks
    is refused.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    if hasattr(model, _MARK_ATTR):
        raise ValueError("model already has compact masks; call wtacrs.masks.unpatch(undo_list) first")
    undo: list = []
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if type(child) is nn.ReLU:
                new: nn.Module = CompactReLU.from_module(child)
            elif type(child) is nn.Dropout:
                new = CompactDropout.from_module(child)
            else:
                continue
            module._modules[child_name] = new
            undo.append(ModuleSwap(module, child_name, child))
    functions = CompactFunctions()
    for module in model.modules():
        if "forward" not in module.__dict__ and calls_any(type(module).forward, FUNCTIONAL_NAMES):
            undo.append(set_forward(module, functions))
    setattr(model, _MARK_ATTR, True)
    undo.append(_Mark(model))
    return undo


def unpatch(undo_list: list) -> None:
    """Undo ``patch_compact_masks``: the original module objects and forwards are put back."""
    for record in reversed(undo_list):
        record.undo()
