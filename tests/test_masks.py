"""Compact ReLU/dropout: bit-identical to stock PyTorch (values, gradients, random stream) with 1-bit saved masks,
patched into models without intercepting torch calls at run time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from wtacrs import masks
from wtacrs.kernels import pack_bits, unpack_bits
from wtacrs.masks import CompactDropout, CompactReLU, compact_dropout, compact_relu, dropout_with_mask, rebuild_dropout
from wtacrs.memory import SavedTensors


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != +0.0 and NaN == NaN in comparisons."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_pack_unpack_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_relu_bit_identical(inplace, dtype):
    torch.manual_seed(0)
    x = torch.randn(37, 29, dtype=dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")], dtype=dtype)
    grad = torch.randn(37, 29, dtype=dtype)
    grad[1, 0] = float("inf")
    results = []
    for fn in (lambda t: F.relu(t, inplace=inplace), lambda t: compact_relu(t, inplace)):
        leaf = x.clone().requires_grad_()
        out = fn(leaf * 1.0)  # a non-leaf, so in-place is allowed
        out.backward(grad)
        results.append((out, leaf.grad))
    (out_ref, grad_ref), (out, grad_x) = results
    assert torch.equal(bits(out), bits(out_ref))
    assert torch.equal(bits(grad_x), bits(grad_ref))


@pytest.mark.parametrize("p", [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_bit_identical_and_same_random_stream(p, dtype, transposed):
    x = torch.randn(48, 33, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if transposed:  # a non-contiguous input: the mask must follow the same memory order as ATen's
        x = x.t()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    results = []
    for module in (nn.Dropout(p), CompactDropout(p)):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(123)
        out = module(leaf)
        after = torch.rand(4)  # the generator must have advanced by the same amount
        out.backward(grad)
        results.append((out, leaf.grad, after))
    (out_ref, grad_ref, after_ref), (out, grad_x, after) = results
    assert torch.equal(bits(out), bits(out_ref))
    assert torch.equal(bits(grad_x), bits(grad_ref))
    assert torch.equal(after, after_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_dropout_path_matches_native_dropout(monkeypatch, dtype):
    """The CUDA path (``native_dropout``, as ``F.dropout`` runs there), run on CPU: output, gradient and random
    stream equal ``native_dropout`` and ``native_dropout_backward``."""
    monkeypatch.setattr(masks, "_dropout_kernel_is_fused", lambda x: True)
    p = 0.3
    x = torch.randn(40, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad = torch.randn(40, 33, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.manual_seed(5)
    ref, keep = torch.native_dropout(x, p, True)
    ref_grad = torch.ops.aten.native_dropout_backward(grad, keep, 1 / (1 - p))
    after_ref = torch.rand(3)
    leaf = x.clone().requires_grad_()
    torch.manual_seed(5)
    out = compact_dropout(leaf, p)
    after = torch.rand(3)
    out.backward(grad)
    assert torch.equal(bits(out), bits(ref)) and torch.equal(bits(leaf.grad), bits(ref_grad))
    assert torch.equal(after, after_ref)


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-path", "fused-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_with_mask_rebuilds_its_output(monkeypatch, fused, dtype):
    monkeypatch.setattr(masks, "_dropout_kernel_is_fused", lambda x: fused)
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    torch.manual_seed(7)
    out, packed, value = dropout_with_mask(x, 0.2)
    assert packed.dtype == torch.uint8 and packed.numel() == (x.numel() + 7) // 8 and value.dim() == 0
    assert torch.equal(bits(rebuild_dropout(x.detach(), packed, value)), bits(out))
    torch.manual_seed(7)
    assert torch.equal(bits(compact_dropout(x, 0.2)), bits(out)), "same draws as compact_dropout"
    with torch.no_grad():  # no gradient needed: the mask is still made (a layer reading out may need it)
        assert dropout_with_mask(x, 0.2)[1] is not None
    assert dropout_with_mask(x, 0.2, training=False)[1:] == (None, None)


def test_dropout_passthrough_cases_match_stock():
    x = torch.randn(5, 6, requires_grad=True)
    assert compact_dropout(x, 0.3, training=False) is F.dropout(x, 0.3, training=False)
    assert torch.equal(compact_dropout(x, 0.0), x) and torch.equal(compact_dropout(x, 1.0), torch.zeros(5, 6))
    with torch.no_grad():
        torch.manual_seed(3)
        ref = F.dropout(x, 0.4)
        torch.manual_seed(3)
        assert torch.equal(compact_dropout(x, 0.4), ref)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]; got 1.5"):
        compact_dropout(x, 1.5)


@pytest.mark.parametrize(
    "stock, compact",
    [(lambda t: F.relu(t), compact_relu), (lambda t: F.dropout(t, 0.1), lambda t: compact_dropout(t, 0.1))],
    ids=["relu", "dropout"],
)
def test_saved_bytes_at_least_7x_smaller(stock, compact):
    x = torch.randn(64, 1000, requires_grad=True)
    with SavedTensors() as saved_stock:
        stock(x)
    with SavedTensors() as saved_compact:
        compact(x)
    assert saved_stock.nbytes >= 4 * x.numel()
    # 1 bit per element (+ a 0-dim scale for CPU dropout): 32x below fp32.
    assert saved_compact.nbytes * 7 <= saved_stock.nbytes
    assert saved_compact.nbytes <= x.numel() // 8 + 16


def _tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "t5":
        config = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
            dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager",
        )
        return transformers.T5ForConditionalGeneration(config)
    if family == "bert":
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            attn_implementation="eager",
        )
        return transformers.BertForSequenceClassification(config)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                         attn_implementation="eager")
        return transformers.GPT2LMHeadModel(config)
    if family == "opt":
        config = transformers.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
            attn_implementation="eager",
        )
        return transformers.OPTForCausalLM(config)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.1, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def _batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 64, (3, 16), generator=g)
    if family == "t5":
        return {"input_ids": ids, "labels": torch.randint(2, 64, (3, 4), generator=g)}
    if family == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1, 1])}
    return {"input_ids": ids, "labels": ids}


def _step(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    model.train()
    torch.manual_seed(11)
    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, saved.nbytes


@pytest.mark.parametrize("family", ["t5", "bert", "gpt2", "opt", "llama"])
def test_patched_model_bit_identical_with_fewer_saved_bytes(family):
    batch = _batch(family)
    loss_ref, grads_ref, bytes_ref = _step(_tiny(family), batch)
    model = _tiny(family)
    originals = dict(model.named_modules())
    undo = masks.patch_compact_masks(model)
    loss, grads, nbytes = _step(model, batch)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.equal(bits(grad), bits(grads_ref[name])), name
    assert nbytes < bytes_ref
    masks.unpatch(undo)
    assert all(module is originals[name] for name, module in model.named_modules())
    assert not any(isinstance(m, (CompactReLU, CompactDropout)) for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_covered_modules_t5_and_peft_lora_dropout():
    import peft

    model = peft.get_peft_model(_tiny("t5"), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                            target_modules=["q", "k", "v"]))
    before = dict(model.named_modules())
    undo = masks.patch_compact_masks(model)
    swapped = {name for name, module in model.named_modules() if module is not before.get(name)}
    assert any(name.endswith("DenseReluDense.act") for name in swapped)
    assert any(name.endswith("DenseReluDense.dropout") for name in swapped)
    # q, k, v in 3 attention blocks: 2 encoder self-attention, decoder self-attention and cross-attention.
    assert sum(name.endswith("lora_dropout.default") for name in swapped) == 3 * 4
    # Functional dropout in eager attention: T5Attention's forward calls nn.functional.dropout.
    attention = model.base_model.model.encoder.block[0].layer[0].SelfAttention
    assert "forward" in attention.__dict__
    layer = attention.q
    assert isinstance(layer.lora_dropout["default"], CompactDropout)
    masks.unpatch(undo)
    assert type(layer.lora_dropout["default"]) is nn.Dropout and "forward" not in attention.__dict__
    assert all(module is before[name] for name, module in model.named_modules())


def test_patch_rejects_non_module_and_second_patch():
    with pytest.raises(ValueError, match="model must be an nn.Module; got int"):
        masks.patch_compact_masks(3)
    model = _tiny("bert")
    undo = masks.patch_compact_masks(model)
    with pytest.raises(ValueError, match="already has compact masks"):
        masks.patch_compact_masks(model)
    masks.unpatch(undo)
    masks.unpatch(masks.patch_compact_masks(model))


def test_patched_model_can_be_pickled(tmp_path):
    model = _tiny("t5")
    masks.patch_compact_masks(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loss, _, _ = _step(loaded, _batch("t5"))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["t5", "opt"])
def test_gradient_checkpointing_recompute_draws_the_same_masks(family):
    # The checkpoint restores the RNG before recomputing, and compact and stock dropout draw alike, so a checkpointed
    # patched model runs the same kernels in the same order as the checkpointed stock model: bit-identical.
    batch = _batch(family)
    results = []
    for patched in (False, True):
        model = _tiny(family)
        if patched:
            masks.patch_compact_masks(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results.append(_step(model, batch))
    (loss_ref, grads_ref, _), (loss, grads, _) = results
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.equal(bits(grad), bits(grads_ref[name])), name


def test_no_torch_function_mode_in_the_library():
    """Masks and attention sampling are patched in; nothing intercepts torch calls at run time."""
    import ast
    import pathlib

    import wtacrs

    def names(path: pathlib.Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {getattr(n, "id", None) or getattr(n, "attr", None) for n in ast.walk(tree)} - {None}

    sources = sorted(pathlib.Path(wtacrs.__file__).parent.rglob("*.py"))
    assert sources and not [p.name for p in sources if {"TorchFunctionMode", "__torch_function__"} & names(p)]
