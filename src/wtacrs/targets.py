"""Which linear layers of a model to sample: found from the model's structure, or chosen by name patterns.

The paper samples, in full fine-tuning, each transformer block's attention output projection and its
feed-forward layers (Q/K/V stay exact: they share one input), and with LoRA only the adapters' ``A``
projections. ``resolve_targets`` finds those from the structure, not from per-family name lists:

* blocks: the children of every ``nn.ModuleList`` whose entries are all of one class and hold linear layers
  (``encoder.layer.N``, ``decoder.block.N``, ``model.layers.N``, ``h.N``, ...);
* in a block, attention modules: the outermost submodules whose class name contains ``Attention`` (self- and
  cross-attention); the output projection of each is its last linear layer in registration order, which maps
  back to the block's width (``o``, ``o_proj``, ``out_proj``, ``dense``, ``c_proj``, ``out_lin``, ...);
* the block's other linear layers are its feed-forward layers (``wi``/``wo``, ``fc1``/``fc2``,
  ``gate_proj``/``up_proj``/``down_proj``, ``intermediate.dense``/``output.dense``, ``c_fc``/``c_proj``, ...).

Where that is unsure (a block without an attention module, a last attention linear that does not map back to the
block's width, no blocks at all), the selection carries a note that ``apply_wtacrs`` gives as a warning and
``describe`` lists.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

PRESETS: tuple[str, ...] = ("auto", "full", "lora", "all-linear")

#: PEFT LoRA ``A`` projections: ``...lora_A.<adapter>``.
_LORA_A = re.compile(r"(.*\.)?lora_A\.[^.]+")
#: Modules inside a PEFT LoRA wrapper that are not the wrapped base layer.
_LORA_PARTS = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


@dataclass(frozen=True)
class TargetSelection:
    names: list[str]
    notes: list[str] = field(default_factory=list)  # where the structural detection was unsure


def supported_layer_types() -> tuple[type, ...]:
    """nn.Linear, and transformers' GPT-2 style Conv1D when transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def linear_module_names(model: nn.Module) -> list[str]:
    types = supported_layer_types()
    return [name for name, module in model.named_modules() if isinstance(module, types) and name]


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an ``nn.Linear`` or a ``Conv1D`` (weight (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def resolve_targets(model: nn.Module, targets: str | Sequence[str] = "auto") -> TargetSelection:
    """The linear modules of ``model`` selected by a preset or by name patterns.

    Presets: ``"auto"`` (``"lora"`` in a model with PEFT LoRA adapters, else ``"full"``), ``"full"`` (attention
    output projections and feed-forward layers of every block, found from the structure), ``"lora"`` (PEFT LoRA
    ``A`` projections) and ``"all-linear"``. A pattern selects a module whose name equals it, ends with
    ``"." + pattern``, or fully matches it as a regular expression.
    """
    names = linear_module_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D modules, so there is nothing to sample")
    if not isinstance(targets, str):
        patterns = list(targets)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"targets must be a preset name or a non-empty list of strings; got {targets!r}")
        unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
        if unmatched:
            raise ValueError(_no_match_message(f"target pattern(s) {unmatched}", names))
        return TargetSelection([n for n in names if any(_matches(n, p) for p in patterns)])
    if targets not in PRESETS:
        raise ValueError(
            f"unknown targets preset {targets!r}; use one of {', '.join(map(repr, PRESETS))} or a list of "
            "module-name patterns"
        )
    lora = [n for n in names if _LORA_A.fullmatch(n)]
    if targets == "auto":
        targets = "lora" if lora else "full"
    if targets == "all-linear":
        return TargetSelection(names)
    if targets == "lora":
        if not lora:
            raise ValueError(_no_match_message("preset 'lora' (is this a PEFT LoRA model?)", names))
        return TargetSelection(lora)
    selection = full_finetuning_targets(model)
    if not selection.names:
        raise ValueError(_no_match_message("preset 'full' (" + "; ".join(selection.notes) + ")", names))
    return selection


def full_finetuning_targets(model: nn.Module) -> TargetSelection:
    """Each block's attention output projections and feed-forward linears (see the module docstring)."""
    types = supported_layer_types()
    blocks = _blocks(model, types)
    if not blocks:
        return TargetSelection([], ["found no repeated blocks (an nn.ModuleList of one class holding linear layers)"])
    selected: list[str] = []
    notes: list[str] = []
    for block_name, block in blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, types) and n and not _LORA_PARTS.search(n)]
        width = Counter(_features(m)[1] for _, m in linears).most_common(1)[0][0]
        attention = _outermost(block, lambda m: "Attention" in type(m).__name__)
        in_attention: set[str] = set()
        for att_name, att in attention:
            att_linears = [n for n, m in att.named_modules() if isinstance(m, types) and n and not _LORA_PARTS.search(n)]
            in_attention.update(f"{att_name}.{n}" for n in att_linears)
            if not att_linears:
                continue
            last = f"{att_name}.{att_linears[-1]}"
            out_features = _features(dict(block.named_modules())[last])[1]
            if out_features == width:
                selected.append(f"{block_name}.{last}")
            elif block is blocks[0][1]:
                notes.append(f"the last linear of {type(att).__name__} ({last}) maps to {out_features}, not to the "
                             f"block width {width}: not taken as the attention output projection")
        if not attention and block is blocks[0][1]:
            notes.append(f"no attention module (class name containing 'Attention') in {type(block).__name__}: only "
                         "its feed-forward linears are sampled")
        selected += [f"{block_name}.{n}" for n, _ in linears if n not in in_attention]
    order = {n: i for i, n in enumerate(linear_module_names(model))}
    return TargetSelection(sorted(set(selected), key=order.__getitem__), notes)


def _blocks(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(name, block) for the entries of every ModuleList of one class whose entries hold linear layers."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or isinstance(module[0], types):
            continue
        if any(isinstance(m, types) for m in module[0].modules()):
            found += [(f"{name}.{i}", child) for i, child in enumerate(module)]
    # A ModuleList nested in a block (the experts of a mixture of experts) is part of that block.
    return [(n, b) for n, b in found if not any(n.startswith(other + ".") for other, _ in found)]


def _outermost(module: nn.Module, predicate) -> list[tuple[str, nn.Module]]:
    hits = [(n, m) for n, m in module.named_modules() if n and predicate(m)]
    return [(n, m) for n, m in hits if not any(n.startswith(other + ".") for other, _ in hits)]


def _no_match_message(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return f"{what} matched no linear module of the model; its linear modules are: {shown}"
