"""Saved-activation accounting by kind, and the memory each arm keeps on T5-Base shapes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from wtacrs import masks
from wtacrs.app.cli import main
from wtacrs.memory import SavedTensors
from wtacrs.app.memory_report import format_reports, measure_arms, parse_arm
from wtacrs.memory import saved_by_kind


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


def test_compact_masks_cut_relu_and_dropout_bytes_7x():
    model = _tiny_t5(dropout=0.1)
    torch.manual_seed(0)
    stock = saved_by_kind(model, BATCH).by_kind()
    masks.patch_compact_masks(model)
    torch.manual_seed(0)
    compact = saved_by_kind(model, BATCH).by_kind()
    for kind in ("relu", "dropout"):
        assert 0 < compact[kind] * 7 <= stock[kind], kind
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


def test_t5_base_shapes_arms_within_40_percent_of_stock():
    """T5-Base layer shapes (d_model 768, d_ff 3072, 12 heads), batch 8, source 128, decoder 4, fp32, CPU.

    Two encoder and two decoder layers and a 1,024-word vocabulary keep it fast; the saved bytes are per-layer
    dominated (the vocabulary only sizes the 4-token logits), so the ratios are those of the 12-layer model up
    to the embedding-side terms (results/memory_t5-base_b8_s128.txt has the full model).
    """
    arms = ["full", "full+wta+masks+attn", "lora", "lora+wta+masks+attn"]  # the rest: results/memory_*.txt
    reports = measure_arms("t5-base", arms, batch_size=8, seq_len=128, num_layers=2, vocab_size=1024)
    print("\n" + format_reports(reports))
    ratio = {arm: reports[arm].total / reports[arm.split("+")[0]].total for arm in arms}
    assert ratio["lora+wta+masks+attn"] <= 0.40
    assert ratio["full+wta+masks+attn"] <= 0.40
    lora, ours = reports["lora"].by_kind(), reports["lora+wta+masks+attn"].by_kind()
    assert ours["relu"] * 7 <= lora["relu"] and ours["dropout"] * 7 <= lora["dropout"]
    assert ours["attention"] < 0.5 * lora["attention"]


def test_memory_command_on_a_local_config_folder(tmp_path, capsys):
    _tiny_t5(dropout=0.1).config.save_pretrained(tmp_path)  # config only: random init
    out = tmp_path / "report.json"
    assert main(["memory", str(tmp_path), "--batch-size", "2", "--seq-len", "16", "--arms", "lora",
                 "lora+masks", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora+masks" in printed and "dropout" in printed and "vs stock" in printed
    data = json.loads(out.read_text())
    assert set(data["arms"]) == {"lora", "lora+masks"}
    assert data["arms"]["lora+masks"]["total"] < data["arms"]["lora"]["total"]


@pytest.mark.parametrize("arm", ["qlora", "lora+wta+wta", "full+fast", ""])
def test_parse_arm_rejects_unknown(arm):
    with pytest.raises(ValueError, match="arm must be 'full' or 'lora'"):
        parse_arm(arm)
    assert parse_arm("lora+masks+wta") == ("lora", frozenset({"masks", "wta"}))


def test_unknown_config_name():
    with pytest.raises(ValueError, match="MODEL_OR_CONFIG must be a local model folder or one of t5-small"):
        measure_arms("t5-huge", ["full"], 1, 8)
