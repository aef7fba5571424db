"""Study 4: the noise each arm adds to the whole trainable gradient, next to the noise of SGD itself.

The accuracy table (``scripts/reproduce_glue.py``) has arms that train like LoRA and arms that fall behind in a
few dozen steps. This study measures why, on the same model, data and arms. Each arm first trains ``--warmup``
steps (AdamW, the learning rates of the GLUE CPU size: LoRA's ``B`` leaves zero, the token statistics of the
default probabilities fill), then, with dropout off (so that sampling is the only randomness), measures at those
weights:

* **sampling noise**: ``E||ĝ_b - g_b||² / ||g_b||²`` over ``--draws`` sampled gradients ``ĝ_b`` of every
  trainable parameter on one batch ``b``, ``g_b`` the exact gradient (eval mode: nothing is sampled);
* **SGD noise**: ``E||g_b - g||² / ||g||²`` over ``--batches`` batches, ``g`` their mean: how far one batch's
  exact gradient is from that of ``batches x batch`` examples.

Sampling noise well below SGD noise leaves training as it was (each step is already that noisy); comparable to
it or above, it slows training as a smaller batch would.

    python -m benchmarks.gradient_noise                       # MiniLM-L6 on SST-2 and RTE (a few minutes)
    python -m benchmarks.gradient_noise --tasks sst2 --draws 8 --model path/to/tiny-bert --data-root data
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, run_metadata, settings_dict, study_main
from benchmarks.variance import DEFAULT_DATA, TASK_FOLDERS
from wtacrs.app import finetune as ft
from wtacrs.app.data import load_task
from wtacrs.layers import SampledConv1D, SampledLinear

#: arm -> (title at budget {b}, wtacrs finetune method, probs, attention sampling)
ARMS = {
    "lora-wtacrs": ("LoRA+WTA-CRS@{b} (default)", "lora-wtacrs", "tokens", False),
    "lora-wtacrs-act": ("LoRA+WTA-CRS@{b}, activation probs", "lora-wtacrs", "activations", False),
    "lora-wtacrs-attn": ("LoRA+WTA-CRS@{b}, masks + attention", "lora-wtacrs", "tokens", True),
    "full-wtacrs": ("Full+WTA-CRS@{b}", "wtacrs", "tokens", False),
}
#: warm-up learning rates: those of scripts/reproduce_glue.py's CPU size
LR = {"lora-wtacrs": 2e-3, "wtacrs": 1e-4}


def _config(args: argparse.Namespace, probs: str = "tokens", attention: bool = False) -> ft.RunConfig:
    return ft.RunConfig(model=args.model, epochs=1, batch_size=args.batch_size, max_length=args.max_length, lr=None,
                        budget=args.budget, probs=probs, masks=True, attention=attention, gc=False, bf16=False,
                        lora_r=32, lora_alpha=32, weight_decay=0.0, warmup=0.0, max_train=None, max_eval=None,
                        device="cpu")


def _model(source, task, method: str, config: ft.RunConfig, seed: int):
    torch.manual_seed(seed)  # the same fresh head (and LoRA weights) for every arm of a regime
    _, model = ft.load_model(source, task, eager_attention=config.attention)
    model = ft.prepare_model(model, method, config)
    for module in model.modules():  # dropout off: sampling is the only randomness left
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout_prob", "attention_dropout"):  # attention dropout as a float (SDPA, LLaMA)
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def _gradient(model, batch: dict, train: bool) -> torch.Tensor:
    """Every trainable parameter's gradient of the batch loss, flattened (train: sampled; eval: exact)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _sampled_entries(model) -> torch.Tensor:
    """A mask over ``_gradient``'s vector: the entries of the sampled layers' weights."""
    sampled = {id(m.weight) for m in model.modules() if isinstance(m, (SampledLinear, SampledConv1D))}
    return torch.cat([torch.full((p.numel(),), id(p) in sampled) for p in model.parameters() if p.requires_grad])


def _relative_mse(estimates: list[torch.Tensor], target: torch.Tensor) -> float:
    return statistics.fmean(float((e - target).square().sum()) for e in estimates) / float(target.square().sum())


def _sgd_noise(exact: list[torch.Tensor]) -> float:
    """``E||g_b - g||² / ||g||²`` with ``g`` the batches' mean (B / (B - 1): their spread around their own mean
    is that much smaller than around the expectation)."""
    mean = torch.stack(exact).mean(0)
    return _relative_mse(exact, mean) * len(exact) / (len(exact) - 1)


