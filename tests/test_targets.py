"""Which layers are sampled: the structural "full" targets of every family, "auto" in PEFT LoRA models, named
presets and patterns, the notes given where detection is unsure, and the errors."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers
from torch import nn

import wtacrs
from wtacrs.targets import attention_input_projections, resolve_targets
from tiny_models import FAMILIES, LORA_TARGETS, tiny_lora_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 2  # every tiny model has two blocks per stack

#: family -> {block name pattern ({i} = block index): the block's sampled linear layers, in order}: each block's
#: attention output projection(s) (self-attention, and cross-attention in decoders of encoder-decoders), then
#: its feed-forward layers.
FULL_TARGETS: dict[str, dict[str, list[str]]] = {
    "bert": {"bert.encoder.layer.{i}": ["attention.output.dense", "intermediate.dense", "output.dense"]},
    "roberta": {"roberta.encoder.layer.{i}": ["attention.output.dense", "intermediate.dense", "output.dense"]},
    "distilbert": {"distilbert.transformer.layer.{i}": ["attention.out_lin", "ffn.lin1", "ffn.lin2"]},
    "t5": {
        "encoder.block.{i}": ["layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"],
        "decoder.block.{i}": ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wi",
                              "layer.2.DenseReluDense.wo"],
    },
    "t5v1.1": {
        "encoder.block.{i}": ["layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0",
                              "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo"],
        "decoder.block.{i}": ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o",
                              "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1",
                              "layer.2.DenseReluDense.wo"],
    },
    "bart": {
        "model.encoder.layers.{i}": ["self_attn.out_proj", "fc1", "fc2"],
        "model.decoder.layers.{i}": ["self_attn.out_proj", "encoder_attn.out_proj", "fc1", "fc2"],
    },
    "gpt2": {"transformer.h.{i}": ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]},
    "gpt_neox": {"gpt_neox.layers.{i}": ["attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]},
    "opt": {"model.decoder.layers.{i}": ["self_attn.out_proj", "fc1", "fc2"]},
    **{family: {"model.layers.{i}": ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
       for family in ("llama", "mistral", "qwen2", "qwen3")},
}


def expected_full(family: str, prefix: str = "") -> list[str]:
    return [f"{prefix}{block.format(i=i)}.{layer}"
            for block, layers in FULL_TARGETS[family].items() for i in range(LAYERS) for layer in layers]


def test_the_table_covers_every_family():
    assert set(FULL_TARGETS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_is_each_blocks_attention_output_and_feed_forward(family):
    model = tiny_model(family)
    selection = resolve_targets(model, "full")
    assert selection.names == expected_full(family)
    assert selection.notes == []
    assert resolve_targets(model, "auto") == selection


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_in_a_lora_model_is_every_lora_a(family):
    model = tiny_lora_model(family)
    names = resolve_targets(model, "auto").names
    lora_a = [n for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert names == lora_a
    assert len(names) == len(attention_input_projections(tiny_model(family)))
    assert all(n.split(".")[-3] in LORA_TARGETS[family] for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_in_a_lora_model_is_the_base_models_full_targets(family):
    """LoRA wraps q/k/v only; the output projections and feed-forward layers stay plain linear layers."""
    names = resolve_targets(tiny_lora_model(family), "full").names
    assert names == expected_full(family, prefix="base_model.model.")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_input_projections_are_what_lora_adapts(family):
    names = attention_input_projections(tiny_model(family))
    attention_modules = sum(re.search("attn|attention", name, re.IGNORECASE) is not None
                            for name in expected_full(family))
    assert len(names) == attention_modules * len(LORA_TARGETS[family])
    assert {n.split(".")[-1] for n in names} == set(LORA_TARGETS[family])


def qwen3_like_4b() -> nn.Module:
    """Proportions of Qwen3-4B (hidden 2560, 32 query heads and 8 key/value heads of 128, MLP 9728): the key/value
    size, the model width and the MLP size each occur twice among the block's output sizes."""
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=40, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    return transformers.Qwen3ForCausalLM(config)


def t5_with_narrow_heads() -> nn.Module:
    """T5 whose heads (4 x d_kv 4 = 16) are narrower than the model (32), as in some small T5 checkpoints."""
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=4, num_heads=4, d_ff=64, num_layers=2,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


@pytest.mark.parametrize("build,output_projection", [
    (qwen3_like_4b, "model.layers.0.self_attn.o_proj"),
    (t5_with_narrow_heads, "encoder.block.0.layer.0.SelfAttention.o"),
])
def test_output_projection_found_when_attention_width_differs_from_model_width(build, output_projection):
    selection = resolve_targets(build(), "full")
    assert output_projection in selection.names
    assert selection.notes == []


