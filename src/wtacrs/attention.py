"""Sampling inside attention (the paper's "level 2"): the two attention matmuls keep only sampled operands.

``C = A @ B`` with contraction dimension ``K`` (for ``Q Kᵀ``: the head dimension; for ``attn · V``: the key
length). Backward needs ``B`` for ``grad_A = grad_C Bᵀ`` and ``A`` for ``grad_B = Aᵀ grad_C``; both are sums over
``k = 1..K`` of one column of ``A`` times one row of ``B``. ``sampled_matmul`` computes ``C`` exactly and keeps,
per batch matrix (per (batch, head) in attention), only the WTA-CRS sample of ``k`` indices with their scales:
columns ``A[..., :, k]`` and rows ``B[..., k, :]``. Backward gives

    grad_A[..., :, k] = s_k * grad_C @ B[..., k, :]ᵀ   and   grad_B[..., k, :] = s_k * A[..., :, k]ᵀ @ grad_C

for sampled ``k`` (summed over repeated draws) and zero elsewhere. ``E[s_k * count_k] = 1`` for every ``k``, so
both are unbiased estimates of the exact gradients (plain PyTorch: ``torch.matmul`` and its autograd). Unlike
``sampled_linear``, this approximates *activation* gradients, which then flow on into earlier layers: the whole
model's gradient stays unbiased (each matmul draws independently), but its variance grows. Off by default.

Sampling probabilities mix the two operands' norms evenly (see ``_index_probabilities``). The number kept is
``num_kept_rows(K, budget, min_rows)``; all draws are stored (duplicates are not merged), so the saved shapes are
fixed. The attention matrix feeding ``attn · V`` is kept whole instead of sampled when other ops keep it anyway: the
softmax output (softmax saves it for its own backward), or a compact dropout of it (``wtacrs.masks``: rebuilt in
backward from the softmax output and the 1-bit mask). That adds no memory and makes ``grad_V`` exact; only
``V``'s rows are sampled. With stock dropout the dropped-out matrix is sampled like any operand.

``patch_attention_sampling(model, budget)`` routes the two matmuls of every eager attention function in a model
(T5, BERT/RoBERTa, GPT-2, OPT, LLaMA-family; any attention module whose class name ends in ``Attention`` and
that calls ``torch.matmul`` on two activations) through ``sampled_matmul`` while that module runs in training.
SDPA/flash attention keep no attention matrix and have no matmul to sample, so the model is switched to eager
attention (and switched back by ``unpatch``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .masks import dropout_rebuilder
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, num_kept_rows

__all__ = ["patch_attention_sampling", "sample_columns", "sampled_matmul", "unpatch"]


def sample_columns(
    probs: Tensor, k: int, method: Method = "wta_crs", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``sampling.sample_rows`` for each row of ``probs`` (G, K) at once, with ``k`` fixed slots per row.

    Returns ``(indices, scales)``, both (G, k): int64 indices into ``K`` (a repeated draw appears in several
    slots) and float32 scales such that ``sum_t scales[g, t] * term[g, indices[g, t]]`` is an unbiased estimate of
    ``sum_j term[g, j]`` (biased for ``"topk"``). No host synchronisation.
    """
    check_method(method)
    g, n = probs.shape
    if not 1 <= k <= n:
        raise ValueError(f"k (indices to keep) must be in [1, {n}]; got {k}")
    p = probs.detach().float()
    p = torch.where(torch.isfinite(p) & (p > 0), p, torch.zeros_like(p))
    if method == "uniform":
        p = torch.ones_like(p)
    total = p.sum(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    # An all-zero row has all-zero terms: any index gives the exact (zero) answer.
    p = torch.where(total > 0, p / total.clamp_min(tiny), torch.full_like(p, 1.0 / n))
    top_p, top_idx = torch.topk(p, k, dim=1, sorted=True)
    if method == "topk":
        return top_idx, torch.ones_like(top_p)
    slots = torch.arange(k, device=p.device)
    if method == "wta_crs":
        # rest[:, c] = mass outside the c largest, c = 0..k-1; the winner count minimises rest / (k - c).
        rest = (1.0 - torch.cumsum(top_p, 1) + top_p).clamp_min(0.0)
        c = torch.argmin(rest / (k - slots).float(), dim=1, keepdim=True)
        is_winner = slots < c
    else:
        is_winner = torch.zeros(g, k, dtype=torch.bool, device=p.device)
    draws = (k - is_winner.sum(1, keepdim=True)).float()
    rest_p = p.scatter(1, top_idx, torch.where(is_winner, torch.zeros_like(top_p), top_p))
    rest_mass = rest_p.sum(1, keepdim=True)
    has_rest = rest_mass > 0
    drawn = torch.multinomial(torch.where(has_rest, rest_p, p), k, replacement=True, generator=generator)
    draw_scale = torch.where(has_rest, rest_mass / (draws * p.gather(1, drawn)), torch.zeros_like(top_p))
    drawn = torch.where(has_rest, drawn, top_idx[:, :1])
    indices = torch.where(is_winner, top_idx, drawn)
    scales = torch.where(is_winner, torch.ones_like(draw_scale), draw_scale)
    return indices, scales


def _index_probabilities(a3: Tensor, b3: Tensor, keep_a: bool) -> Tensor:
    """Per contraction index k: ``||B[k, :]||`` alone when only ``grad_A`` is estimated, else the even mixture
    ``||A[:, k]|| / sum ||A|| + ||B[k, :]|| / sum ||B||``.

    ``grad_A``'s column k is ``grad_C @ B[k, :]ᵀ``, whatever ``A[:, k]`` is (and ``grad_B``'s row k does not depend on
    ``B``), so each gradient wants probabilities that follow one operand. The product ``||A[:, k]|| * ||B[k, :]||``
    that suits the product ``A @ B`` gives a rarely drawn index with a large gradient a huge scale: on random
    attention inputs its mean of 2,000 gradient estimates lay up to 88 standard errors from the exact value (a
    heavy tail, not a bias). The mixture keeps each scale within twice the one-operand choice.
    """
    nb = torch.linalg.vector_norm(b3.float(), dim=2)
    if keep_a:
        return nb
    na = torch.linalg.vector_norm(a3.float(), dim=1)
    tiny = torch.finfo(torch.float32).tiny
    return na / na.sum(1, keepdim=True).clamp_min(tiny) + nb / nb.sum(1, keepdim=True).clamp_min(tiny)


def _identity(a: Tensor) -> Tensor:
    return a


class _SampledMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, k: int, method: str, generator, a_source) -> Tensor:
        """``a_source``: ``None`` samples ``a``'s columns; ``(tensors, rebuild)`` keeps ``a = rebuild(*tensors)``
        whole from tensors that other ops keep anyway."""
        out = torch.matmul(a, b)
        (m, kk), n = a.shape[-2:], b.shape[-1]
        a3, b3 = a.detach().reshape(-1, m, kk), b.detach().reshape(-1, kk, n)
        probs = _index_probabilities(a3, b3, keep_a=a_source is not None)
        indices, scales = sample_columns(probs, k, method, generator)
        b_kept = b3.gather(1, indices.unsqueeze(2).expand(-1, -1, n))
        if a_source is None:
            a_saved, ctx.rebuild_a = (a3.gather(2, indices.unsqueeze(1).expand(-1, m, -1)),), None
        else:
            a_saved, ctx.rebuild_a = a_source
        small = indices.to(torch.int32) if kk < 2**31 else indices
        ctx.save_for_backward(b_kept, small, scales, *a_saved)
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        b_kept, indices, scales, *a_saved = ctx.saved_tensors
        indices = indices.long()
        (m, kk), n = ctx.a_shape[-2:], ctx.b_shape[-1]
        g3 = grad_out.reshape(-1, m, n)
        # fp16 would overflow on large scales; compute there in fp32 (bf16 and fp32 have the range).
        dtype = torch.float32 if g3.dtype == torch.float16 else g3.dtype
        g3 = g3.to(dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            part = g3 @ (b_kept.to(dtype) * scales.to(dtype).unsqueeze(2)).transpose(1, 2)  # (G, m, k)
            grad_a = g3.new_zeros(g3.shape[0], m, kk).scatter_add_(2, indices.unsqueeze(1).expand(-1, m, -1), part)
            grad_a = grad_a.reshape(ctx.a_shape).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.rebuild_a is not None:  # a kept whole: exact
                grad_b = ctx.rebuild_a(*a_saved).reshape(-1, m, kk).to(dtype).transpose(1, 2) @ g3
            else:
                part = (a_saved[0].to(dtype) * scales.to(dtype).unsqueeze(1)).transpose(1, 2) @ g3  # (G, k, n)
                grad_b = g3.new_zeros(g3.shape[0], kk, n).scatter_add_(1, indices.unsqueeze(2).expand(-1, -1, n), part)
            grad_b = grad_b.reshape(ctx.b_shape).to(grad_out.dtype)
        return grad_a, grad_b, None, None, None, None


def sampled_matmul(
    a: Tensor,
    b: Tensor,
    budget: float = 0.3,
    method: Method = "wta_crs",
    generator: torch.Generator | None = None,
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    keep_a: bool = False,
) -> Tensor:
    """``torch.matmul(a, b)`` (bit-identical forward) whose backward keeps only sampled contraction indices.

    Args:
        a: (..., M, K); b: (..., K, N) with the same leading (batch) shape.
        budget: fraction of the K indices kept per batch matrix, in (0, 1]; ``k = num_kept_rows(K, budget,
            min_rows)``; ``k == K`` is plain ``torch.matmul``.
        keep_a: save ``a`` whole (when another op saves it anyway): ``grad_b`` is then exact and only ``b``'s
            rows are sampled.

    Both gradients are unbiased estimates of plain PyTorch's (``"topk"`` excepted).
    """
    return _sampled_matmul(a, b, budget, method, generator, min_rows, ((a,), _identity) if keep_a else None)


def _sampled_matmul(a, b, budget, method, generator, min_rows, a_source) -> Tensor:
    check_budget(budget)
    check_method(method)
    if a.dim() < 3 or b.dim() != a.dim() or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a (..., M, K) and b (..., K, N) need the same batch shape and K; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    k = num_kept_rows(a.shape[-1], budget, min_rows)
    if k >= a.shape[-1] or not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.matmul(a, b)
    device_type = a.device.type
    if torch.is_autocast_enabled(device_type):  # cast as autocast's matmul would, so the kept operands are cast too
        dtype = torch.get_autocast_dtype(device_type)
        if a.dtype != dtype:  # a cast copy of a is not what the other ops keep
            a_source = None
        a, b = a.to(dtype), b.to(dtype)
        if a_source is not None and a_source[1] is _identity:
            a_source = ((a,), _identity)
    return _SampledMatmulFunction.apply(a, b, k, method, generator, a_source)


def _source_of(a: Tensor):
    """How the attention matrix ``a`` can be kept at no cost: the softmax output itself (softmax keeps it), or a
    compact dropout of it (rebuilt from the softmax output and the 1-bit mask, both kept anyway); else ``None``."""
    node = a.grad_fn
    if node is None:
        return None
    if type(node).__name__ == "SoftmaxBackward0":
        return (a,), _identity
    parts = dropout_rebuilder(a)
    if parts is None or parts[0].grad_fn is None or type(parts[0].grad_fn).__name__ != "SoftmaxBackward0":
        return None
    probs, tensors, rebuild = parts
    return (probs, *tensors), rebuild


_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__)


