"""Running ``wtacrs finetune`` under torchrun / ``accelerate launch``: process group, eval shards, peak memory."""

from __future__ import annotations

import os

import torch


def launched_world_size() -> int:
    """How many processes torchrun / ``accelerate launch`` started (``WORLD_SIZE``; 1 when not launched so)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"the WORLD_SIZE environment variable must be an integer >= 1; got {world!r}")
    return int(world)


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun set up: NCCL with one GPU per rank (``LOCAL_RANK``) on CUDA, else gloo.

    Returns the device this rank trains on (``cuda:LOCAL_RANK`` when ``device`` is CUDA).
    """
    import datetime

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(minutes=10))
    return device


def eval_shard(size: int, rank: int, world: int) -> list[int]:
    """This rank's eval indices: every ``world``-th one, padded (repeating its last) to one length on all ranks.

    DDP and FSDP2 forwards are collective, so every rank must run as many; ``gather_predictions`` counts the
    repeated example once.
    """
    shard = list(range(rank, size, world))
    return shard + shard[-1:] * (-(-size // world) - len(shard))


def gather_predictions(shard: list[int], preds: list, size: int) -> list:
    """Every rank's predictions, in eval-set order, on every rank (so every rank computes the same metrics)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (shard, preds))
    by_index = {i: p for indices, values in gathered for i, p in zip(indices, values)}
    return [by_index[i] for i in range(size)]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA's max allocated on ``device``, or the process's peak RSS on CPU (model and data too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"  # KiB on Linux
