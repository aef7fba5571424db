"""Shared pieces of the benchmarks: run metadata, model shapes, arms, timing and results files."""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass
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
            if resolved.is_relative_to(REPO_ROOT):
                value = str(resolved.relative_to(REPO_ROOT))
            elif resolved.is_relative_to(REPO_ROOT.parent):  # ../shared/data beside the repository
                value = str(Path("..") / resolved.relative_to(REPO_ROOT.parent))
            else:
                value = str(value)
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


def build_model(name: str, dropout: float | None = None, attention: str | None = None) -> torch.nn.Module:
    """A random-init Hugging Face model with the shapes of ``name`` (a key of ``MODELS``). ``attention`` None gives
    the library's default attention (SDPA where the model has it), else that implementation (``"eager"``).
    ``dropout`` None keeps each config's default (0.1 for T5 and BERT, none in LLaMA); tests pass 0 to compare arms
    that draw no random numbers."""
    spec = MODELS[name]
    common = {} if attention is None else {"attn_implementation": attention}
    if spec.family == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            d_model=spec.hidden, d_ff=spec.ffn, num_layers=spec.layers, num_decoder_layers=spec.layers,
            num_heads=spec.heads, d_kv=spec.hidden // spec.heads, vocab_size=spec.vocab,
            feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False,
            **common, **({} if dropout is None else {"dropout_rate": dropout}),
        )
        return T5ForConditionalGeneration(config)
    if spec.family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, vocab_size=spec.vocab, num_labels=2, **common,
            **({} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}),
        )
        return BertForSequenceClassification(config)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
        num_labels=2, pad_token_id=0, use_cache=False, **common,
        **({} if dropout is None else {"attention_dropout": dropout}),
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
    """One way to fine-tune, parsed from its name (``parse_arm``). ``budget`` None means no sampling."""

    name: str
    lora: bool = False
    budget: float | None = None  # +wta@B: wtacrs.apply_wtacrs(model, budget=B)
    checkpointing: bool = False  # +gc: every block checkpointed, nothing inside kept
    selective: bool = False  # +sac: every block checkpointed, matmul outputs kept (SAC_POLICY)
    offload: bool = False  # +offload: saved tensors in host memory
    compact_masks: bool = False  # +masks: 1-bit ReLU/dropout masks
    attention: bool = False  # +attn: the two attention matmuls sampled at the arm's budget
    compile: bool = False  # +compile, or +budget@B (compiled with the partitioner's activation memory budget)
    memory_budget: float | None = None  # +budget@B

    @property
    def sampled(self) -> bool:
        """Whether the arm samples (WTA-CRS): the library's own arms on the memory-throughput plane."""
        return self.budget is not None


ARM_PARTS = "gc, sac, offload, masks, attn, compile, wta@B, budget@B"


def _fraction(name: str, part: str, low_open: bool) -> float:
    key, _, text = part.partition("@")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ((0.0 < value if low_open else 0.0 <= value) and value <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"arm {name!r}: '{key}@B' needs a number B in {interval}; got {text!r}")
    return value


