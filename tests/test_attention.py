"""Attention sampling: unbiased batched column sampling, sampled matmul gradients, and the model patch."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from wtacrs import attention
from wtacrs.attention import sample_columns, sampled_matmul
from wtacrs.memory import SavedTensors

TRIALS = 2000


@pytest.mark.parametrize("method", ["wta_crs", "crs", "uniform"])
def test_sample_columns_unbiased_per_index(method):
    # E[sum of a column's scales over its slots] = 1 for every column: the estimate of any sum is unbiased.
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 12, generator=g) ** 2 + 0.02
    idx, scales = sample_columns(probs.repeat(TRIALS, 1), 4, method, generator=g)
    assert idx.shape == scales.shape == (3 * TRIALS, 4)
    weight = torch.zeros(3 * TRIALS, 12).scatter_add_(1, idx, scales).view(TRIALS, 3, 12)
    mean, se = weight.mean(0), weight.std(0) / TRIALS**0.5
    exact = se == 0  # winners: kept with scale 1 in every trial
    assert torch.all((mean - 1).abs()[~exact] <= 4 * se[~exact])
    assert torch.allclose(mean[exact], torch.ones_like(mean[exact]))


def test_sample_columns_topk_is_biased_and_detected():
    probs = torch.arange(1.0, 13.0).repeat(TRIALS, 1)
    idx, scales = sample_columns(probs, 4, "topk")
    weight = torch.zeros(TRIALS, 12).scatter_add_(1, idx, scales)
    assert torch.equal(weight.mean(0)[:8], torch.zeros(8))  # never kept: an estimate of those terms is always 0


def test_sample_columns_zero_rows_and_bad_k():
    idx, scales = sample_columns(torch.zeros(2, 5), 2)
    assert idx.shape == (2, 2) and torch.isfinite(scales).all()
    with pytest.raises(ValueError, match=r"k \(indices to keep\) must be in \[1, 5\]; got 6"):
        sample_columns(torch.ones(2, 5), 6)


def test_sampled_matmul_forward_is_matmul_and_saves_less():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 40, 64, generator=g, requires_grad=True)
    b = torch.randn(2, 3, 64, 40, generator=g, requires_grad=True)
    with SavedTensors() as stock:
        ref = torch.matmul(a, b)
    with SavedTensors() as ours:
        out = sampled_matmul(a, b, 0.3)
    assert torch.equal(out, ref)
    # k = ceil(0.3 * 64) = 20 of 64 columns of a and rows of b, plus int64 indices and fp32 scales.
    assert ours.nbytes == 2 * 3 * (20 * 40 * 4 * 2 + 20 * (8 + 4))
    assert stock.nbytes == a.numel() * 4 + b.numel() * 4
    assert sampled_matmul(a, b, 1.0).grad_fn.name() != "_SampledMatmulFunctionBackward"


def test_sampled_matmul_under_autocast_matches_autocast_matmul():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 40, 64, generator=g, requires_grad=True)
    b = torch.randn(2, 3, 64, 40, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.matmul(a, b)
        out = sampled_matmul(a, b, 0.3)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32


def _attention(q, k, v, w, sampled: bool, dropout_like: bool, method="wta_crs"):
    """Eager attention ``softmax(q kᵀ) v``; ``dropout_like`` puts an op between softmax and the second matmul (as
    dropout does), so the softmax output is not reused and the attention matrix is sampled too."""
    mm = (lambda x, y, keep_a=False: sampled_matmul(x, y, 0.3, method, min_rows=2, keep_a=keep_a)) if sampled \
        else (lambda x, y, keep_a=False: x @ y)
    probs = mm(q, k.transpose(-1, -2)).softmax(-1)
    if dropout_like:
        probs = probs * 1.0
    return (mm(probs, v, keep_a=not dropout_like) * w).sum()


def _z_scores(dropout_like: bool, method: str = "wta_crs") -> list[torch.Tensor]:
    """|mean of TRIALS sampled gradients - exact| / standard error, for q, k, v (one vectorised backward)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, w = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(4))
    q[..., 3] *= 5  # one dominant head dimension, as real queries have
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    _attention(*exact, w, sampled=False, dropout_like=dropout_like).backward()
    torch.manual_seed(4)
    trials = [t.repeat(TRIALS, 1, 1, 1).requires_grad_() for t in (q, k, v)]
    _attention(*trials, w.repeat(TRIALS, 1, 1, 1), sampled=True, dropout_like=dropout_like, method=method).backward()
    scores = []
    for est, ref in zip(trials, exact):
        grads = est.grad.view(TRIALS, *ref.shape)
        se = grads.std(0) / TRIALS**0.5
        # An exactly estimated entry (se = 0) may differ from the reference by rounding only.
        scores.append((grads.mean(0) - ref.grad).abs() / (se + 1e-5 * ref.grad.abs().max()))
    return scores


