"""Lossless compact masks: ReLU and dropout that keep 1 bit per element for backward instead of a full tensor.

Stock PyTorch saves ReLU's whole output (4 bytes per element in fp32) and, for dropout, a mask: a float tensor on
CPU (``F.dropout`` there multiplies by a ``bernoulli_`` noise tensor and autograd keeps the noise) or a bool tensor
on CUDA (``native_dropout``). Backward only needs to know, per element, whether the gradient passes. These ops
save that bit, packed eight to a byte (``pack_bits``), and give the same numbers as the stock ops:

* ``compact_relu(x)``: forward is ``torch.relu(x)``; backward is ``threshold_backward(grad, relu(x), 0)``, i.e. the
  gradient where the output is not ``<= 0`` (NaN outputs pass it, as in PyTorch) and ``+0.0`` elsewhere.
* ``compact_dropout(x, p, training)``: draws its mask exactly as ``F.dropout`` does on the same device (CPU:
  ``empty_like(x).bernoulli_(1 - p)``, then ``div_(1 - p)``, then ``x * noise``; CUDA/XPU: ``native_dropout``),
  consuming the same random numbers, so with the same seed the outputs and gradients are bit-identical to
  ``nn.Dropout`` / ``F.dropout`` in training mode.

Saved bytes per element: 1/8 instead of 4 (ReLU fp32 output, CPU dropout noise) or 1 (CUDA dropout mask).

``patch_compact_masks(model)`` puts them into a model in place:

* modules: every ``nn.ReLU`` (this includes transformers' ``ACT2FN["relu"]``, e.g. T5's ``DenseReluDense.act`` and
  OPT's ``activation_fn``) becomes ``CompactReLU``, every ``nn.Dropout`` (T5, BERT, GPT-2 and OPT dropout modules,
  PEFT LoRA's ``lora_dropout`` entries) becomes ``CompactDropout``; both subclass the originals.
* functional calls made during the model's forward: ``F.dropout`` (the attention-probability dropout inside every
  eager attention function, OPT's residual dropout), ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` and their
  in-place forms, through a ``TorchFunctionMode`` that is active only while the model's forward runs.

Left as they are: GELU/SiLU/GELU-tanh and every other activation (not ReLU: their backward needs the input),
``nn.Dropout1d/2d/3d`` and ``AlphaDropout``, ``ReLU6``/``LeakyReLU``, and dropout inside fused kernels such as SDPA
(which saves no mask). Gradient checkpointing recomputes a layer's own ``forward`` without module hooks, so
functional calls made directly in such a layer's ``forward`` body run the stock ops (in the forward too, where a
checkpointed layer saves nothing anyway, so that both passes save the same tensors); the modules it calls keep
using the compact ops.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "CompactDropout",
    "CompactReLU",
    "compact_dropout",
    "compact_relu",
    "dropout_rebuilder",
    "pack_bits",
    "patch_compact_masks",
    "unpack_bits",
    "unpatch",
]


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (element ``8*i + j`` is bit ``j`` of byte ``i``).

    The last byte is zero-padded; ``unpack_bits(pack_bits(m), m.numel()).view(m.shape)`` equals ``m``.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    # Each group of 8 bytes (0 or 1) read as one little-endian int64 has byte j at bit 8j; multiplying by
    # sum_j 2**(56 - 7j) moves byte j's bit to bit 56 + j without carries, so bits 56..63 are the packed byte.
    # One vectorised multiply instead of eight strided shifts and ORs (little-endian, as every PyTorch platform).
    words = flat.view(torch.int64)
    return ((words * 0x0102040810204080) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The flat bool tensor of ``numel`` elements that ``pack_bits`` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


class _CompactReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        out = torch.relu_(x) if inplace else torch.relu(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.shape = out.shape
        # ~(out <= 0), not out > 0: threshold_backward lets the gradient through where the output is NaN.
        ctx.save_for_backward(pack_bits(~(out <= 0)))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (packed,) = ctx.saved_tensors
        passes = unpack_bits(packed, grad_out.numel()).view(ctx.shape)
        return torch.where(passes, grad_out, 0.0), None


#: Attribute of a compact dropout output holding ``(input, saved tensors, rebuild)``; see ``dropout_rebuilder``.
_PARTS_ATTR = "_wtacrs_dropout_parts"


def _dropout_kernel_is_fused(x: Tensor) -> bool:
    """Whether ``F.dropout`` on ``x``'s device runs ``native_dropout`` (ATen's ``is_fused_kernel_acceptable``)."""
    return x.device.type in ("cuda", "xpu", "lazy", "privateuseone")


class _CompactDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        ctx.shape = x.shape
        if _dropout_kernel_is_fused(x):
            out, keep = torch.native_dropout(x, p, True)
            ctx.scale = 1.0 / (1.0 - p)
            ctx.fused = True
            ctx.parts = (pack_bits(keep),)
            ctx.save_for_backward(*ctx.parts)
            return out
        # ATen's CPU path (_dropout): noise = bernoulli(1 - p) / (1 - p); out = x * noise.
        noise = torch.empty_like(x).bernoulli_(1.0 - p)  # empty_like keeps x's strides, as ATen's does
        noise.div_(1.0 - p)
        out = x * noise
        ctx.fused = False
        # The kept value of noise, bit for bit as div_ rounded it (0 if nothing was kept: never used then).
        ctx.parts = (pack_bits(noise != 0), noise.max().reshape(()))
        ctx.save_for_backward(*ctx.parts)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        packed, *rest = ctx.saved_tensors
        keep = unpack_bits(packed, grad_out.numel()).view(ctx.shape)
        if ctx.fused:
            return torch.ops.aten.native_dropout_backward(grad_out, keep, ctx.scale), None
        (kept_value,) = rest
        noise = keep.to(grad_out.dtype) * kept_value
        return grad_out * noise, None


def dropout_rebuilder(t: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Callable[..., Tensor]] | None:
    """For ``t = compact_dropout(x, ...)``: ``(x, tensors, rebuild)`` with the tensors that dropout saved and
    ``rebuild(x, *tensors) == t`` (bit-identical on CPU), so another op that needs ``t`` for backward can keep
    nothing more than ``x``. ``None`` when ``t`` is not a compact dropout output.

    The parts ride on ``t`` itself (not read back from the graph, which under gradient checkpointing would
    trigger a recomputation), so they live exactly as long as ``t``.
    """
    return getattr(t, _PARTS_ATTR, None)


def _rebuild_fused(x: Tensor, packed: Tensor, *, scale: float) -> Tensor:
    return x * unpack_bits(packed, x.numel()).view(x.shape).to(x.dtype) * scale


def _rebuild_unfused(x: Tensor, packed: Tensor, kept_value: Tensor) -> Tensor:
    return x * (unpack_bits(packed, x.numel()).view(x.shape).to(x.dtype) * kept_value)


def compact_relu(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.relu(x, inplace)`` (same values and gradient) that saves a packed 1-bit mask for backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu_(x) if inplace else torch.relu(x)
    return _CompactReLUFunction.apply(x, inplace)


def compact_dropout(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout(x, p, training, inplace)`` that saves a packed 1-bit keep-mask for backward.

    Draws from the same random stream in the same way as ``F.dropout`` on ``x``'s device, so with the same seed
    the output and gradient are bit-identical. ``inplace=True`` writes the result back into ``x`` (as
    ``F.dropout`` does) when ``x`` needs no gradient, and returns a new tensor otherwise.
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1]; got {p}")
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if not training or p == 0.0 or p == 1.0 or x.numel() == 0 or not needs_grad:
        return F.dropout(x, p, training, inplace)
    out = _CompactDropoutFunction.apply(x, float(p))
    node = out.grad_fn
    rebuild = partial(_rebuild_fused, scale=node.scale) if node.fused else _rebuild_unfused
    setattr(out, _PARTS_ATTR, (x, node.parts, rebuild))
    del node.parts  # the node keeps its saved tensors only through save_for_backward
    return out


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


#: Attribute of a patched model holding its functional-call mode (marks the model as patched).
_MODE_ATTR = "_wtacrs_compact_masks_mode"

_RELU = (F.relu, torch.relu, Tensor.relu)
_RELU_INPLACE = (F.relu_, torch.relu_, Tensor.relu_)


class _CompactMasksMode(TorchFunctionMode):
    """Routes functional ReLU and dropout calls to the compact ops while a patched model's forward runs.

    Every module call pushes whether its own ``forward`` body may use the compact ops, and pops it on return; the
    mode is entered by the outermost call. A layer that checkpoints itself (transformers'
    ``GradientCheckpointingLayer`` with checkpointing on) recomputes its ``forward`` body without hooks, so there
    the stock ops run in both passes and the saved tensors of forward and recomputation agree (the checkpoint
    checks that); the modules it calls still use the compact ops in both.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and self.active[-1]:
            if func is F.dropout:
                return compact_dropout(*args, **kwargs)
            if func in _RELU:
                return compact_relu(*args, **kwargs)
            if func in _RELU_INPLACE:
                return compact_relu(args[0], inplace=True)
        return func(*args, **kwargs)


