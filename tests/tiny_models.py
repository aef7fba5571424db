"""Tiny random-initialised Hugging Face models (a few hundred kB each) and a batch for each, for tests.

Dropout is 0 so that a model's exact gradient is deterministic and sampled gradients can be compared to it.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB = 128
BATCH, SEQ = 4, 12

FAMILIES = ("bert", "roberta", "t5", "gpt2", "llama", "qwen2")

#: The attention projections PEFT's LoRA targets in each family (the paper's q/k/v).
LORA_TARGETS = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "t5": ["q", "k", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],
}


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        config = cls(
            **common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=2,
            pad_token_id=1 if family == "roberta" else 0,
        )
        model_cls = (transformers.BertForSequenceClassification if family == "bert"
                     else transformers.RobertaForSequenceClassification)
        model = model_cls(config)
    elif family == "t5":
        config = transformers.T5Config(
            **common, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )
        model = transformers.T5ForConditionalGeneration(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            **common, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        config = cls(
            **common, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )
        model_cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
        model = model_cls(config)
    else:
        raise KeyError(family)
    return model.train()


def tiny_batch(family: str, seed: int = 0, padded: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    input_ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:  # right padding: the last rows of some sequences are padding
        for b, length in enumerate((SEQ, SEQ - 5, SEQ - 3, 4)):
            mask[b, length:] = 0
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if family in ("bert", "roberta"):
        batch["labels"] = torch.randint(0, 2, (BATCH,), generator=g)
    elif family == "t5":
        batch["labels"] = torch.randint(2, VOCAB, (BATCH, 6), generator=g)
    else:
        labels = input_ids.clone()
        labels[mask == 0] = -100
        batch["labels"] = labels
    return batch


def tiny_lora_model(family: str, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    import peft

    model = tiny_model(family, seed)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS[family],
        fan_in_fan_out=family == "gpt2",
    )
    torch.manual_seed(seed + 1)
    lora_model = peft.get_peft_model(model, config)
    # PEFT initialises B to zero, which makes A's gradient zero; give B values so A's gradient is informative.
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return lora_model.train()