def parse_arm(name: str) -> Arm:
    """``full|lora`` then any of ``+gc``, ``+sac``, ``+offload``, ``+masks``, ``+attn``, ``+compile``, ``+wta@B``,
    ``+budget@B`` in any order, e.g. ``lora+wta@0.3+masks+attn+compile``. ``+attn`` samples at the arm's WTA-CRS
    budget (needs ``+wta@B``); ``+gc`` and ``+sac`` are two kinds of checkpointing (one at a time); ``+budget@B``
    compiles (so not with ``+compile``)."""
    parts = name.split("+")
    if parts[0] not in ("full", "lora"):
        raise ValueError(f"an arm starts with 'full' or 'lora'; got {name!r}")
    kw: dict = {"lora": parts[0] == "lora"}
    flags = {"gc": "checkpointing", "sac": "selective", "offload": "offload", "masks": "compact_masks",
             "attn": "attention", "compile": "compile"}
    seen: set[str] = set()
    for part in parts[1:]:
        key = part.partition("@")[0]
        if key in seen:
            raise ValueError(f"arm {name!r}: {key!r} given twice")
        seen.add(key)
        if part in flags:
            kw[flags[part]] = True
        elif key == "wta":
            kw["budget"] = _fraction(name, part, low_open=True)
        elif key == "budget":
            kw["memory_budget"] = _fraction(name, part, low_open=False)
        else:
            raise ValueError(f"arm {name!r}: unknown part {part!r} (allowed: {ARM_PARTS})")
    if kw.get("attention") and "budget" not in kw:
        raise ValueError(f"arm {name!r}: 'attn' samples at the arm's budget, so it needs 'wta@B' too")
    if kw.get("checkpointing") and kw.get("selective"):
        raise ValueError(f"arm {name!r}: 'gc' and 'sac' both checkpoint every block; choose one")
    if kw.get("compile") and "memory_budget" in kw:
        raise ValueError(f"arm {name!r}: 'budget@B' compiles the model already; drop 'compile'")
    if "memory_budget" in kw:
        kw["compile"] = True
    return Arm(name=name, **kw)


#: The arms of study 1's default run, in display order.
DEFAULT_ARMS = (
    "full", "full+gc", "lora", "lora+gc", "full+wta@0.3", "full+wta@0.1",
    "lora+wta@0.3", "lora+wta@0.1", "full+wta@0.3+gc", "lora+offload",
)


# ---------------------------------------------------------------------------------------------------------------
# Selective activation checkpointing.


def _aten_ops(names: tuple[str, ...]) -> frozenset:
    """The ``.default`` overloads of those aten ops this torch has (SDPA kernels differ between versions)."""
    ops = (getattr(torch.ops.aten, n, None) for n in names)
    return frozenset(op.default for op in ops if op is not None and hasattr(op, "default"))


#: ``sac_policy`` keeps the outputs of these ops: matrix products (every linear layer, the attention matmuls of eager
#: attention) and fused attention kernels. They are the expensive ops to recompute; everything else in a block
#: (norms, activations, dropout, softmax, residual adds, reshapes) is cheap and recomputed in backward, replaying
#: the forward's random state, so dropout masks come out the same.
SAC_SAVED_OPS = _aten_ops((
    "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
    "_efficient_attention_forward",
))


def _checkpoint_api():
    try:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    except ImportError:
        raise RuntimeError(
            "+sac needs torch >= 2.4 (torch.utils.checkpoint.create_selective_checkpoint_contexts and "
            f"CheckpointPolicy); this is torch {torch.__version__}"
        ) from None
    return CheckpointPolicy, create_selective_checkpoint_contexts