@pytest.mark.parametrize("dropout_like", [False, True], ids=["softmax-kept-whole", "both-sampled"])
def test_sampled_attention_gradients_unbiased_within_4_se(dropout_like):
    for name, z in zip("qkv", _z_scores(dropout_like)):
        assert z.max() <= 4.0, (name, z.max().item())


def test_unbiasedness_check_can_fail_on_biased_topk():
    assert max(z.max().item() for z in _z_scores(dropout_like=True, method="topk")) > 10


def test_sampled_matmul_rejects_bad_arguments():
    a, b = torch.randn(2, 4, 5), torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="same batch shape and K"):
        sampled_matmul(a, b)
    with pytest.raises(ValueError, match="budget must be in"):
        sampled_matmul(a, torch.randn(2, 5, 3), 0.0)


#: Families whose attention the patch must reach (each computes attention in its own eager Python code).
FAMILIES = ["t5", "bert", "gpt2", "opt", "llama", "gpt_neox", "distilbert", "bart", "mistral"]


def _tiny(family: str, attn: str = "eager") -> nn.Module:
    from tiny_models import tiny_model

    return tiny_model(family, attn_implementation=attn)


def _batch(family: str) -> dict[str, torch.Tensor]:
    from tiny_models import tiny_batch

    return tiny_batch(family)


def _forward(model, batch):
    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(**batch).loss
    return loss, saved.nbytes


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_reaches_both_attention_matmuls_keeps_forward_exact_and_saves_less(family):
    batch = _batch(family)
    loss_ref, bytes_ref = _forward(_tiny(family), batch)
    model = _tiny(family)
    undo = attention.patch_attention(model, 0.3, min_rows=2)  # head dim 8 and 12 tokens: both matmuls sampled
    loss, nbytes = _forward(model, batch)
    assert torch.equal(loss, loss_ref)
    assert nbytes < bytes_ref
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    sampled = [n for n in _graph_nodes(loss) if "SampledMatmul" in type(n).__name__]
    assert len(sampled) == 2 * len(attention.attention_modules(model))  # q kᵀ and attn · v in each
    attention.unpatch(undo)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert _forward(model, batch)[1] == bytes_ref


def _graph_nodes(t: torch.Tensor) -> list:
    seen, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


def test_patch_switches_to_eager_and_back():
    model = _tiny("bart", attn="sdpa")  # BART: SDPA on transformers 4 and 5 (T5 has it only from 5 on)
    undo = attention.patch_attention(model, 0.3)
    assert model.config._attn_implementation == "eager"
    assert model.model.encoder.layers[0].self_attn.config._attn_implementation == "eager"
    loss = model(**_batch("bart")).loss
    assert any("SampledMatmul" in type(n).__name__ for n in _graph_nodes(loss))
    attention.unpatch(undo)
    assert model.config._attn_implementation == "sdpa"
    assert model.model.encoder.layers[0].self_attn.config._attn_implementation == "sdpa"


def test_eval_mode_runs_stock_matmuls():
    model = _tiny("bert")
    attention.patch_attention(model, 0.3)
    model.eval()
    loss = model(**_batch("bert")).loss
    assert not any("SampledMatmul" in type(n).__name__ for n in _graph_nodes(loss))


