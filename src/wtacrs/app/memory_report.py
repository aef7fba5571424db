"""``wtacrs memory``: saved-activation bytes by kind (``wtacrs.memory.saved_by_kind``) for each arm of a model."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..memory import KINDS, SavedReport, saved_by_kind

#: Config names built with random initialisation (no download): (model type, config keyword arguments).
CONFIGS: dict[str, tuple[str, dict]] = {
    "t5-small": ("t5", dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)),
    "t5-base": ("t5", dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)),
    "t5-large": ("t5", dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16)),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072)),
    "bert-large": ("bert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096)),
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                             word_embed_proj_dim=768)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12)),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                               tie_word_embeddings=True)),
}

ARM_FEATURES = ("wta", "masks", "attn")
DEFAULT_ARMS = ("full", "full+wta", "full+wta+masks", "full+wta+masks+attn",
                "lora", "lora+wta", "lora+wta+masks", "lora+wta+masks+attn")

#: Task heads, chosen from the model's structure: encoder-decoders get their LM head (labels: target tokens),
#: encoders (model types with a masked-LM head and no decoder) a two-class classifier (the usual fine-tuning),
#: everything else its causal LM head (labels: the input tokens).
SEQ2SEQ, CLASSIFIER, CAUSAL = "seq2seq", "classifier", "causal"
_AUTO_CLASSES = {SEQ2SEQ: "AutoModelForSeq2SeqLM", CLASSIFIER: "AutoModelForSequenceClassification",
                 CAUSAL: "AutoModelForCausalLM"}
#: Token ids below this are special in most vocabularies (pad, bos, eos); inputs are drawn above it.
_FIRST_TOKEN = 3


class MemoryReportError(ValueError):
    """A model, option or arm that ``wtacrs memory`` cannot measure; the message says why."""


def parse_arm(arm: str) -> tuple[str, frozenset[str]]:
    """``"lora+wta+masks"`` -> ``("lora", {"wta", "masks"})``. Bases: full, lora; features: wta (linear sampling),
    masks (compact ReLU/dropout), attn (attention sampling)."""
    base, *features = arm.split("+")
    if base not in ("full", "lora") or not set(features) <= set(ARM_FEATURES) or len(set(features)) != len(features):
        raise MemoryReportError(
            f"arm must be 'full' or 'lora' followed by any of {', '.join('+' + f for f in ARM_FEATURES)}; got {arm!r}"
        )
    return base, frozenset(features)


def task_kind(config) -> str:
    """``SEQ2SEQ``, ``CLASSIFIER`` or ``CAUSAL`` for a transformers config (see ``_AUTO_CLASSES``)."""
    from transformers.models.auto import modeling_auto

    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    if config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return CLASSIFIER
    return CAUSAL


def _load_config(name_or_path: str):
    import transformers

    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise MemoryReportError(f"{name_or_path} has no config.json: MODEL_OR_CONFIG must be a Hugging Face model "
                                    "folder (config.json, and weights if not to be initialised at random)")
        try:
            return transformers.AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError) as e:
            raise MemoryReportError(f"cannot read a Hugging Face config from {name_or_path!r}: "
                                    f"{str(e).splitlines()[0]}") from None
    if name_or_path in CONFIGS:
        family, kwargs = CONFIGS[name_or_path]
        return transformers.AutoConfig.for_model(family, **kwargs)
    raise MemoryReportError(
        f"MODEL_OR_CONFIG must be a local model folder or one of {', '.join(CONFIGS)}; got {name_or_path!r}"
    )


def _override(config, num_layers: int | None, dropout: float, vocab_size: int | None) -> None:
    """Set every dropout probability of ``config`` to ``dropout`` and, if given, the depth of each stack and the
    vocabulary size, whatever the family calls them."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and (key.endswith(("dropout", "dropout_prob", "dropout_rate", "pdrop"))):
            setattr(config, key, dropout)
    if num_layers is not None:
        if num_layers < 1:
            raise MemoryReportError(f"--num-layers must be >= 1; got {num_layers}")
        config.num_hidden_layers = num_layers  # each config maps this name to its own (n_layer, num_layers, ...)
        for key in ("num_decoder_layers", "decoder_layers", "encoder_layers"):
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, num_layers)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
    if vocab_size is not None:
        if vocab_size <= _FIRST_TOKEN:
            raise MemoryReportError(f"--vocab-size must be > {_FIRST_TOKEN}; got {vocab_size}")
        config.vocab_size = vocab_size
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0


