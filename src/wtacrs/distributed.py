"""Multi-process training: independent sampling per rank, and the checks that keep wrapping in the right order.

Under DDP or FSDP2 each rank estimates the weight gradient of its own shard of the batch; the gradient
all-reduce (or reduce-scatter) averages those estimates. An average of unbiased estimates is unbiased, so the
global gradient stays unbiased with no extra collective. Ranks must draw *independent* rows, though, or their
errors add up instead of averaging out: seeding every rank alike makes ranks holding similar inputs keep the
same rows. ``seed_ranks(seed)`` seeds each rank's default generators from ``(seed, rank)``.

Sampling uses torch's default generator on purpose: ``torch.utils.checkpoint`` saves and restores that
generator's state around recomputation, so a checkpointed layer recomputes the rows it kept in the first
forward. A separate ``torch.Generator`` would lose that property.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for ``rank`` derived from the run's ``seed``: distinct per (seed, rank), the same on reruns.

    Hashing rather than ``seed + rank`` keeps runs apart too: (seed 0, rank 1) and (seed 1, rank 0) differ.
    """
    for name, value in (("seed", seed), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    digest = hashlib.sha256(f"wtacrs:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def current_rank() -> int:
    """This process's global rank: from ``torch.distributed`` once initialised, else torchrun's ``RANK`` (0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    rank = os.environ.get("RANK", "0")
    if not rank.isdigit():
        raise ValueError(f"the RANK environment variable must be an integer >= 0; got {rank!r}")
    return int(rank)


def seed_ranks(seed: int, rank: int | None = None) -> int:
    """Seed torch's default generators (CPU and every CUDA device) with ``rank_seed(seed, rank)``; returns it.

    Call it after the model is built (or after ``fully_shard``): the initial weights must come from the same
    seed on every rank, the sampled rows from a different one. DDP broadcasts rank 0's weights when it wraps
    the model; FSDP2 does not, so build the model under ``torch.manual_seed(seed)`` on every rank first.
    ``rank`` defaults to ``current_rank()``.
    """
    derived = rank_seed(seed, current_rank() if rank is None else rank)
    torch.manual_seed(derived)
    return derived


def check_patchable(model: nn.Module) -> None:
    """Refuse a model already sharded by FSDP (FSDP1 or FSDP2 ``fully_shard``) or holding DTensor weights.

    Those engines swap each module's parameters around forward and backward on the module objects they
    wrapped, so a layer swapped in afterwards would keep stale (sharded) references. DDP keeps the parameter
    objects, so patching a DDP-wrapped model works.
    """
    if not torch.distributed.is_available():  # nothing can be sharded
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    engines = [t for t in (FSDPModule, FullyShardedDataParallel) if any(isinstance(m, t) for m in model.modules())]
    if engines:
        raise ValueError(
            f"model is already wrapped by {engines[0].__name__}: call wtacrs.apply_wtacrs(model) first, then "
            "fully_shard / FullyShardedDataParallel (or accelerator.prepare), so that the engine shards the "
            "sampled layers' parameters"
        )
    dtensors = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if dtensors:
        raise ValueError(
            f"parameter {dtensors[0]!r} is a DTensor (tensor parallel or sharded): sampled layers need plain "
            "tensor weights when patched; apply wtacrs before sharding, and use data-parallel engines only "
            "(DDP, FSDP2 fully_shard)"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (the one that carries ``config``)."""
    while True:
        inner = getattr(model, "module", None) if isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