def sac_policy(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep matmul and attention outputs (``SAC_SAVED_OPS``), recompute the rest."""
    policy, _ = _checkpoint_api()
    return policy.MUST_SAVE if op in SAC_SAVED_OPS else policy.PREFER_RECOMPUTE


class SelectiveCheckpoint:
    """The ``context_fn`` a user passes to ``torch.utils.checkpoint.checkpoint`` (through Hugging Face's
    ``gradient_checkpointing_kwargs``) for selective checkpointing with ``sac_policy``.

    The tensors it keeps live in the checkpoint's own cache, not in autograd's saved tensors, so
    ``wtacrs.memory.SavedTensors`` does not see them; ``recording()`` collects those caches for ``cached_tensors``.
    """

    def __init__(self) -> None:
        _checkpoint_api()
        self._caches: list | None = None  # collecting while recording
        self._last: list = []  # what the last recording collected

    def __call__(self):
        _, create = _checkpoint_api()
        contexts = create(sac_policy)
        if self._caches is not None:
            self._caches.append(contexts[0].storage)
        return contexts

    @contextlib.contextmanager
    def recording(self):
        """Collect the caches of the checkpoints run inside (for one forward: they hold its kept outputs)."""
        self._caches = []
        try:
            yield
        finally:
            self._last, self._caches = self._caches or [], None

    def cached_tensors(self) -> dict[tuple, torch.Tensor]:
        """The tensors the last ``recording()`` forward kept in checkpoint caches, one per storage."""
        out: dict[tuple, torch.Tensor] = {}
        stack, self._last = self._last, []
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                out[(item.device.type, item.device.index, item.untyped_storage().data_ptr())] = item
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif hasattr(item, "val"):  # torch.utils.checkpoint's _VersionWrapper
                stack.append(item.val)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Building an arm.


@dataclass
class Prepared:
    """An arm ready to train: ``model`` is what to call (compiled for compiled arms), ``module`` the model itself."""

    model: torch.nn.Module
    module: torch.nn.Module
    arm: Arm
    attention: str  # the attention implementation the model runs ("sdpa", "eager", ...)
    selective: SelectiveCheckpoint | None = None


def attention_implementation(module: torch.nn.Module) -> str:
    """The attention implementation of a Hugging Face model (the PEFT wrapper's base model for LoRA)."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return getattr(base.config, "_attn_implementation", None) or "eager"


def _enable_checkpointing(base: torch.nn.Module, kwargs: dict) -> None:
    """Hugging Face's checkpointing switch: ``activation_checkpointing_enable`` in newer transformers, the
    ``gradient_checkpointing_enable`` it replaces in older ones; both pass ``kwargs`` to torch's checkpoint."""
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_activation_memory_budget(budget: float) -> None:
    """``torch._functorch.config.activation_memory_budget = budget``: a process-wide setting read when a compiled
    model first runs (0: recompute everything the partitioner can, 1: its default, speed first)."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "activation_memory_budget"):
        raise RuntimeError(
            "+budget@B needs torch >= 2.4 (torch._functorch.config.activation_memory_budget); "
            f"this is torch {torch.__version__}"
        )
    functorch_config.activation_memory_budget = budget


def prepare_model(model_name: str, arm: Arm, device: str, dropout: float | None = None) -> Prepared:
    """Build the model and apply the arm's recipe on ``device``, each tool the way its users apply it:
    PEFT's ``get_peft_model``; ``wtacrs.apply_wtacrs`` with every option the arm name sets written out (its
    defaults are masks on); Hugging Face's checkpointing switch (``context_fn`` for ``+sac``); ``torch.compile``
    of the whole model last. ``+offload`` wraps each forward (``memory_speed.Trainer``). ``dropout`` None keeps
    the paper's (0.1 in the model where its config has it, and in LoRA).

    ``+attn`` arms load the model with eager attention, which ``apply_wtacrs`` would switch an SDPA model to: the
    switch after loading needs transformers 5 for some families (BERT), and its error says to load eager."""
    with torch.device(device):  # initialise on the device: much faster than on the host for large models
        model = build_model(model_name, dropout, "eager" if arm.attention else None)
    if arm.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=32, lora_alpha=32, lora_dropout=0.1 if dropout is None else dropout, bias="all",
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
    selective = None
    if arm.checkpointing or arm.selective:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) and replays the same RNG state, so the
        # recomputed forward draws the same dropout masks and sampled rows.
        kwargs: dict = {"use_reentrant": False}
        if arm.selective:
            selective = SelectiveCheckpoint()
            kwargs["context_fn"] = selective
        _enable_checkpointing(model.get_base_model() if arm.lora else model, kwargs)
    model.train()
    attention = attention_implementation(model)
    compiled = model
    if arm.compile:
        if arm.memory_budget is not None:
            set_activation_memory_budget(arm.memory_budget)
        compiled = torch.compile(model)
    return Prepared(compiled, model, arm, attention, selective)
