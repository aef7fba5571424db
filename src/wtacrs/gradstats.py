"""Running output-gradient norms per token id: the default source of gradient-aware row probabilities.

The variance of column-row sampling is smallest with ``p_i ∝ ||x_i|| * ||dy_i||``, but ``dy`` is unknown when forward
picks the rows. On real fine-tuning runs the output-gradient norm of a row follows its token closely (padding and
frequent tokens carry little gradient, the tokens a loss reads carry much), and that pattern is shared by a model's
layers (``results/bench_variance.json``). So one table per model keeps, per token id, an exponential moving average
of ``||dy_i|| / mean_j ||dy_j||`` over every sampled layer's rows of that token; forward weighs rows by
``||x_i|| * score[token_i]``, each score raised to at least ``floor`` times the mean score, so no row with a
non-zero input gets probability 0 whatever the table says: the estimate stays unbiased when the table is empty,
stale or wrong (a loss that reads padded positions included).

How the norms get back without a device sync or a graph break: each sampled call takes the sampler's probe, a
(V, 2) leaf tensor that needs a gradient and that no optimizer holds, as an input; its backward returns, as the
probe's gradient, the per-token sums of the normalised norms (column 0) and the row counts (column 1). Autograd
adds them up over the layers, and when the backward is done with them ``fold`` puts them into the table (see
``wtacrs.sampler``). Folding after the whole backward keeps the table fixed between a forward and its
recomputation under gradient checkpointing, so both draw the same rows.

Memory: four float32 numbers per vocabulary entry per model (for example 2 MB for a 128k vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels

#: Weight of the old value in the moving average, per step in which a token occurs.
DEFAULT_DECAY = 0.9


class TokenGradStats:
    """Per-token running means of normalised output-gradient norms, shared by one model's sampled layers.

    ``scores`` (V,) is what forward reads: the table, with unseen tokens at the mean and every entry at least
    ``floor`` times the mean.
    """

    def __init__(self, vocab_size: int, floor: float, decay: float = DEFAULT_DECAY) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1; got {vocab_size!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay}")
        self.vocab_size, self.floor, self.decay = vocab_size, floor, decay
        self._allocate(torch.device("cpu"))

    def _allocate(self, device: torch.device) -> None:
        self.table = torch.full((self.vocab_size,), float("nan"), device=device)  # NaN: token not seen yet
        self.scores = torch.ones(self.vocab_size, device=device)

    def to(self, device: torch.device) -> None:
        """Move to ``device`` (the sampler calls it when the model's activations live elsewhere)."""
        if self.table.device != device:
            table, scores = self.table.to(device), self.scores.to(device)
            self._allocate(device)
            self.table, self.scores = table, scores

    def token_ids(self, ids: Tensor) -> Tensor:
        """A batch's token ids as rows see them: flat, clamped into the table."""
        return ids.reshape(-1).clamp(0, self.vocab_size - 1)

    def fold(self, grad: Tensor) -> None:
        """Fold a backward's per-token (sums, counts) (V, 2) into the table.

        A token whose sum of the step is not finite (an overflowing fp16 gradient that a loss scaler will skip)
        keeps its old value.
        """
        with torch.no_grad():
            grad = grad if grad.device == self.table.device else grad.to(self.table.device)
            self.table, self.scores = kernels.fold_token_stats(self.table, grad, self.decay, self.floor)

    @staticmethod
    def contribution(grad_2d: Tensor, ids: Tensor, vocab_size: int) -> Tensor:
        """The probe's gradient from one sampled call: per token id, the sum of ``||dy_i|| / mean_j ||dy_j||`` over
        the rows ``i`` of that token (``ids[i]``) and their count. Computed here, in backward, rather than kept
        from forward: nothing of the vocabulary's size stays stored between the two."""
        return kernels.token_norm_sums(grad_2d, ids, vocab_size)
