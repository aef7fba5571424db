"""Whole-model ``torch.compile`` of patched models: no graph break in training, the same loss, unbiased gradients.

Sampling has static shapes and no host reads, the sampled linear, the masks and the sampled attention are
autograd Functions that Dynamo traces, and the patches are rebound forwards (no run-time interception), so Dynamo
captures a training forward of a patched model as one graph. Dynamo capture of a tiny model takes 10-30 s and an
Inductor compile about 40 s on two cores, so each model is captured once.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import max_abs_z, z_threshold
from tiny_models import tiny_batch, tiny_lora_model, tiny_model

import wtacrs

pytestmark = pytest.mark.usefixtures("one_thread")

EAGER = dict(attn_implementation="eager")
MODELS = {
    "bert-full": lambda: wtacrs.apply_wtacrs(tiny_model("bert", **EAGER), 0.3),
    "bert-lora-masks-attention": lambda: wtacrs.apply_wtacrs(
        tiny_lora_model("bert", dropout=0.1, **EAGER), 0.3, sample_attention=True),
    "t5": lambda: wtacrs.apply_wtacrs(tiny_model("t5"), 0.3),
    "llama": lambda: wtacrs.apply_wtacrs(tiny_model("llama"), 0.3),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_forward_has_no_graph_break(name):
    model = MODELS[name]()
    batch = tiny_batch(name.split("-")[0])
    model(**batch).loss.backward()  # token statistics and probes exist, as in any step after the first
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_inductor_gives_the_eager_loss_and_unbiased_gradients():
    batch = tiny_batch("bert")
    stock = tiny_model("bert").double()  # dropout 0: the loss is deterministic
    loss64 = stock(**batch).loss
    loss64.backward()
    exact = torch.cat([p.grad.reshape(-1) for p in stock.parameters()]).float()
    loss32 = tiny_model("bert")(**batch).loss.detach()

    model = wtacrs.apply_wtacrs(tiny_model("bert"), 0.3)
    torch._dynamo.reset()
    compiled = torch.compile(model)  # Inductor
    torch.manual_seed(0)
    draws = []
    for _ in range(150):
        model.zero_grad(set_to_none=True)
        loss = compiled(**batch).loss
        loss.backward()
        draws.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    # Forward is exact: the compiled float32 loss is as far from the float64 loss as float32 arithmetic in another
    # order can be: a few times eager float32's own rounding error, measured against float64.
    rounding = max(abs(loss32.double() - loss64.detach()).item(), torch.finfo(torch.float32).eps * loss64.item())
    assert abs(loss.detach().double() - loss64.detach()).item() <= 8 * rounding
    draws = torch.stack(draws)
    sampled = [p.weight for p in model.modules() if isinstance(p, wtacrs.SampledLinear)]
    assert sampled and draws.std(0).max() > 0, "nothing was sampled"
    assert max_abs_z(draws, exact) <= z_threshold(exact.numel())


def test_compiles_after_dynamo_aliased_torch_in_the_model_module(monkeypatch):
    """Dynamo keeps an alias of each module a compiled frame imports (``__import_torch``) in the globals of the
    frame it resumed or started in, such as ``modeling_bert`` after any earlier compile with a graph break there.
    The patch's rebound copies of those globals must keep the alias the real module, or Dynamo's alias check
    fails when it compiles the patched model."""
    import transformers.models.bert.modeling_bert as modeling_bert

    monkeypatch.setitem(modeling_bert.__dict__, "__import_torch", torch)
    batch = tiny_batch("bert")
    model = wtacrs.apply_wtacrs(tiny_model("bert"), 0.3)
    torch._dynamo.reset()
    torch.compile(model, backend="eager")(**batch).loss.backward()


def test_compiling_warns_about_nothing_of_ours():
    """Dynamo warns when it traces an ``lru_cache``-wrapped function; the constant helpers (slot numbers, bit
    shifts, dropout's kept value) are cached in eager mode only. In a fresh interpreter: Dynamo warns once per
    process."""
    import subprocess
    import sys

    code = """
import warnings, torch, wtacrs
warnings.simplefilter("always")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 4))
wtacrs.apply_wtacrs(model, 0.3, targets="all-linear")
x = torch.randn(64, 16)
model(x).sum().backward()
torch.compile(model, backend="eager")(x).sum().backward()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]


def test_constant_helpers_are_cached_in_eager_mode():
    from wtacrs.kernels.draws import _slot_constants

    assert _slot_constants(7, torch.device("cpu")) is _slot_constants(7, torch.device("cpu"))