def build_model(
    name_or_path: str, num_layers: int | None = None, attn: str = "eager", dropout: float = 0.1,
    vocab_size: int | None = None,
) -> tuple[nn.Module, str]:
    """A model for ``name_or_path``: a local Hugging Face folder (its weights if present) or a name in
    ``CONFIGS`` built with random initialisation (seed 0), with dropout set to ``dropout`` and optionally fewer
    layers or a smaller vocabulary. Returns (model in training mode, task kind)."""
    import transformers

    config = _load_config(name_or_path)
    _override(config, num_layers, dropout, vocab_size)
    kind = task_kind(config)
    auto = getattr(transformers, _AUTO_CLASSES[kind])
    if kind == CLASSIFIER:
        config.num_labels = 2
    has_weights = os.path.isdir(name_or_path) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(name_or_path))
    torch.manual_seed(0)
    try:
        if has_weights:
            model = auto.from_pretrained(name_or_path, config=config, attn_implementation=attn)
        else:
            model = auto.from_config(config, attn_implementation=attn)
    except ValueError as e:  # no such head for this model type, or an attention implementation it lacks
        raise MemoryReportError(f"cannot build {name_or_path!r} ({config.model_type}) with "
                                f"{_AUTO_CLASSES[kind]}: {str(e).splitlines()[0]}") from None
    return model.train(), kind


def make_inputs(kind: str, config, batch_size: int, seq_len: int, target_len: int, device) -> dict[str, Tensor]:
    """Random token ids (no padding) and labels for the head of ``kind``."""
    g = torch.Generator().manual_seed(1)
    vocab = config.vocab_size
    ids = torch.randint(_FIRST_TOKEN, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == SEQ2SEQ:
        batch["labels"] = torch.randint(_FIRST_TOKEN, vocab, (batch_size, target_len), generator=g)
    elif kind == CLASSIFIER:
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def prepare_arm(model: nn.Module, arm: str, budget: float) -> nn.Module:
    """Apply an arm to a fresh model in place (LoRA r=32, alpha=32, dropout 0.1, biases trained, as the paper,
    on the query/key/value projections of every attention module: ``wtacrs.targets.attention_input_projections``).

    Arms with ``wta`` go through ``apply_wtacrs`` (masks and attention sampling as its options, attention at the
    same budget); the others call ``wtacrs.masks`` / ``wtacrs.attention`` directly.
    """
    base, features = parse_arm(arm)
    if base == "lora":
        import peft

        from ..targets import attention_input_projections

        targets = attention_input_projections(model)
        if not targets:
            raise MemoryReportError(
                f"found no attention query/key/value projections in {type(model).__name__} for the LoRA arms "
                "(blocks with a module whose class name contains 'Attention'); measure the full arms only"
            )
        conv1d = any(not isinstance(model.get_submodule(name), nn.Linear) for name in targets)  # GPT-2 style
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=32, lora_alpha=32, lora_dropout=0.1, bias="all", target_modules=targets, fan_in_fan_out=conv1d))
    if "wta" in features:
        from ..patch import apply_wtacrs

        apply_wtacrs(model, budget, targets=base, compact_masks="masks" in features,
                     sample_attention="attn" in features)
        return model.train()
    if "attn" in features:
        from ..attention import patch_attention

        patch_attention(model, budget, compact_dropout="masks" in features)
    if "masks" in features:
        from ..masks import patch_compact_masks

        patch_compact_masks(model)
    return model.train()


