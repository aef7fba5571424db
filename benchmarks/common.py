"""Shared pieces of the benchmarks: run metadata, model shapes, arms, timing and results files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
GIB = 1024**3


def run_metadata(argv: list[str] | None = None) -> dict:
    """Device, library versions, date and command line of this run, stored in every results file."""
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("wtacrs", "transformers", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": device_name(),
        "cpu_threads": torch.get_num_threads(),
        # Other work on the machine slows every timing; the 1-minute load average at the end says how much.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "git_commit": commit,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m " + " ".join(shlex.quote(a) for a in [_module_name(), *(argv or sys.argv[1:])]),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def device_name(device: str | None = None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def settings_dict(args) -> dict:
    """``vars(args)`` made JSON-safe, with paths inside the repository written relative to its root."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, Path):
            resolved = value.resolve()
            value = str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(value)
        out[key] = value
    return out


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path



def study_main(study, argv: list[str] | None, default_out: Callable[[argparse.Namespace], Path]) -> int:
    """The command line every study shares: parse and check arguments, run, write the results file and its
    plot, print the table. ``study`` is the module (``add_arguments``, ``check_args``, ``run_study``, ``plot``,
    ``table``); ``default_out`` names the results file when ``--out`` is not given."""
    parser = argparse.ArgumentParser(description=study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        study.check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    result = study.run_study(args)
    out = args.out or default_out(args)
    write_json(out, result)
    if not args.no_plot:
        study.plot(result, out.with_suffix(".png"))
    print("\n" + study.table(result))
    print(f"\nwrote {out}")
    return 0

def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: str, warmup: int, reps: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``reps`` calls after ``warmup`` calls (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# ---------------------------------------------------------------------------------------------------------------
# Models: shapes of the public checkpoints, random init (no downloads).


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "t5", "bert" or "llama"
    hidden: int
    ffn: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # llama only

    @property
    def lora_targets(self) -> list[str]:
        """LoRA on q/k/v, as the paper."""
        return {"t5": ["q", "k", "v"], "bert": ["query", "key", "value"], "llama": ["q_proj", "k_proj", "v_proj"]}[
            self.family
        ]


MODELS: dict[str, ModelSpec] = {
    "t5-small": ModelSpec("t5", 512, 2048, 6, 8, 32128),  # CPU-sized timings
    "t5-base": ModelSpec("t5", 768, 3072, 12, 12, 32128),
    "t5-large": ModelSpec("t5", 1024, 4096, 24, 16, 32128),
    "bert-base": ModelSpec("bert", 768, 3072, 12, 12, 30522),
    "bert-large": ModelSpec("bert", 1024, 4096, 24, 16, 30522),
    # TinyLlama-1.1B's shapes: a LLaMA-family model of about 1B parameters.
    "llama-1b": ModelSpec("llama", 2048, 5632, 22, 32, 32000, kv_heads=4),
    # Tiny shapes for smoke tests.
    "t5-tiny": ModelSpec("t5", 64, 256, 2, 4, 512),
    "bert-tiny": ModelSpec("bert", 64, 256, 2, 4, 512),
    "llama-tiny": ModelSpec("llama", 64, 176, 2, 4, 512, kv_heads=2),
}

#: Target length of the text-to-text labels for T5 (a class word and </s>).
T5_TARGET_LEN = 4


def build_model(name: str) -> torch.nn.Module:
    """A random-init Hugging Face model with the shapes of ``name`` (a key of ``MODELS``), SDPA attention."""
    spec = MODELS[name]
    if spec.family == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            d_model=spec.hidden, d_ff=spec.ffn, num_layers=spec.layers, num_decoder_layers=spec.layers,
            num_heads=spec.heads, d_kv=spec.hidden // spec.heads, vocab_size=spec.vocab,
            feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False,
        )
        return T5ForConditionalGeneration(config)
    if spec.family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, vocab_size=spec.vocab, num_labels=2,
        )
        return BertForSequenceClassification(config)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
        num_labels=2, pad_token_id=0, use_cache=False,
    )
    return LlamaForSequenceClassification(config)


def make_batch(name: str, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (no padding) and labels shaped as the model's fine-tuning task."""
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, spec.vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.family == "t5":
        batch["labels"] = torch.randint(2, spec.vocab, (batch_size, T5_TARGET_LEN), generator=g)
    else:
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def peft_task_type(name: str) -> str:
    return "SEQ_2_SEQ_LM" if MODELS[name].family == "t5" else "SEQ_CLS"


# ---------------------------------------------------------------------------------------------------------------
# Arms.


@dataclass(frozen=True)
class Arm:
    """One way to fine-tune. ``budget`` None means no sampling."""

    name: str
    lora: bool = False
    budget: float | None = None
    checkpointing: bool = False
    offload: bool = False
    compact_masks: bool = False
    attention: bool = False  # also sample the two attention matmuls (the paper's full fine-tuning setting)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_arm(name: str) -> Arm:
    """``full|lora`` then ``+gc``, ``+wta@B``, ``+offload``, ``+masks`` (1-bit ReLU/dropout masks), ``+attn``
    (attention matmuls sampled at the same budget; needs ``wta@B``) in any order, e.g. ``lora+wta@0.1+gc``."""
    parts = name.split("+")
    base = parts[0]
    if base not in ("full", "lora"):
        raise ValueError(f"an arm starts with 'full' or 'lora'; got {name!r}")
    kw: dict = {"lora": base == "lora"}
    for part in parts[1:]:
        if part == "gc":
            kw["checkpointing"] = True
        elif part == "offload":
            kw["offload"] = True
        elif part == "masks":
            kw["compact_masks"] = True
        elif part == "attn":
            kw["attention"] = True
        elif part.startswith("wta@"):
            try:
                kw["budget"] = float(part[4:])
            except ValueError:
                raise ValueError(f"arm {name!r}: 'wta@B' needs a number B in (0, 1]; got {part[4:]!r}") from None
        else:
            raise ValueError(f"arm {name!r}: unknown part {part!r} (allowed: gc, offload, masks, attn, wta@B)")
    if kw.get("attention") and "budget" not in kw:
        raise ValueError(f"arm {name!r}: 'attn' samples at the arm's budget, so it needs 'wta@B' too")
    return Arm(name=name, **kw)


#: The arms of the issue, in display order.
DEFAULT_ARMS = (
    "full", "full+gc", "lora", "lora+gc", "full+wta@0.3", "full+wta@0.1",
    "lora+wta@0.3", "lora+wta@0.1", "full+wta@0.3+gc", "lora+offload",
)


def prepare_model(model_name: str, arm: Arm, device: str) -> torch.nn.Module:
    """Build the model and apply the arm's fine-tuning recipe (LoRA, sampling, checkpointing) on ``device``."""
    with torch.device(device):  # initialise on the device: much faster than on the host for large models
        model = build_model(model_name)
    if arm.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=32, lora_alpha=32, lora_dropout=0.1, bias="all",
            target_modules=MODELS[model_name].lora_targets, task_type=peft_task_type(model_name),
        )
        model = get_peft_model(model, config)
    if arm.budget is not None:
        import wtacrs

        wtacrs.apply_wtacrs(model, budget=arm.budget, targets="lora" if arm.lora else "full",
                            compact_masks=arm.compact_masks, sample_attention=arm.attention)
    elif arm.compact_masks:
        from wtacrs.masks import patch_compact_masks

        patch_compact_masks(model)
    if arm.checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) and replays the same RNG state,
        # so the recomputed forward keeps the same sampled rows.
        base = model.get_base_model() if arm.lora else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model