class _AttentionSamplingMode(TorchFunctionMode):
    """Sends ``torch.matmul`` of two same-batch activations to ``sampled_matmul`` while an attention module runs."""

    def __init__(self, budget: float, method: str, min_rows: int, generator: torch.Generator | None) -> None:
        super().__init__()
        self.budget, self.method, self.min_rows, self.generator = budget, method, min_rows, generator
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and len(args) == 2 and not kwargs and _is_activation_pair(*args):
            a, b = args
            return _sampled_matmul(a, b, self.budget, self.method, self.generator, self.min_rows, _source_of(a))
        return func(*args, **kwargs)


def _is_activation_pair(a, b) -> bool:
    return (
        isinstance(a, Tensor) and isinstance(b, Tensor)
        and not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter)
        and a.dim() >= 3 and a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2]
        and a.is_floating_point() and b.is_floating_point()
    )


def _enter(mode: _AttentionSamplingMode, module: nn.Module, *_inputs) -> None:
    if module.training and torch.is_grad_enabled():
        if mode.depth == 0:
            mode.__enter__()
        mode.depth += 1
        module._wtacrs_sampling_entered = True


def _leave(mode: _AttentionSamplingMode, module: nn.Module, *_inputs_outputs) -> None:
    if module.__dict__.pop("_wtacrs_sampling_entered", False):
        mode.depth -= 1
        if mode.depth == 0:
            mode.__exit__(None, None, None)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The innermost modules whose class name ends in ``Attention`` (e.g. ``T5Attention``, ``BertSelfAttention``)."""
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    return [
        (name, module) for name, module in found
        if not any(other is not module and type(other).__name__.endswith("Attention") for other in module.modules())
    ]


#: Attribute marking a model whose attention is sampled (it holds the mode).
_MODE_ATTR = "_wtacrs_attention_sampling_mode"
_NEEDS_EAGER = "attention sampling needs eager attention; load the model with attn_implementation='eager'"


class _AttentionUndo:
    def __init__(self, model: nn.Module, handles: list, attn_model: nn.Module | None, previous: str | None) -> None:
        self.model, self.handles, self.attn_model, self.previous = model, handles, attn_model, previous

    def undo(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.attn_model is not None:
            self.attn_model.set_attn_implementation(self.previous)
        self.model.__dict__.pop(_MODE_ATTR, None)


def _ensure_eager(model: nn.Module, modules: list[nn.Module]) -> tuple[nn.Module | None, str | None]:
    configs = [m.config for m in modules if getattr(m, "config", None) is not None]
    if all(getattr(c, "_attn_implementation", "eager") == "eager" for c in configs):
        return None, None
    owner = next((m for m in model.modules() if hasattr(m, "set_attn_implementation")), None)
    if owner is None:
        raise ValueError(_NEEDS_EAGER)
    previous = owner.config._attn_implementation
    owner.set_attn_implementation("eager")
    if not all(c._attn_implementation == "eager" for c in configs):
        owner.set_attn_implementation(previous)
        raise ValueError(_NEEDS_EAGER)
    return owner, previous


def patch_attention_sampling(
    model: nn.Module,
    budget: float,
    method: Method = "wta_crs",
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    generator: torch.Generator | None = None,
) -> _AttentionUndo:
    """Sample the two attention matmuls of every attention module of ``model`` in training (in place).

    Switches the model to eager attention if needed. Returns the undo record for ``unpatch``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    check_budget(budget)
    check_method(method)
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1; got {min_rows}")
    if hasattr(model, _MODE_ATTR):
        raise ValueError("model already samples its attention; call wtacrs.attention.unpatch(undo) first")
    modules = [m for _, m in attention_modules(model)]
    if not modules:
        raise ValueError(
            f"no attention module (class name ending in 'Attention') found in {type(model).__name__}"
        )
    owner, previous = _ensure_eager(model, modules)
    mode = _AttentionSamplingMode(float(budget), method, min_rows, generator)
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(partial(_enter, mode)))
        handles.append(module.register_forward_hook(partial(_leave, mode), always_call=True))
    setattr(model, _MODE_ATTR, mode)
    return _AttentionUndo(model, handles, owner, previous)


def unpatch(undo: _AttentionUndo) -> None:
    """Undo ``patch_attention_sampling``: hooks removed, the previous attention implementation restored."""
    undo.undo()
