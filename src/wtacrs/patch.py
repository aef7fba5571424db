"""``apply_wtacrs`` / ``remove_wtacrs`` / ``describe``: sample the chosen linear layers of a model in place.

Every check runs before the model is touched, so a failure never leaves it half patched. The swapped-in layers
share the original parameters under the same names, so ``state_dict()`` keys and values do not change, and
``remove_wtacrs`` puts the original module objects back.
"""

from __future__ import annotations

import re
import warnings
from functools import partial
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .distributed import check_patchable, unwrap
from .gradcache import GradNormCache
from .gradstats import TokenGradStats
from .layers import SampledConv1D, SampledLinear
from .ops import DEFAULT_FLOOR, check_floor
from .sampler import RowSampler
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, check_min_rows
from .targets import resolve_targets

#: Batch key that carries example ids to the patched model (see ``wtacrs.hf.ExampleIdCollator``); the patched
#: model's forward pre-hook removes it before the model sees its arguments.
EXAMPLE_IDS_KEY = "wtacrs_example_ids"

_STATE_ATTR = "_wtacrs_state"


PROBS = ("tokens", "activations")


@dataclass(frozen=True)
class WtacrsConfig:
    budget: float
    method: str
    targets: str | tuple[str, ...]
    probs: str
    min_rows: int
    floor: float
    share_inputs: bool
    compact_masks: bool
    sample_attention: bool


@dataclass
class _PatchState:
    config: WtacrsConfig
    sampler: RowSampler
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list)  # parent, attr, old, new
    target_notes: list[str] = field(default_factory=list)
    masks_undo: list | None = None
    attention_undo: object = None
    lora_undo: list = field(default_factory=list)


def apply_wtacrs(
    model: nn.Module,
    budget: float = 0.3,
    targets: str | Sequence[str] = "auto",
    method: Method = "wta_crs",
    *,
    probs: str | GradNormCache = "tokens",
    min_rows: int = DEFAULT_MIN_ROWS,
    floor: float = DEFAULT_FLOOR,
    share_inputs: bool = True,
    compact_masks: bool = True,
    sample_attention: bool = False,
) -> nn.Module:
    """Replace the target linear layers of ``model`` by sampled ones, in place; returns ``model``.

    Args:
        budget: fraction of each layer's input rows kept for its weight gradient, in (0, 1].
        targets: ``"auto"`` (PEFT LoRA ``A`` projections in a LoRA model, else ``"full"``), ``"full"`` (the
            paper's full fine-tuning targets, found from the model's structure: each block's attention output
            projection and feed-forward layers), ``"lora"``, ``"all-linear"``, or a list of module-name patterns.
        method: ``"wta_crs"``, ``"crs"``, ``"uniform"`` or ``"topk"`` (biased; ablation only).
        probs: how rows are weighted: ``"tokens"`` (default: ``||x_i||`` times running output-gradient norms of
            the row's token, ``wtacrs.gradstats``), ``"activations"`` (``||x_i||`` alone), or a
            ``GradNormCache`` (the paper's per-example cache; batches must carry example ids, see
            ``wtacrs.hf.ExampleIdCollator``). Gradient estimates are always mixed with ``||x_i||`` by ``floor``,
            so the estimate stays unbiased for any loss.
        share_inputs: consecutive layers reading the same input tensor keep one shared sample of its rows; with
            ``compact_masks`` also the LoRA ``A`` projections that read it through their own dropouts
            (``wtacrs.lora``).
        compact_masks: ReLU and dropout keep 1-bit masks instead of full tensors (lossless: the same values and
            gradients; ``wtacrs.masks``).
        sample_attention: also sample the two attention matmuls (QKᵀ and attn·V) at ``budget``, the paper's
            "level 2". This approximates activation gradients too (unbiased, more variance) and switches the
            model to eager attention (``wtacrs.attention``).

    A NaN or Inf in a sampled layer's input makes that step's weight gradients NaN (as without sampling), and
    ``loss.backward()`` raises ``wtacrs.NonFiniteInputError``: in that step on CPU, in the next one on CUDA, where
    the check reads a copy that has landed instead of waiting for the device (``wtacrs.health``).

    Applying again with the same settings does nothing; with other settings it is an error (call
    ``remove_wtacrs`` first).
    """
    check_budget(budget)
    check_method(method)
    check_min_rows(min_rows)
    check_floor(floor)
    if not isinstance(probs, GradNormCache) and probs not in PROBS:
        raise ValueError(
            f"probs must be one of {', '.join(map(repr, PROBS))} or a wtacrs.GradNormCache; got {probs!r}"
        )
    config = WtacrsConfig(
        float(budget), method, targets if isinstance(targets, str) else tuple(targets),
        "gradcache" if isinstance(probs, GradNormCache) else probs, min_rows, float(floor), bool(share_inputs),
        bool(compact_masks), bool(sample_attention),
    )
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is not None:
        if state.config == config and (state.sampler.grad_cache is probs or not isinstance(probs, GradNormCache)):
            return model
        raise ValueError(
            f"model is already patched with {state.config}; call wtacrs.remove_wtacrs(model) before applying "
            "other settings"
        )
    check_patchable(model)
    selection = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    already = [n for n in selection.names if isinstance(modules[n], (SampledLinear, SampledConv1D))]
    if already:
        raise ValueError(f"modules {already} are already sampled layers; pass plain nn.Linear / Conv1D modules")

    stats = None
    if probs == "tokens":
        embeddings = _input_embeddings(model)
        stats = TokenGradStats(embeddings.num_embeddings, floor) if embeddings is not None else None
    sampler = RowSampler(share_inputs, stats, probs if isinstance(probs, GradNormCache) else None)
    state = _PatchState(config, sampler, target_notes=list(selection.notes))
    config_of_model = getattr(unwrap(model), "config", None)  # a DDP wrapper has no config; its module does
    encoder_decoder = bool(getattr(config_of_model, "is_encoder_decoder", False))
    settings = dict(budget=budget, method=method, min_rows=min_rows, floor=floor)
    for name in selection.names:
        old = modules[name]
        new = (
            SampledLinear.from_linear(old, **settings)
            if isinstance(old, nn.Linear)
            else SampledConv1D.from_conv1d(old, **settings)
        )
        new.sampler = sampler
        new.sampler_name = name
        new.stack = "decoder" if encoder_decoder and re.search(r"(^|\.)decoder\.", name) else "encoder"
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        state.swaps.append((parent, attr, old, new))
    if sample_attention:  # first: it is the one step that can still refuse the model
        from .attention import patch_attention

        state.attention_undo = patch_attention(model, budget, method, min_rows=min_rows,
                                               compact_dropout=compact_masks, health=sampler.health)
    if compact_masks and share_inputs:
        from .lora import share_through_lora_dropout

        state.lora_undo = share_through_lora_dropout(model, selection.names, sampler)
    if compact_masks:
        from .masks import patch_compact_masks

        state.masks_undo = patch_compact_masks(model)
    for parent, attr, _old, new in state.swaps:
        setattr(parent, attr, new)
    model.register_forward_pre_hook(_begin_batch, with_kwargs=True)
    setattr(model, _STATE_ATTR, state)
    for note in selection.notes:
        warnings.warn(f"wtacrs.apply_wtacrs: {note}", stacklevel=2)
    return model


