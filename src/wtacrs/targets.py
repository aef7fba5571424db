"""Which linear layers of a model to sample: found from the model's structure, or chosen by name patterns.

The paper samples, in full fine-tuning, each transformer block's attention output projection and its
feed-forward layers (Q/K/V stay exact: they share one input), and with LoRA only the adapters' ``A``
projections. ``resolve_targets`` finds those from the structure, not from per-family name lists:

* blocks: the children of every ``nn.ModuleList`` whose entries are all of one class and hold linear layers
  (``encoder.layer.N``, ``decoder.block.N``, ``model.layers.N``, ``h.N``, ...);
* in a block, attention modules: the outermost submodules whose class name contains ``Attention`` (self- and
  cross-attention); the output projection of each is its last linear layer in registration order, which maps
  back to the block's width, the input size most of the block's linear layers share (``o``, ``o_proj``,
  ``out_proj``, ``dense``, ``c_proj``, ``out_lin``, ...); its other linear layers read the attention's input
  (query, key, value: ``attention_input_projections``, what LoRA adapts);
* the block's other linear layers are its feed-forward layers (``wi``/``wo``, ``fc1``/``fc2``,
  ``gate_proj``/``up_proj``/``down_proj``, ``intermediate.dense``/``output.dense``, ``c_fc``/``c_proj``, ...).

Where that is unsure (a block without an attention module, an attention module without linear layers, a last
attention linear that does not map back to the block's width, no blocks at all), the selection carries a note that ``apply_wtacrs`` gives as a warning and
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
    selected: list[str] = []
    notes: list[str] = []
    blocks = _blocks(model)
    if not blocks:
        return TargetSelection([], ["found no repeated blocks (an nn.ModuleList of one class holding linear layers)"])
    for block_name, block in blocks:
        attention = [(name, att, _linears(att)) for name, att in _attention_modules(block)]
        linears = _linears(block)
        width = _width(linears)
        inside = {f"{att_name}.{n}" for att_name, _, att_linears in attention for n, _ in att_linears}
        for att_name, att, att_linears in attention:
            if not att_linears:
                notes.append(f"{type(att).__name__} has no linear layer: {type(block).__name__} has no attention "
                             "output projection to sample")
                continue
            last, module = att_linears[-1]
            if _features(module)[1] == width:
                selected.append(f"{block_name}.{att_name}.{last}")
            else:
                notes.append(f"the last linear layer of {type(att).__name__} ({last}) maps to "
                             f"{_features(module)[1]} features, not back to the block width {width}: not taken as "
                             "the attention output projection")
        if not attention:
            notes.append(f"no attention module (class name containing 'Attention') in {type(block).__name__}: "
                         "only its feed-forward linear layers are sampled")
        selected += [f"{block_name}.{n}" for n, _ in linears if n not in inside]
    order = {n: i for i, n in enumerate(linear_module_names(model))}
    return TargetSelection(sorted(set(selected), key=order.__getitem__), list(dict.fromkeys(notes)))


def attention_input_projections(model: nn.Module) -> list[str]:
    """Names of the linear layers that read an attention module's input (query, key, value, or a fused QKV):
    every linear layer of each block's attention modules except its output projection. These are what LoRA
    adapts in the paper; the list is empty where the model has no blocks with attention modules."""
    names = []
    for block_name, block in _blocks(model):
        width = _width(_linears(block))
        for att_name, att in _attention_modules(block):
            att_linears = _linears(att)
            if att_linears and _features(att_linears[-1][1])[1] == width:
                att_linears = att_linears[:-1]
            names += [f"{block_name}.{att_name}.{n}" for n, _ in att_linears]
    return names


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers inside ``module`` in registration order, without the parts of PEFT LoRA wrappers."""
    types = supported_layer_types()
    return [(n, m) for n, m in module.named_modules() if isinstance(m, types) and n and not _LORA_PARTS.search(n)]


def _width(linears: list[tuple[str, nn.Module]]) -> int:
    """A block's width: the input size most of its linear layers share (queries, keys, values, the first
    feed-forward layers). Output sizes would not do: with grouped keys and values, or attention heads wider than
    the model, the key/value or query size can occur as often as the model width."""
    return Counter(_features(m)[0] for _, m in linears).most_common(1)[0][0]


def _attention_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return _outermost(block, lambda m: "Attention" in type(m).__name__)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for the entries of every ModuleList of one class whose entries hold linear layers."""
    types = supported_layer_types()
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