def test_patch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget must be in"):
        attention.patch_attention(_tiny("bert"), 1.5)
    with pytest.raises(ValueError, match="method must be one of"):
        attention.patch_attention(_tiny("bert"), 0.3, method="best")
    with pytest.raises(ValueError, match="no attention module"):
        attention.patch_attention(nn.Linear(2, 2), 0.3)
    model = _tiny("bert")
    undo = attention.patch_attention(model, 0.3)
    with pytest.raises(ValueError, match="already patched"):
        attention.patch_attention(model, 0.3)
    attention.unpatch(undo)
    attention.unpatch(attention.patch_attention(model, 0.3))


def test_patch_through_peft_switches_to_eager_and_back():
    import peft

    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    model = peft.get_peft_model(_tiny("bart", attn="sdpa"), lora)
    undo = attention.patch_attention(model, 0.3)
    inner = model.base_model.model.model.encoder.layers[0].self_attn
    assert inner.config._attn_implementation == "eager"
    loss = model(**_batch("bart")).loss
    assert any("SampledMatmul" in type(n).__name__ for n in _graph_nodes(loss))
    attention.unpatch(undo)
    assert inner.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["softmax-kept", "compact-dropout-rebuilt"])
def test_gradient_checkpointing_replays_the_same_sample(dropout):
    # The checkpoint restores the RNG before recomputing, so the recomputed layer draws the same indices (and
    # dropout masks; the saved shapes are fixed, as the checkpoint requires): the gradients equal those without
    # checkpointing up to the order in which parameter gradients are summed (a few float32 roundings, far below
    # 1e-5), whereas other rows would change them at the order of the sampling noise itself.
    from wtacrs import masks

    batch = _batch("t5")
    grads = []
    for checkpointing in (False, True):
        model = _tiny("t5")
        model.config.dropout_rate = dropout
        for module in model.modules():
            if type(module).__name__ == "T5Attention":
                module.dropout = dropout
            elif isinstance(module, nn.Dropout):
                module.p = dropout
        attention.patch_attention(model, 0.3, min_rows=2, compact_dropout=True)
        masks.patch_compact_masks(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())


def test_dropped_out_attention_matrix_is_rebuilt_not_stored():
    # With compact dropout after softmax, attn · V keeps nothing of the attention matrix beyond what softmax and
    # dropout keep: grad_V is exact (the dropped-out matrix is rebuilt bit for bit), and the saved bytes of the
    # matmul are V's sampled rows, their indices and scales only.
    from wtacrs.masks import dropout_with_mask

    g = torch.Generator().manual_seed(6)
    scores = torch.randn(2, 3, 40, 40, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 40, 64, generator=g, requires_grad=True)
    grad = torch.randn(2, 3, 40, 64, generator=g)
    torch.manual_seed(9)
    probs = scores.softmax(-1)
    ref = torch.nn.functional.dropout(probs, 0.1) @ v
    ref.backward(grad)
    grad_v_ref = v.grad.clone()
    v.grad = None
    torch.manual_seed(9)
    probs = scores.softmax(-1)
    dropped, packed, value = dropout_with_mask(probs, 0.1)
    with SavedTensors(exclude=[probs, packed, value]) as saved:
        out = attention._sampled_matmul(dropped, v, 0.3, "wta_crs", None, 10, a_source=probs, packed=packed,
                                        value=value)
    assert torch.equal(out, ref)
    k = 12  # ceil(0.3 * 40)
    assert saved.nbytes == 2 * 3 * (k * 64 * 4 + k * 8 + k * 4)  # rows of V, int64 indices, float32 scales
    out.backward(grad)
    assert torch.equal(v.grad, grad_v_ref)  # the same products of the same rebuilt matrix


def test_patched_model_pickles_and_still_samples(tmp_path):
    model = _tiny("llama")
    attention.patch_attention(model, 0.3, min_rows=2)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loss = loaded(**_batch("llama")).loss
    assert sum("SampledMatmul" in type(n).__name__ for n in _graph_nodes(loss)) == 2 * len(
        attention.attention_modules(loaded))