def _checkpoints_itself(module: nn.Module) -> bool:
    return (
        bool(getattr(module, "gradient_checkpointing", False)) and module.training and torch.is_grad_enabled()
        and any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)
    )


def _enter(mode: _CompactMasksMode, module: nn.Module, *_inputs) -> None:
    if not mode.active:
        mode.__enter__()
    mode.active.append(not _checkpoints_itself(module))


def _leave(mode: _CompactMasksMode, *_module_inputs_outputs) -> None:
    mode.active.pop()
    if not mode.active:
        mode.__exit__(None, None, None)


class _ModuleSwap:
    def __init__(self, parent: nn.Module, name: str, old: nn.Module) -> None:
        self.parent, self.name, self.old = parent, name, old

    def undo(self) -> None:
        self.parent._modules[self.name] = self.old


class _Hooks:
    def __init__(self, model: nn.Module, handles: list) -> None:
        self.model, self.handles = model, handles

    def undo(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.__dict__.pop(_MODE_ATTR, None)


def patch_compact_masks(model: nn.Module) -> list[tuple[str, object]]:
    """Put compact ReLU and dropout into ``model`` in place (see the module docstring for what is covered).

    Returns the undo list for ``unpatch``: ``(module name, record)`` pairs; module swaps first, then the hooks
    that scope the functional-call mode (name ``""``). A model that already has compact masks is refused.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    if hasattr(model, _MODE_ATTR):
        raise ValueError("model already has compact masks; call wtacrs.masks.unpatch(undo_list) first")
    undo: list[tuple[str, object]] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module._modules.items()):
            if type(child) is nn.ReLU:
                new: nn.Module = CompactReLU.from_module(child)
            elif type(child) is nn.Dropout:
                new = CompactDropout.from_module(child)
            else:
                continue
            module._modules[child_name] = new
            undo.append((f"{name}.{child_name}" if name else child_name, _ModuleSwap(module, child_name, child)))
    mode = _CompactMasksMode()
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(partial(_enter, mode)))
        handles.append(module.register_forward_hook(partial(_leave, mode), always_call=True))
    setattr(model, _MODE_ATTR, mode)
    undo.append(("", _Hooks(model, handles)))
    return undo


def unpatch(undo_list: list[tuple[str, object]]) -> None:
    """Undo ``patch_compact_masks``: the original module objects are put back and the hooks removed."""
    for _name, record in reversed(undo_list):
        record.undo()
