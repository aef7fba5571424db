"""``apply_wtacrs`` / ``remove_wtacrs`` / ``describe``: sample the chosen linear layers of a model in place.

Every check runs before the model is touched, so a failure never leaves it half patched. The swapped-in layers
share the original parameters under the same names, so ``state_dict()`` keys and values do not change, and
``remove_wtacrs`` puts the original module objects back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .distributed import check_patchable, unwrap
from .gradcache import GradNormCache
from .layers import SampledConv1D, SampledLinear
from .ops import DEFAULT_FLOOR
from .sampler import RowSampler
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method
from .targets import resolve_targets

#: Batch key that carries example ids to the patched model (see ``wtacrs.hf.ExampleIdCollator``); the patched
#: model's forward pre-hook removes it before the model sees its arguments.
EXAMPLE_IDS_KEY = "wtacrs_example_ids"

_STATE_ATTR = "_wtacrs_state"


@dataclass(frozen=True)
class WtacrsConfig:
    budget: float
    method: str
    targets: str | tuple[str, ...]
    min_rows: int
    floor: float
    share_inputs: bool
    padding_aware: bool
    grad_cache: bool
    compact_masks: bool
    sample_attention: bool


@dataclass
class _PatchState:
    config: WtacrsConfig
    sampler: RowSampler
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list)  # parent, attr, old, new
    masks_undo: list | None = None
    attention_undo: object = None


def apply_wtacrs(
    model: nn.Module,
    budget: float = 0.3,
    targets: str | Sequence[str] = "full",
    method: Method = "wta_crs",
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    floor: float = DEFAULT_FLOOR,
    share_inputs: bool = True,
    padding_aware: bool = True,
    grad_cache: GradNormCache | None = None,
    compact_masks: bool = False,
    sample_attention: bool = False,
) -> nn.Module:
    """Replace the target linear layers of ``model`` by sampled ones, in place; returns ``model``.

    Args:
        budget: fraction of each layer's input rows kept for its weight gradient, in (0, 1].
        targets: ``"full"`` (the paper's full fine-tuning targets: attention output and FFN projections),
            ``"lora"`` (PEFT LoRA ``A`` projections), ``"all-linear"``, or a list of module-name patterns.
        method: ``"wta_crs"``, ``"crs"``, ``"uniform"`` or ``"topk"`` (biased; ablation only).
        share_inputs: layers reading the same input tensor keep one shared sample of its rows.
        padding_aware: rows where the ``attention_mask`` passed to ``model(...)`` is 0 are never kept (their
            gradient is exactly zero). Applies to encoder or decoder-only stacks, not to the decoder of an
            encoder-decoder model.
        grad_cache: a ``GradNormCache`` to weight rows by cached output-gradient norms; the batch must carry
            example ids under ``EXAMPLE_IDS_KEY`` (see ``wtacrs.hf.ExampleIdCollator``).
        compact_masks: ReLU and dropout keep 1-bit masks instead of full tensors (lossless; ``wtacrs.masks``).
        sample_attention: also sample the two attention matmuls (QKᵀ and attn·V) at ``budget``, the paper's
            "level 2". This approximates activation gradients too (unbiased, more variance) and switches the
            model to eager attention (``wtacrs.attention``).

    Applying again with the same settings does nothing; with other settings it is an error (call
    ``remove_wtacrs`` first).
    """
    check_budget(budget)
    check_method(method)
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1; got {min_rows}")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor must be in (0, 1] so that every non-zero row can be drawn; got {floor}")
    if grad_cache is not None and not isinstance(grad_cache, GradNormCache):
        raise ValueError(f"grad_cache must be a wtacrs.GradNormCache; got {type(grad_cache).__name__}")
    config = WtacrsConfig(
        float(budget), method, targets if isinstance(targets, str) else tuple(targets), min_rows, float(floor),
        share_inputs, padding_aware, grad_cache is not None, bool(compact_masks), bool(sample_attention),
    )
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is not None:
        if state.config == config and state.sampler.grad_cache is grad_cache:
            return model
        raise ValueError(
            f"model is already patched with {state.config}; call wtacrs.remove_wtacrs(model) before applying "
            "other settings"
        )
    check_patchable(model)
    names = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    already = [n for n in names if isinstance(modules[n], (SampledLinear, SampledConv1D))]
    if already:
        raise ValueError(f"modules {already} are already sampled layers; pass plain nn.Linear / Conv1D modules")

    sampler = RowSampler(share_inputs, grad_cache)
    state = _PatchState(config, sampler)
    config_of_model = getattr(unwrap(model), "config", None)  # a DDP wrapper has no config; its module does
    encoder_decoder = bool(getattr(config_of_model, "is_encoder_decoder", False))
    settings = dict(budget=budget, method=method, min_rows=min_rows, floor=floor)
    for name in names:
        old = modules[name]
        new = (
            SampledLinear.from_linear(old, **settings)
            if isinstance(old, nn.Linear)
            else SampledConv1D.from_conv1d(old, **settings)
        )
        new.sampler = sampler
        new.sampler_name = name
        new.padding_aware = padding_aware and not (encoder_decoder and re.search(r"(^|\.)decoder\.", name))
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        state.swaps.append((parent, attr, old, new))
    if sample_attention:  # first: it is the one step that can still refuse the model (no eager attention)
        from .attention import patch_attention_sampling

        state.attention_undo = patch_attention_sampling(model, budget, method, min_rows=min_rows)
    if compact_masks:
        from .masks import patch_compact_masks

        state.masks_undo = patch_compact_masks(model)
    for parent, attr, _old, new in state.swaps:
        setattr(parent, attr, new)
    model.register_forward_pre_hook(_begin_batch, with_kwargs=True)
    setattr(model, _STATE_ATTR, state)
    return model


def _begin_batch(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: hand the batch's example ids and padding mask to the model's sampler.

    It reads the state from the model it is called on, so a deep copy of a patched model uses its own sampler.
    """
    example_ids = kwargs.pop(EXAMPLE_IDS_KEY, None)
    mask = kwargs.get("attention_mask")
    getattr(model, _STATE_ATTR).sampler.begin_batch(example_ids, mask if isinstance(mask, Tensor) else None)
    return args, kwargs


def remove_wtacrs(model: nn.Module) -> nn.Module:
    """Undo ``apply_wtacrs``: the original module objects return; returns ``model``."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not patched by wtacrs.apply_wtacrs; nothing to remove")
    for parent, attr, old, _new in reversed(state.swaps):
        setattr(parent, attr, old)
    if state.masks_undo is not None:
        from .masks import unpatch

        unpatch(state.masks_undo)
    if state.attention_undo is not None:
        from .attention import unpatch

        unpatch(state.attention_undo)
    # Found by value rather than through a handle, which a deep copy of the model would not carry over.
    for hook_id, hook in list(model._forward_pre_hooks.items()):
        if hook is _begin_batch:
            del model._forward_pre_hooks[hook_id]
            model._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    delattr(model, _STATE_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def describe(model: nn.Module) -> str:
    """A table of the sampled layers: name, budget, method, and what each stored in its last training forward."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return "not patched by wtacrs"
    cfg = state.config
    rows = [("module", "layer", "budget", "method", "stores for grad_weight (last training step)")]
    for _parent, _attr, _old, new in state.swaps:
        if not new.weight.requires_grad:
            stores = "nothing: frozen weight"
        else:
            stores = new.last_sample or "not run in training yet"
        rows.append((new.sampler_name, type(new).__name__, f"{cfg.budget:g}", cfg.method, stores))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extras = [
        f"{len(state.swaps)} sampled layers",
        f"one sample per shared input: {cfg.share_inputs}",
        f"padding-aware: {cfg.padding_aware}",
        f"gradient-norm cache: {cfg.grad_cache}",
        f"compact ReLU/dropout masks: {cfg.compact_masks}",
        f"attention sampling: {cfg.sample_attention}",
    ]
    return "\n".join(lines + ["", "; ".join(extras)])