def measure_arms(
    name_or_path: str, arms: Iterable[str], batch_size: int, seq_len: int, *, target_len: int = 4,
    budget: float = 0.3, num_layers: int | None = None, attn: str = "eager",
    device: str = "cpu", vocab_size: int | None = None,
) -> dict[str, SavedReport]:
    """``saved_by_kind`` of one forward for each arm, each on a fresh copy of the same random-init model.

    Every option is checked before a model is built."""
    from ..sampling import check_budget

    arms = list(arms)
    for arm in arms:
        parse_arm(arm)
    for name, value in (("batch-size", batch_size), ("seq-len", seq_len), ("target-len", target_len)):
        if value < 1:
            raise MemoryReportError(f"--{name} must be >= 1; got {value}")
    check_budget(budget)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise MemoryReportError(f"--device {device!r} is not a device: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemoryReportError(f"--device {device} asks for CUDA, which this machine's PyTorch does not have")
    reports = {}
    for arm in arms:
        model, kind = build_model(name_or_path, num_layers, attn, vocab_size=vocab_size)
        model = prepare_arm(model.to(device), arm, budget)
        inputs = make_inputs(kind, model.config, batch_size, seq_len, target_len, device)
        torch.manual_seed(2)
        reports[arm] = saved_by_kind(model, inputs)
        del model
    return reports


def format_reports(reports: Mapping[str, SavedReport]) -> str:
    """A table in MiB per arm and kind, with each arm's total relative to its stock base arm (full or lora)."""
    mib = 2**20
    header = f"{'arm':<22}{'total':>10}" + "".join(f"{k:>11}" for k in KINDS) + f"{'vs stock':>10}"
    lines = [header, "-" * len(header)]
    for arm, report in reports.items():
        base = arm.split("+")[0]
        stock = reports.get(base)
        ratio = f"{report.total / stock.total:>10.3f}" if stock is not None and stock.total else f"{'':>10}"
        kinds = report.by_kind()
        lines.append(f"{arm:<22}{report.total / mib:>10.1f}" + "".join(f"{kinds[k] / mib:>11.1f}" for k in KINDS)
                     + ratio)
    for arm, report in reports.items():
        for item in report.shared_linear_inputs()[:5]:
            lines.append(f"  {arm}: linear input also kept by {item.kind}: {item.nbytes / mib:.1f} MiB "
                         f"{list(item.shape)} ({', '.join(item.modules[:3])})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_CONFIG",
                        help="a local Hugging Face model folder (any family; random init when it holds no weights), "
                             f"or one of: {', '.join(CONFIGS)} (random init)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=4, help="decoder length for encoder-decoder models")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        help="full|lora followed by any of +wta (linear sampling), +masks (compact ReLU/dropout), "
                             "+attn (attention sampling)")
    parser.add_argument("--budget", type=float, default=0.3, help="sampling budget (linear layers and attention)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                        help="attention implementation of arms without +attn (+attn always runs eager)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the reports to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise MemoryReportError(f"--json {args.json}: the folder it would be written to does not exist")
    reports = measure_arms(
        args.model, args.arms, args.batch_size, args.seq_len, target_len=args.target_len, budget=args.budget,
        num_layers=args.num_layers, attn=args.attn, device=args.device,
        vocab_size=args.vocab_size,
    )
    overrides = "".join(f", {name} {getattr(args, name)}" for name in ("num_layers", "vocab_size")
                        if getattr(args, name) is not None)
    print(f"saved activations of one forward (MiB), {args.model}{overrides}, batch {args.batch_size}, "
          f"seq {args.seq_len} (decoder {args.target_len}), {args.device}, fp32, attention {args.attn}, "
          f"budget {args.budget}")
    print(format_reports(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "num_layers": args.num_layers, "vocab_size": args.vocab_size,
                       "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "target_len": args.target_len, "device": args.device, "attn": args.attn,
                       "budget": args.budget, "arms": {a: r.to_dict() for a, r in reports.items()}}, f, indent=1)
    return 0
