"""Which modules of a model to sample: presets that follow the paper, and name patterns."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

#: Module-name suffixes (regular expressions on the part after the last dots) of the paper's full fine-tuning
#: targets: the attention output projection and both feed-forward projections. Q/K/V are left exact.
FULL_FINETUNING_SUFFIXES: dict[str, tuple[str, ...]] = {
    "t5": (r"SelfAttention\.o", r"EncDecAttention\.o", r"DenseReluDense\.wi(_0|_1)?", r"DenseReluDense\.wo"),
    "bert": (r"attention\.output\.dense", r"intermediate\.dense", r"layer\.\d+\.output\.dense"),
    "llama": (r"o_proj", r"gate_proj", r"up_proj", r"down_proj"),
    "gpt2": (r"attn\.c_proj", r"mlp\.c_fc", r"mlp\.c_proj"),
    "opt": (r"self_attn\.out_proj", r"fc1", r"fc2"),
}

#: The LoRA preset: PEFT LoRA ``A`` projections (``...lora_A.<adapter>``); ``B`` and frozen base weights stay exact.
LORA_SUFFIXES: tuple[str, ...] = (r"lora_A\.[^.]+",)

PRESETS: tuple[str, ...] = ("full", "lora", "all-linear")


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


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def _suffix_matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(re.fullmatch(rf"(.*\.)?{suffix}", name) for suffix in suffixes)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the linear modules of ``model`` selected by a preset or by name patterns.

    A preset is ``"full"`` (the paper's full fine-tuning targets for T5, BERT/RoBERTa, LLaMA-family, GPT-2 and
    OPT models), ``"lora"`` (PEFT LoRA ``A`` projections) or ``"all-linear"``. A pattern selects a module whose
    name equals it, ends with ``"." + pattern``, or fully matches it as a regular expression.
    """
    names = linear_module_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear or Conv1D modules, so there is nothing to sample"
        )
    if isinstance(targets, str):
        if targets == "all-linear":
            selected = names
        elif targets == "full":
            suffixes = [s for family in FULL_FINETUNING_SUFFIXES.values() for s in family]
            selected = [n for n in names if _suffix_matches(n, suffixes) and not _suffix_matches(n, LORA_SUFFIXES)]
        elif targets == "lora":
            selected = [n for n in names if _suffix_matches(n, LORA_SUFFIXES)]
        else:
            raise ValueError(
                f"unknown targets preset {targets!r}; use one of {', '.join(map(repr, PRESETS))} "
                "or a list of module-name patterns"
            )
        what = f"preset {targets!r}"
    else:
        patterns = list(targets)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"targets must be a preset name or a non-empty list of strings; got {targets!r}")
        selected = [n for n in names if any(_matches(n, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
        if unmatched:
            raise ValueError(_no_match_message(f"target pattern(s) {unmatched}", names))
        what = f"patterns {patterns}"
    if not selected:
        hint = " (is this a PEFT LoRA model?)" if targets == "lora" else ""
        raise ValueError(_no_match_message(f"{what}{hint}", names))
    return selected


def _no_match_message(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return f"{what} matched no linear module of the model; its linear modules are: {shown}"
