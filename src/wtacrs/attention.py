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
``num_kept_rows(K, budget, min_rows)``; the saved shapes are fixed. The attention matrix feeding ``attn · V`` is kept
whole instead of sampled when other ops keep it anyway: the softmax output (softmax saves it for its own backward),
or a compact dropout of it (``wtacrs.masks``: rebuilt in backward from the softmax output and the 1-bit mask).
That adds no memory and makes ``grad_V`` exact; only ``V``'s rows are sampled.

``patch_attention(model, budget)`` gives every attention module (class name ending in ``Attention``) a copy of its
forward, and of the eager attention function it calls, in which ``torch.matmul`` of two activations goes to
``sampled_matmul`` while the module trains (``wtacrs.rebind``: decided at patch time, no per-call interception).
This is the model's own eager code, so it works wherever the model computes attention with ``torch.matmul`` in
Python: every transformers version for models that call an ``eager_attention_forward`` function or compute
attention inline (T5, BERT/RoBERTa, GPT-2, OPT, LLaMA-family, GPT-NeoX, DistilBERT, BART, ...). SDPA/flash attention
keep no attention matrix and have no matmul to sample, so the model is switched to eager attention (and back by
``unpatch``); a model that cannot switch (transformers before 5 chooses BERT's attention class when the model is
built) must be loaded with ``attn_implementation="eager"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .health import Health
from .masks import ModuleSwap, compact_dropout, dropout_with_mask, rebuild_dropout
from .rebind import Replacements, calls_any, set_forward
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, check_min_rows, draw, num_kept_rows

__all__ = ["patch_attention", "sample_columns", "sampled_matmul", "unpatch"]


