"""Tiny random-initialised Hugging Face models (a few hundred kB each) and a batch for each, for tests.

Dropout is 0 so that a model's exact gradient is deterministic and sampled gradients can be compared to it.
Every family is described once in ``_SPECS``: its config, its model class, its pad token and the attention
projections PEFT's LoRA adapts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

VOCAB = 128
BATCH, SEQ = 4, 12
#: Target length of the encoder-decoder families' labels.
LABEL_SEQ = 6
#: Token ids below this are special (pad, bos, eos) in every family; batches draw ordinary tokens above it.
FIRST_TOKEN = 3
#: Lengths of the rows of a padded batch (right padding): the last row has 4 real tokens.
PADDED_LENGTHS = (SEQ, SEQ - 5, SEQ - 3, 4)
PADDED_LABEL_LENGTHS = (LABEL_SEQ, 4, LABEL_SEQ - 1, 2)

#: Kinds of task head: sequence classification (one label per example), causal LM (labels = input ids) and
#: encoder-decoder LM (labels = target tokens).
CLASSIFIER, CAUSAL, SEQ2SEQ = "classifier", "causal", "seq2seq"


@dataclass(frozen=True)
class FamilySpec:
    config: Callable[[], transformers.PretrainedConfig]
    model_class: str  # attribute of ``transformers``
    kind: str
    lora_targets: tuple[str, ...]  # the attention's query/key/value projections (fused in GPT-2 and GPT-NeoX)


def _decoder_common(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=0, **extra)


_SPECS: dict[str, FamilySpec] = {
    "bert": FamilySpec(
        lambda: transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=2,
            pad_token_id=0),
        "BertForSequenceClassification", CLASSIFIER, ("query", "key", "value")),
    "roberta": FamilySpec(
        lambda: transformers.RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=2,
            pad_token_id=1),
        "RobertaForSequenceClassification", CLASSIFIER, ("query", "key", "value")),
    "distilbert": FamilySpec(
        lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0,
            seq_classif_dropout=0.0, max_position_embeddings=64, num_labels=2, pad_token_id=0),
        "DistilBertForSequenceClassification", CLASSIFIER, ("q_lin", "k_lin", "v_lin")),
    "t5": FamilySpec(
        lambda: transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0),
        "T5ForConditionalGeneration", SEQ2SEQ, ("q", "k", "v")),
    # T5 v1.1 (and Flan-T5): gated-GELU feed-forward (wi_0, wi_1, wo), untied LM head.
    "t5v1.1": FamilySpec(
        lambda: transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False),
        "T5ForConditionalGeneration", SEQ2SEQ, ("q", "k", "v")),
    "bart": FamilySpec(
        lambda: transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None),
        "BartForConditionalGeneration", SEQ2SEQ, ("q_proj", "k_proj", "v_proj")),
    "gpt2": FamilySpec(
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "GPT2LMHeadModel", CAUSAL, ("c_attn",)),
    # Pythia-style: fused query_key_value, parallel residual, partial rotary embeddings.
    "gpt_neox": FamilySpec(
        lambda: transformers.GPTNeoXConfig(
            **_decoder_common(hidden_dropout=0.0, attention_dropout=0.0, rotary_pct=0.25,
                              use_parallel_residual=True)),
        "GPTNeoXForCausalLM", CAUSAL, ("query_key_value",)),
    "opt": FamilySpec(
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
        "OPTForCausalLM", CAUSAL, ("q_proj", "k_proj", "v_proj")),
    "llama": FamilySpec(
        lambda: transformers.LlamaConfig(**_decoder_common(num_key_value_heads=2)),
        "LlamaForCausalLM", CAUSAL, ("q_proj", "k_proj", "v_proj")),
    "mistral": FamilySpec(
        lambda: transformers.MistralConfig(**_decoder_common(num_key_value_heads=2, head_dim=8)),
        "MistralForCausalLM", CAUSAL, ("q_proj", "k_proj", "v_proj")),
    "qwen2": FamilySpec(
        lambda: transformers.Qwen2Config(**_decoder_common(num_key_value_heads=2)),
        "Qwen2ForCausalLM", CAUSAL, ("q_proj", "k_proj", "v_proj")),
    # Qwen3: per-head RMSNorm on queries and keys; head_dim is a config field (default 128).
    "qwen3": FamilySpec(
        lambda: transformers.Qwen3Config(**_decoder_common(num_key_value_heads=2, head_dim=8)),
        "Qwen3ForCausalLM", CAUSAL, ("q_proj", "k_proj", "v_proj")),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)

#: The attention projections PEFT's LoRA targets in each family (the paper's q/k/v).
LORA_TARGETS: dict[str, list[str]] = {family: list(spec.lora_targets) for family, spec in _SPECS.items()}


def family_kind(family: str) -> str:
    """``CLASSIFIER``, ``CAUSAL`` or ``SEQ2SEQ``."""
    return _SPECS[family].kind


def tiny_config(family: str) -> transformers.PretrainedConfig:
    return _SPECS[family].config()


def tiny_model(family: str, seed: int = 0, **from_config) -> nn.Module:
    """A random-initialised model of ``family`` in training mode; ``from_config`` goes to ``_from_config``
    (e.g. ``attn_implementation="eager"``)."""
    torch.manual_seed(seed)
    cls = getattr(transformers, _SPECS[family].model_class)
    model = cls._from_config(tiny_config(family), **from_config) if from_config else cls(tiny_config(family))
    return model.train()


def pad_token_id(family: str) -> int:
    return tiny_config(family).pad_token_id


def tiny_batch(family: str, seed: int = 0, padded: bool = False, loss_on_padding: bool = False) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels for ``family``'s head.

    ``padded``: right padding (``PADDED_LENGTHS``): the padded positions hold the pad token and have attention
    mask 0; in an encoder-decoder family the labels are padded too (``PADDED_LABEL_LENGTHS``).
    ``loss_on_padding``: the labels at padded positions are the pad token, as scripts that copy ``input_ids``
    into ``labels`` have it, so the loss reads them; otherwise they are -100 and the loss ignores them.
    Classifiers have one label per example, which padding does not touch.
    """
    g = torch.Generator().manual_seed(seed + 1000)
    pad = pad_token_id(family)
    input_ids = torch.randint(FIRST_TOKEN, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        for b, length in enumerate(PADDED_LENGTHS):
            mask[b, length:] = 0
        input_ids[mask == 0] = pad
    batch = {"input_ids": input_ids, "attention_mask": mask}
    kind = family_kind(family)
    if kind == CLASSIFIER:
        batch["labels"] = torch.randint(0, 2, (BATCH,), generator=g)
        return batch
    if kind == SEQ2SEQ:
        labels = torch.randint(FIRST_TOKEN, VOCAB, (BATCH, LABEL_SEQ), generator=g)
        label_mask = torch.ones_like(labels, dtype=torch.bool)
        if padded:
            for b, length in enumerate(PADDED_LABEL_LENGTHS):
                label_mask[b, length:] = False
    else:
        labels = input_ids.clone()
        label_mask = mask.bool()
    labels[~label_mask] = pad if loss_on_padding else -100
    batch["labels"] = labels
    return batch


def tiny_lora_model(family: str, seed: int = 0, dropout: float = 0.0, **from_config) -> nn.Module:
    """``tiny_model`` with PEFT LoRA (r=8) on the family's query/key/value projections; B is random (PEFT starts
    it at zero, which makes A's gradient zero), so A gets an informative gradient."""
    import peft

    model = tiny_model(family, seed, **from_config)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS[family],
        fan_in_fan_out=family == "gpt2",
    )
    torch.manual_seed(seed + 1)
    lora_model = peft.get_peft_model(model, config)
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return lora_model.train()