def _input_embeddings(model: nn.Module) -> nn.Embedding | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    return embeddings if isinstance(embeddings, nn.Embedding) else None


def _begin_batch(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: hand the batch's token ids (per stack) and example ids to the model's sampler.

    It reads the state from the model it is called on, so a deep copy of a patched model uses its own sampler.
    """
    example_ids = kwargs.pop(EXAMPLE_IDS_KEY, None)
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        ids = args[0]
    decoder_ids = kwargs.get("decoder_input_ids")
    labels = kwargs.get("labels")
    if decoder_ids is None and isinstance(labels, Tensor) and labels.dim() == 2:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare) and getattr(getattr(unwrap(model), "config", None), "is_encoder_decoder", False):
            decoder_ids = partial(prepare, labels=labels)  # made when a decoder layer first needs them
    sampler = getattr(model, _STATE_ATTR).sampler
    if isinstance(ids, Tensor) and model.training and torch.is_grad_enabled():
        sampler.probe(ids.device)  # made here, before any sampled layer runs (see RowSampler._new_probe)
    sampler.begin_batch(
        ids if isinstance(ids, Tensor) else None,
        decoder_ids if isinstance(decoder_ids, (Tensor, partial)) else None,
        example_ids,
    )
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
    for swap in reversed(state.lora_undo):
        swap.undo()
    if state.attention_undo is not None:
        state.attention_undo.undo()
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
        f"row probabilities: {cfg.probs}",
        f"compact ReLU/dropout masks: {cfg.compact_masks}",
        f"attention sampling: {cfg.sample_attention}",
    ]
    notes = [f"unsure: {note}" for note in state.target_notes]
    return "\n".join(lines + ["", "; ".join(extras), *notes])