class Mixer(nn.Module):
    """A block without any module whose class name says Attention."""

    def __init__(self, width: int):
        super().__init__()
        self.token_mix = nn.Linear(width, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        x = x + self.token_mix(x)
        return x + self.down(torch.relu(self.up(x)))


class QKVOnlyAttention(nn.Module):
    """Attention without an output projection: its last linear layer maps to 3 x width."""

    def __init__(self, width: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class NoProjectionBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = QKVOnlyAttention(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(x + self.attn(x))


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module], width: int = 8, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("block,names,note", [
    (Mixer, ["token_mix", "up", "down"], "no attention module (class name containing 'Attention') in Mixer: only "
                                          "its feed-forward linear layers are sampled"),
    (NoProjectionBlock, ["fc"], "the last linear layer of QKVOnlyAttention (qkv) maps to 24 features, not back to "
                                "the block width 8: not taken as the attention output projection"),
])
def test_unsure_detection_is_noted_warned_and_described(block, names, note):
    model = Stack(block)
    selection = resolve_targets(model, "full")
    assert selection.names == [f"blocks.{i}.{n}" for i in range(2) for n in names]
    assert selection.notes == [note]  # once, not once per block
    with pytest.warns(UserWarning, match=re.escape(f"wtacrs.apply_wtacrs: {note}")):
        wtacrs.apply_wtacrs(model, targets="full")
    assert f"unsure: {note}" in wtacrs.describe(model).splitlines()


def test_sure_detection_warns_nothing():
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        wtacrs.apply_wtacrs(model)
    assert "unsure" not in wtacrs.describe(model)


def test_a_model_without_blocks_needs_a_preset_or_patterns():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    message = ("preset 'full' (found no repeated blocks (an nn.ModuleList of one class holding linear layers)) "
               "matched no linear module of the model; its linear modules are: 0, 2")
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_targets(model, "full")
    assert resolve_targets(model, "all-linear").names == ["0", "2"]
    assert resolve_targets(model, ["2"]).names == ["2"]


def test_all_linear_is_every_linear_and_conv1d_layer():
    model = tiny_model("gpt2")
    names = resolve_targets(model, "all-linear").names
    types = (nn.Linear, transformers.pytorch_utils.Conv1D)
    assert names == [n for n, m in model.named_modules() if isinstance(m, types)]
    assert "lm_head" in names and "transformer.h.0.attn.c_attn" in names


@pytest.mark.parametrize("patterns,expected", [
    (["o_proj"], [f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)]),  # name suffix
    (["model.layers.1.mlp.up_proj"], ["model.layers.1.mlp.up_proj"]),  # whole name
    ([r"model\.layers\.0\.mlp\..*_proj"], [f"model.layers.0.mlp.{n}_proj" for n in ("gate", "up", "down")]),
    (["lm_head", "q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]),
])
def test_patterns_select_by_suffix_whole_name_or_regular_expression(patterns, expected):
    assert resolve_targets(tiny_model("llama"), patterns).names == expected


def test_lora_preset_picks_the_a_projections_and_nothing_else():
    model = tiny_lora_model("bert")
    names = resolve_targets(model, "lora").names
    assert len(names) == 3 * LAYERS and all(n.endswith(".lora_A.default") for n in names)


@pytest.mark.parametrize("targets,message", [
    ("lora", "preset 'lora' (is this a PEFT LoRA model?) matched no linear module of the model; its linear "
             "modules are: model.layers.0.self_attn.q_proj, "),
    ("everything", "unknown targets preset 'everything'; use one of 'auto', 'full', 'lora', 'all-linear' or a "
                   "list of module-name patterns"),
    (["q_proj", "w_in"], "target pattern(s) ['w_in'] matched no linear module of the model; its linear modules "
                         "are: model.layers.0.self_attn.q_proj, "),
    ([], "targets must be a preset name or a non-empty list of strings; got []"),
    (["q_proj", 3], "targets must be a preset name or a non-empty list of strings; got ['q_proj', 3]"),
])
def test_errors_say_what_was_asked_and_what_exists(targets, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        resolve_targets(tiny_model("llama"), targets)


def test_a_long_list_of_linear_modules_is_shortened():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(45)])
    with pytest.raises(ValueError, match=re.escape(", 39, ... (45 in all)")):
        resolve_targets(model, ["nope"])


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="^Sequential has no nn.Linear or Conv1D modules, so there is nothing to "
                                         "sample$"):
        resolve_targets(nn.Sequential(nn.ReLU()), "full")
