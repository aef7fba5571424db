"""Peak GPU memory and throughput of T5-Base fine-tuning steps, per arm (random init, no download).

    python scripts/gpu_memory_t5.py [--batch-size 100] [--seq-len 128] [--arms lora lora+gc lora+wta+masks+attn]

Arms are those of ``wtacrs memory`` (full|lora, +wta, +masks, +attn) plus ``+gc`` (gradient checkpointing,
non-reentrant). Each arm: a fresh model, AdamW, ``--warmup`` steps, then ``--steps`` timed steps; prints peak
allocated memory (GiB) and sentences/s, and the saved-activation bytes of one forward by kind. Arms without
``+attn`` run ``--attn`` attention (default SDPA, as stock fine-tuning does); ``+attn`` runs eager attention.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wtacrs.app.memory_report import build_model, make_inputs, prepare_arm
from wtacrs.memory import saved_by_kind


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    features = arm.split("+")
    gc = "gc" in features
    base_arm = "+".join(f for f in features if f != "gc")
    attn = "eager" if "attn" in features else args.attn
    model, kind = build_model(args.model, args.num_layers, attn=attn)
    model = prepare_arm(model.to(args.device), base_arm, args.budget)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = make_inputs(kind, model.config, args.batch_size, args.seq_len, args.target_len, args.device)
    by_kind = saved_by_kind(model, inputs).by_kind() if not gc else None  # checkpointed graphs hide their saves
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "arm": arm, "attn": attn,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "sentences_per_s": args.batch_size * args.steps / seconds,
        "saved_by_kind_gib": None if by_kind is None else {k: v / 2**30 for k, v in by_kind.items()},
    }
    del model, optimizer, inputs, loss
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-base")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=4)
    parser.add_argument("--arms", nargs="+", default=["lora", "lora+gc", "lora+wta+masks", "lora+wta+masks+attn"])
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu runs a smoke test (no peak memory)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the number of layers")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; --device cpu runs a smoke test")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = []
    print(f"{device_name}, torch {torch.__version__}, {args.model}, batch {args.batch_size}, "
          f"seq {args.seq_len}, fp32")
    for arm in args.arms:
        result = run_arm(arm, args)
        results.append(result)
        print(f"{arm:<24} attn {result['attn']:<6} peak {result['peak_allocated_gib']:7.2f} GiB  "
              f"{result['sentences_per_s']:8.1f} sentences/s  saved {result['saved_by_kind_gib']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