def sample_columns(
    probs: Tensor, k: int, method: Method = "wta_crs", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``sampling.draw`` for each row of ``probs`` (G, K) at once, with ``k`` fixed slots per row.

    Returns ``(indices, scales)``, both (G, k): int64 indices into ``K`` (a repeated draw appears in several
    slots) and float32 scales such that ``sum_t scales[g, t] * term[g, indices[g, t]]`` is an unbiased estimate of
    ``sum_j term[g, j]`` (biased for ``"topk"``). No host synchronisation; non-finite weights count as 0.
    """
    check_method(method)
    g, n = probs.shape
    if not 1 <= k <= n:
        raise ValueError(f"k (indices to keep) must be in [1, {n}]; got {k}")
    p = probs.detach().float()
    p = torch.where(torch.isfinite(p) & (p > 0), p, 0.0)
    if k == n:
        return torch.arange(n, device=p.device).expand(g, n), torch.ones(g, n, device=p.device)
    return draw(p, k, method, generator)


def _index_probabilities(a3: Tensor, b3: Tensor, keep_a: bool) -> Tensor:
    """Per contraction index k: ``||B[k, :]||`` alone when only ``grad_A`` is estimated, else the even mixture
    ``||A[:, k]|| / sum ||A|| + ||B[k, :]|| / sum ||B||``.

    ``grad_A``'s column k is ``grad_C @ B[k, :]ᵀ``, whatever ``A[:, k]`` is (and ``grad_B``'s row k does not depend on
    ``B``), so each gradient wants probabilities that follow one operand. The product ``||A[:, k]|| * ||B[k, :]||``
    that suits the product ``A @ B`` gives a rarely drawn index with a large gradient a huge scale: on random
    attention inputs its mean of 2,000 gradient estimates lay up to 88 standard errors from the exact value (a
    heavy tail, not a bias). The mixture keeps each scale within twice the one-operand choice.
    """
    nb = _norms(b3, 2)
    if keep_a:
        return nb
    na = _norms(a3, 1)
    tiny = torch.finfo(torch.float32).tiny
    return na / na.sum(1, keepdim=True).clamp_min(tiny) + nb / nb.sum(1, keepdim=True).clamp_min(tiny)


def _norms(t: Tensor, dim: int) -> Tensor:
    """float32 norms along ``dim`` (float64 inputs in float64: vector_norm cannot narrow them through its dtype)."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t, dim=dim).float()
    return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float32)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _SampledMatmulFunction(torch.autograd.Function):
    """``torch.matmul(a, b)`` keeping sampled columns of ``a`` and rows of ``b``. ``a`` is kept whole instead when
    ``keep_a`` (``a`` is the softmax output, saved anyway), or rebuilt as ``rebuild_dropout(a_source, packed,
    value)`` when ``a`` is a compact dropout of the softmax output ``a_source``."""

    @staticmethod
    def forward(ctx, a, b, k: int, method: str, generator, keep_a: bool, a_source, packed, value, counter):
        out = torch.matmul(a, b)
        (m, kk), n = a.shape[-2:], b.shape[-1]
        a3, b3 = a.detach().reshape(-1, m, kk), b.detach().reshape(-1, kk, n)
        whole = keep_a or a_source is not None
        indices, scales = draw(_index_probabilities(a3, b3, keep_a=whole), k, method, generator, counter)
        b_kept = b3.gather(1, indices.unsqueeze(2).expand(-1, -1, n))
        if keep_a:
            a_saved = (a,)
        elif a_source is not None:
            a_saved = (a_source, packed, value)
        else:
            a_saved = (a3.gather(2, indices.unsqueeze(1).expand(-1, m, -1)),)
        ctx.whole = whole
        ctx.save_for_backward(b_kept, indices, scales, *a_saved)
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        b_kept, indices, scales, *a_saved = ctx.saved_tensors
        (m, kk), n = ctx.a_shape[-2:], ctx.b_shape[-1]
        g3 = grad_out.reshape(-1, m, n)
        # fp16 would overflow on large scales; compute there in fp32 (bf16 and fp32 have the range).
        dtype = torch.float32 if g3.dtype == torch.float16 else g3.dtype
        g3 = _as(g3, dtype)
        scales = _as(scales, dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            part = g3 @ (_as(b_kept, dtype) * scales.unsqueeze(2)).transpose(1, 2)  # (G, m, k)
            grad_a = g3.new_zeros(g3.shape[0], m, kk).scatter_add_(2, indices.unsqueeze(1).expand(-1, m, -1), part)
            grad_a = _as(grad_a.view(ctx.a_shape), grad_out.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.whole:  # a kept whole: exact
                a = a_saved[0] if len(a_saved) == 1 else rebuild_dropout(*a_saved)
                grad_b = _as(a.reshape(-1, m, kk), dtype).transpose(1, 2) @ g3
            else:
                part = (_as(a_saved[0], dtype) * scales.unsqueeze(1)).transpose(1, 2) @ g3  # (G, k, n)
                grad_b = g3.new_zeros(g3.shape[0], kk, n).scatter_add_(1, indices.unsqueeze(2).expand(-1, -1, n), part)
            grad_b = _as(grad_b.view(ctx.b_shape), grad_out.dtype)
        return grad_a, grad_b, None, None, None, None, None, None, None, None


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

    Both gradients are unbiased estimates of plain PyTorch's (``"topk"`` excepted). A NaN or Inf operand makes them
    NaN, as without sampling.
    """
    check_budget(budget)
    check_method(method)
    check_min_rows(min_rows)
    return _sampled_matmul(a, b, budget, method, generator, min_rows, keep_a)


def _sampled_matmul(a, b, budget, method, generator, min_rows, keep_a=False, a_source=None, packed=None,
                    value=None, counter=None) -> Tensor:
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
            keep_a, a_source = False, None
        a, b = a.to(dtype), b.to(dtype)
    return _SampledMatmulFunction.apply(a, b, k, method, generator, keep_a, a_source, packed, value, counter)


def _is_activation_pair(a, b) -> bool:
    return (
        isinstance(a, Tensor) and isinstance(b, Tensor)
        and not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter)
        and a.dim() >= 3 and a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2]
        and a.is_floating_point() and b.is_floating_point()
    )


class AttentionFunctions(Replacements):
    """The functions an attention module's forward copy calls instead of torch's: ``matmul`` (sampled while the
    module trains), and ``softmax`` and ``dropout``, which remember the attention matrix so
    that ``attn · V`` can keep it whole; dropout is compact when ``compact_dropout``."""

    def __init__(self, budget: float, method: str, min_rows: int, compact_dropout: bool,
                 generator: torch.Generator | None = None, health: Health | None = None) -> None:
        self.budget, self.method, self.min_rows = budget, method, min_rows
        self.compact_dropout, self.generator, self.health = compact_dropout, generator, health
        self._clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(active=False, probs=None, dropped=None)
        return state

    def _clear(self) -> None:
        self.active = False  # inside a training forward of an attention module
        self.probs: Tensor | None = None  # the last softmax output
        self.dropped: tuple | None = None  # (output, softmax output, packed mask, value) of the last dropout

    def call(self, module, forward, args, kwargs):
        self.active = module.training and torch.is_grad_enabled()
        try:
            return forward(module, *args, **kwargs)
        finally:
            self._clear()

    def functions(self) -> dict:
        return {"matmul": self.matmul, "softmax": self.softmax, "dropout": self.dropout}

    def softmax(self, input: Tensor, *args, **kwargs) -> Tensor:
        out = F.softmax(input, *args, **kwargs)
        if self.active:
            self.probs = out
        return out

    def dropout(self, input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        if not self.compact_dropout:
            return F.dropout(input, p, training, inplace)
        if self.active and input is self.probs and not inplace:
            out, packed, value = dropout_with_mask(input, p, training)
            if packed is not None:
                self.dropped = (out, input, packed, value)
            return out
        return compact_dropout(input, p, training, inplace)

    def matmul(self, input: Tensor, other: Tensor, *, out: Tensor | None = None) -> Tensor:
        if out is not None or not self.active or not _is_activation_pair(input, other):
            return torch.matmul(input, other, out=out)
        counter = None if self.health is None else self.health.counter("attention", input.device)
        if input is self.probs:
            return _sampled_matmul(input, other, self.budget, self.method, self.generator, self.min_rows,
                                   keep_a=True, counter=counter)
        if self.dropped is not None and input is self.dropped[0]:
            _, probs, packed, value = self.dropped
            return _sampled_matmul(input, other, self.budget, self.method, self.generator, self.min_rows,
                                   a_source=probs, packed=packed, value=value, counter=counter)
        return _sampled_matmul(input, other, self.budget, self.method, self.generator, self.min_rows, counter=counter)


class AttentionDropout(nn.Dropout):
    """An attention module's own ``nn.Dropout``, routed through ``AttentionFunctions.dropout`` as a functional
    dropout call in its forward is: so ``attn · V`` keeps the dropped-out attention matrix whole (rebuilt from the
    softmax output) also where the forward calls ``self.dropout(attention_probs)`` (BERT on transformers 4)."""

    def __init__(self, module: nn.Dropout, functions: AttentionFunctions) -> None:
        super().__init__(module.p, module.inplace)
        self.train(module.training)
        self.functions = functions

    def forward(self, x: Tensor) -> Tensor:
        return self.functions.dropout(x, self.p, self.training, self.inplace)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The innermost modules whose class name ends in ``Attention`` (e.g. ``T5Attention``, ``BertSelfAttention``)."""
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    return [
        (name, module) for name, module in found
        if not any(other is not module and type(other).__name__.endswith("Attention") for other in module.modules())
    ]


#: Attribute marking a model whose attention is patched.
_MARK_ATTR = "_wtacrs_attention"
_NEEDS_EAGER = ("attention sampling needs eager attention (SDPA and flash attention keep no attention matrix to "
                "sample), and this model cannot switch after loading; load it with attn_implementation='eager'")


class _AttentionUndo:
    def __init__(self, model: nn.Module, swaps: list, attn_owner: nn.Module | None, previous: str | None) -> None:
        self.model, self.swaps, self.attn_owner, self.previous = model, swaps, attn_owner, previous

    def undo(self) -> None:
        for swap in self.swaps:
            swap.undo()
        if self.attn_owner is not None:
            self.attn_owner.set_attn_implementation(self.previous)
        self.model.__dict__.pop(_MARK_ATTR, None)


def _attn_implementation(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def _ensure_eager(model: nn.Module, modules: list[nn.Module]) -> tuple[nn.Module | None, str | None]:
    if all(_attn_implementation(m) == "eager" for m in modules):
        return None, None
    owner = next((m for m in model.modules() if hasattr(m, "set_attn_implementation")), None)
    if owner is None:
        raise ValueError(_NEEDS_EAGER)
    previous = owner.config._attn_implementation
    owner.set_attn_implementation("eager")
    if not all(_attn_implementation(m) == "eager" for m in modules):
        owner.set_attn_implementation(previous)
        raise ValueError(_NEEDS_EAGER)
    return owner, previous


def patch_attention(
    model: nn.Module,
    budget: float,
    method: Method = "wta_crs",
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    compact_dropout: bool = False,
    generator: torch.Generator | None = None,
    health: Health | None = None,
) -> _AttentionUndo:
    """Give the attention modules of ``model`` forward copies that sample the two attention matmuls in training
    (switching the model to eager attention), with compact dropout of the attention matrix if ``compact_dropout``.

    Returns the undo record for ``unpatch``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    check_budget(budget)
    check_method(method)
    check_min_rows(min_rows)
    if hasattr(model, _MARK_ATTR):
        raise ValueError("model's attention is already patched; call wtacrs.attention.unpatch(undo) first")
    modules = [m for _, m in attention_modules(model)]
    if not modules:
        raise ValueError(f"no attention module (class name ending in 'Attention') found in {type(model).__name__}")
    unreachable = [m for m in modules if not calls_any(type(m).forward, {"matmul"})]
    if unreachable:
        implementation = _attn_implementation(model)
        hint = ""
        if implementation != "eager":  # transformers 4 picks SDPA/flash attention classes when the model is built
            import transformers

            hint = (f"; transformers {transformers.__version__} chose this {implementation} attention class when the "
                    "model was built: load the model with attn_implementation='eager'")
        raise ValueError(
            f"attention sampling cannot reach the attention matmuls of {type(unreachable[0]).__name__}: its forward "
            f"calls neither torch.matmul nor an eager_attention_forward function that does{hint}"
        )
    owner, previous = _ensure_eager(model, modules)
    functions = AttentionFunctions(budget, method, min_rows, compact_dropout, generator, health)
    swaps = [set_forward(m, functions) for m in modules]
    for m in modules:
        for name, child in list(m._modules.items()):
            if type(child) is nn.Dropout:
                m._modules[name] = AttentionDropout(child, functions)
                swaps.append(ModuleSwap(m, name, child))
    setattr(model, _MARK_ATTR, True)
    return _AttentionUndo(model, swaps, owner, previous)


def unpatch(undo: _AttentionUndo) -> None:
    """Undo ``patch_attention``: the class forwards and the previous attention implementation return."""
    undo.undo()
