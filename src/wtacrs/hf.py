"""Hugging Face helpers: hand example ids to a patched model for the gradient-norm cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .patch import EXAMPLE_IDS_KEY


class ExampleIdCollator:
    """Wrap a data collator so that each batch carries its examples' ids to ``apply_wtacrs(probs=GradNormCache(...))``.

    Each feature must hold an integer under ``id_key`` (default ``"example_id"``); the key is removed before
    the wrapped collator runs and the ids reach the model as ``batch[EXAMPLE_IDS_KEY]``, which the patched
    model's forward pre-hook takes out again. With ``transformers.Trainer`` pass
    ``TrainingArguments(remove_unused_columns=False)`` so that the id column reaches the collator::

        cache = wtacrs.GradNormCache(capacity=len(train_set), max_length=128)
        wtacrs.apply_wtacrs(model, probs=cache)
        trainer = Trainer(model, args, train_dataset=train_set,
                          data_collator=ExampleIdCollator(DataCollatorWithPadding(tokenizer)))
    """

    def __init__(self, collator: Callable[[list[dict]], dict], id_key: str = "example_id") -> None:
        self.collator = collator
        self.id_key = id_key

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict:
        missing = [i for i, f in enumerate(features) if self.id_key not in f]
        if missing:
            raise ValueError(
                f"features {missing[:5]} have no {self.id_key!r}; add an integer id per example to the dataset "
                "(with Trainer, also set remove_unused_columns=False)"
            )
        ids = torch.tensor([int(f[self.id_key]) for f in features], dtype=torch.int64)
        batch = self.collator([{k: v for k, v in f.items() if k != self.id_key} for f in features])
        batch[EXAMPLE_IDS_KEY] = ids
        return batch