def run_task(name: str, args: argparse.Namespace) -> list[dict]:
    needed = args.batch_size * (args.batches + args.warmup)
    data = load_task(name, args.data_root / TASK_FOLDERS[name], max_train=needed)
    source = ft.resolve_model(args.model)
    tokenizer, _ = ft.load_model(source, None)
    encoded = ft.Encoded(tokenizer, data.train, args.max_length)
    batches = [encoded.batch(list(range(i, min(i + args.batch_size, len(encoded)))), "cpu")
               for i in range(0, len(encoded), args.batch_size)]
    measured, warmup = batches[:args.batches], batches[args.batches:]
    rows = []
    for arm in args.arms:
        title, method, probs, attention = ARMS[arm]
        model = _model(source, data.task, method, _config(args, probs, attention), args.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LR[method], weight_decay=0.0)
        for batch in warmup:  # the arm's own first steps: LoRA's B leaves zero, token statistics fill
            _gradient(model, batch, train=True)
            optimizer.step()
        exact = [_gradient(model, b, train=False) for b in measured]
        sampled = [_gradient(model, measured[0], train=True) for _ in range(args.draws)]
        row = {"task": name, "arm": arm, "title": title.format(b=f"{args.budget:g}")}
        # All trainable entries, and the sampled weights alone (Adam scales each entry's update by its own
        # gradient history, so their noise counts even where their share of the whole norm is small).
        for part, keep in (("all", slice(None)), ("sampled", _sampled_entries(model))):
            row[part] = {"sampling": _relative_mse([g[keep] for g in sampled], exact[0][keep]),
                         "sgd": _sgd_noise([g[keep] for g in exact])}
        rows.append(row)
        print(f"{name} {arm}: {row}", flush=True)
    return rows


def run_study(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rows = [row for task in args.tasks for row in run_task(task, args)]
    return {"meta": run_metadata(), "settings": settings_dict(args), "rows": rows}


def table(result: dict) -> str:
    """Markdown: per task and arm, the sampling and the SGD noise and their ratio, for all trainable entries and
    for the sampled weights alone."""
    s = result["settings"]
    lines = [f"Relative MSE of the gradient after {s['warmup']} steps (batch {s['batch_size']}; sampling: "
             f"{s['draws']} draws on one batch; SGD: {s['batches']} batches), {result['meta']['device']}", "",
             "| task | arm | all: sampling | all: SGD | ratio | sampled weights: sampling | SGD | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["task"], r["title"]]
        for part in ("all", "sampled"):
            n = r[part]
            cells += [f"{n['sampling']:.3f}", f"{n['sgd']:.3f}", f"{n['sampling'] / n['sgd']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 + 4 * len(tasks), 4), squeeze=False, sharey=True)
    bars = ((-0.3, "all", "sampling", "tab:blue", "all trainable entries: sampling noise"),
            (-0.1, "all", "sgd", "tab:gray", "all trainable entries: SGD noise"),
            (0.1, "sampled", "sampling", "tab:orange", "sampled weights: sampling noise"),
            (0.3, "sampled", "sgd", "silver", "sampled weights: SGD noise"))
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        for shift, part, kind, color, label in bars:
            ax.barh([i + shift for i in range(len(mine))], [r[part][kind] for r in mine], height=0.2, color=color,
                    label=label)
        ax.set_yticks(range(len(mine)), [r["title"] for r in mine])
        ax.set_xscale("log")
        ax.set_xlabel("relative MSE of the gradient (log)")
        ax.set_title(task)
    axes[0][0].invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="what wtacrs finetune --model takes")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte"], choices=list(TASK_FOLDERS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="folder holding senteval/ and glue-pairs/")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--draws", type=int, default=32, help="sampled gradients per arm")
    parser.add_argument("--batches", type=int, default=16, help="batches of the SGD-noise estimate")
    parser.add_argument("--warmup", type=int, default=24, help="training steps of each arm before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_gradient_noise.json")
    parser.add_argument("--no-plot", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_length", "draws", "batches"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2; got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be at least 0; got {args.warmup}")
    if not 0 < args.budget <= 1:
        raise ValueError(f"--budget must be in (0, 1]; got {args.budget}")
    for task in args.tasks:
        if not (args.data_root / TASK_FOLDERS[task]).is_dir():
            raise ValueError(f"--data-root must hold {TASK_FOLDERS[task]}/ for task {task}; got {args.data_root}")


def main(argv: list[str] | None = None) -> int:
    return study_main(sys.modules[__name__], argv, lambda args: args.out)


if __name__ == "__main__":
    sys.exit(main())
