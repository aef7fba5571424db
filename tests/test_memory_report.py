"""Saved-activation accounting by kind, the memory each arm keeps on T5-Base shapes, and ``wtacrs memory`` on\nlocal folders of any family."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from wtacrs import masks
from wtacrs.app.cli import main
from wtacrs.app.memory_report import (
    CAUSAL, CLASSIFIER, SEQ2SEQ, MemoryReportError, build_model, format_reports, measure_arms, parse_arm, prepare_arm,
)
from wtacrs.memory import SavedReport, SavedTensors, saved_by_kind
from wtacrs.sampling import num_kept_rows
from wtacrs.targets import resolve_targets
from tiny_models import LORA_TARGETS, tiny_model


def _tiny_t5(dropout: float) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager",
    )
    return transformers.T5ForConditionalGeneration(config).train()


BATCH = {"input_ids": torch.randint(2, 64, (4, 24), generator=torch.Generator().manual_seed(0)),
         "labels": torch.randint(2, 64, (4, 3), generator=torch.Generator().manual_seed(1))}


def test_kinds_cover_what_saved_tensors_counts():
    model = _tiny_t5(dropout=0.1)
    torch.manual_seed(0)
    with SavedTensors(exclude=model.parameters()) as saved:
        model(**BATCH).loss
    torch.manual_seed(0)
    report = saved_by_kind(model, BATCH)
    kinds = report.by_kind()
    assert sum(kinds.values()) == report.total
    # The same storages up to a few bytes (scalars some nodes keep outside the saved-tensor hooks).
    assert abs(report.total - saved.nbytes) <= 0.001 * saved.nbytes
    relu = 4 * 24 * 64 * 4 * 2  # fp32 ReLU outputs of 2 encoder FFNs; the decoder adds 3-token ones
    assert relu <= kinds["relu"] <= relu * 1.2
    assert kinds["dropout"] > 0 and kinds["attention"] > 0 and kinds["norm"] > 0 and kinds["linear"] > 0
    assert not model._forward_hooks and not any(m._forward_pre_hooks for m in model.modules())


def mask_bound(stock: SavedReport, kind: str) -> int:
    """What 1-bit masks keep for what stock PyTorch keeps as fp32 (ReLU outputs, CPU dropout noise): a 32nd, each
    mask padded to a whole byte, plus a 4-byte value per dropout mask (its scale)."""
    items = [item for item in stock.items if item.kind == kind]
    assert all(item.dtype == "float32" for item in items)
    return sum(-(-item.nbytes // 4 // 8) + 4 for item in items)


def test_compact_masks_keep_one_bit_per_element():
    model = _tiny_t5(dropout=0.1)
    torch.manual_seed(0)
    stock_report = saved_by_kind(model, BATCH)
    stock = stock_report.by_kind()
    masks.patch_compact_masks(model)
    torch.manual_seed(0)
    compact = saved_by_kind(model, BATCH).by_kind()
    for kind in ("relu", "dropout"):
        assert 0 < compact[kind] <= mask_bound(stock_report, kind), kind
    assert compact["linear"] == stock["linear"] and compact["attention"] == stock["attention"]


def test_linear_inputs_stored_twice_are_reported():
    # Dropout 0: the ReLU output is wo's input.
    shared = saved_by_kind(_tiny_t5(dropout=0.0), BATCH).shared_linear_inputs()
    assert len(shared) == 3  # one per FFN: 2 encoder, 1 decoder
    for item in shared:
        assert item.kind == "relu"
        assert [m.rsplit(".", 1)[1] for m in item.modules] == ["act", "wo"]
    # Dropout 0.1 in training: wo reads the dropout output, nothing is stored twice.
    assert saved_by_kind(_tiny_t5(dropout=0.1), BATCH).shared_linear_inputs() == []


def sampling_bound(without: SavedReport, sampled: set[str], budget: float, token_rows: int) -> int:
    """The most an arm with linear sampling may keep, from the same arm without it (``without``): each input that
    only sampled layers keep shrinks to k = num_kept_rows(N, budget) of its N rows plus an int64 index and an fp32
    scale per kept row; one int64 token id per row of each stack (``token_rows`` in all) is added for the per-token
    gradient statistics. Inputs that several sampled layers read count once (one shared sample) or once per
    layer (an upper bound either way)."""
    total = without.total + 8 * token_rows
    for item in without.items:
        if item.kind == "linear" and item.modules and all(m in sampled for m in item.modules):
            d = item.shape[-1]
            rows = math.prod(item.shape) // d
            element = item.nbytes // math.prod(item.shape)
            total += num_kept_rows(rows, budget) * (d * element + 8 + 4) - item.nbytes
    return total


def test_t5_base_shapes_linear_sampling_keeps_only_the_sampled_rows():
    """T5-Base layer shapes (d_model 768, d_ff 3072, 12 heads), batch 8, source 128, decoder 4, fp32, CPU.

    Two encoder and two decoder layers and a 1,024-word vocabulary keep it fast; the saved bytes are per-layer
    dominated (the vocabulary only sizes the 4-token logits), so the ratios are those of the 12-layer model up
    to the embedding-side terms (results/memory_t5-base_b8_s128.txt has the full model). Each arm with linear
    sampling keeps at most ``sampling_bound`` of the same arm without it, which that arm, keeping every row,
    exceeds: the bound cannot be met without sampling the linear layers.
    """
    batch, seq, target, budget = 8, 128, 4, 0.3
    arms = [f"{base}{features}" for base in ("full", "lora") for features in ("", "+masks+attn", "+wta+masks+attn")]
    reports = measure_arms("t5-base", arms, batch_size=batch, seq_len=seq, target_len=target, budget=budget,
                           num_layers=2, vocab_size=1024)
    print("\n" + format_reports(reports))
    for base in ("full", "lora"):
        model, _ = build_model("t5-base", num_layers=2, vocab_size=1024)
        sampled = set(resolve_targets(prepare_arm(model, base, budget), base).names)
        without, ours, stock = reports[f"{base}+masks+attn"], reports[f"{base}+wta+masks+attn"], reports[base]
        bound = sampling_bound(without, sampled, budget, batch * (seq + target))
        print(f"{base}: stock {stock.total}, masks+attn {without.total}, bound {bound} "
              f"({bound / stock.total:.3f} of stock), masks+attn+wta {ours.total} ({ours.total / stock.total:.3f})")
        assert ours.total <= bound < without.total
        kinds, stock_kinds = ours.by_kind(), stock.by_kind()
        for kind in ("relu", "dropout"):
            assert kinds[kind] <= mask_bound(stock, kind), (base, kind)
        assert kinds["attention"] < stock_kinds["attention"]
        assert kinds["norm"] == stock_kinds["norm"]  # sampling and masks leave the norms' saves alone
        # The 1-bit LoRA-dropout mask that a sampled lora_A shares with its dropout is not a linear input.
        assert ours.shared_linear_inputs() == [], base


FOLDER_FAMILIES = ["t5", "bert", "opt", "gpt2", "llama",  # the families wtacrs memory knew by name
                   "gpt_neox", "bart", "distilbert", "mistral", "qwen3", "t5v1.1", "roberta", "qwen2"]


@pytest.mark.parametrize("family", FOLDER_FAMILIES)
def test_memory_command_on_a_local_folder_of_any_family(family, tmp_path, capsys):
    tiny_model(family).config.save_pretrained(tmp_path)  # config only: random init
    out = tmp_path / "report.json"
    arms = ["full", "full+wta+masks", "lora", "lora+wta+masks+attn"]
    assert main(["memory", str(tmp_path), "--batch-size", "2", "--seq-len", "24", "--arms", *arms,
                 "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "lora+wta+masks+attn" in printed.out and "vs stock" in printed.out and printed.err == ""
    data = json.loads(out.read_text())
    assert list(data["arms"]) == arms
    totals = {arm: report["total"] for arm, report in data["arms"].items()}
    assert totals["full+wta+masks"] < totals["full"] and totals["lora+wta+masks+attn"] < totals["lora"]
    assert data["arms"]["lora+wta+masks+attn"]["by_kind"]["attention"] < data["arms"]["lora"]["by_kind"]["attention"]


@pytest.mark.parametrize("family,kind", [("gpt_neox", CAUSAL), ("bart", SEQ2SEQ), ("distilbert", CLASSIFIER),
                                         ("t5v1.1", SEQ2SEQ), ("roberta", CLASSIFIER), ("qwen3", CAUSAL)])
def test_a_folder_with_weights_is_loaded_with_its_head_and_lora_on_q_k_v(family, kind, tmp_path):
    saved = tiny_model(family)
    saved.save_pretrained(tmp_path)
    model, got = build_model(str(tmp_path), dropout=0.0)
    assert got == kind
    weights = dict(model.named_parameters())
    shared = [n for n, p in saved.named_parameters() if n in weights and n.endswith("weight")]
    assert shared and all(torch.equal(weights[n], dict(saved.named_parameters())[n]) for n in shared)
    lora = prepare_arm(model, "lora", 0.3)
    adapted = {n.rsplit(".", 2)[0].rsplit(".", 1)[1] for n, _ in lora.named_modules() if n.endswith("lora_A.default")}
    assert adapted == set(LORA_TARGETS[family])


def test_options_override_depth_vocabulary_and_dropout_whatever_the_family_calls_them():
    for name, layers in (("t5-small", ("encoder.block", "decoder.block")), ("gpt2", ("transformer.h",)),
                         ("opt-125m", ("model.decoder.layers",))):
        model, _ = build_model(name, num_layers=1, vocab_size=64, dropout=0.0)
        for path in layers:
            assert len(model.get_submodule(path)) == 1
        assert model.get_input_embeddings().num_embeddings == 64
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("arm", ["qlora", "lora+wta+wta", "full+fast", ""])
def test_parse_arm_rejects_unknown(arm):
    with pytest.raises(MemoryReportError, match="arm must be 'full' or 'lora'"):
        parse_arm(arm)
    assert parse_arm("lora+masks+wta") == ("lora", frozenset({"masks", "wta"}))


def test_unknown_config_name():
    with pytest.raises(MemoryReportError, match="MODEL_OR_CONFIG must be a local model folder or one of t5-small"):
        measure_arms("t5-huge", ["full"], 1, 8)


def test_lora_arms_need_attention_projections(tmp_path):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2))

    with pytest.raises(MemoryReportError, match=r"^found no attention query/key/value projections in Plain for the "
                                                r"LoRA arms"):
        prepare_arm(Plain(), "lora", 0.3)
