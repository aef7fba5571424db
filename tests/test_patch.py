"""apply_wtacrs / remove_wtacrs / describe on tiny Hugging Face and PEFT LoRA models."""

from __future__ import annotations

import copy
import pytest
import torch
from torch import nn

import wtacrs
from wtacrs.memory import SavedTensors
from wtacrs.sampling import num_kept_rows
from conftest import z_threshold
from tiny_models import FAMILIES, tiny_batch, tiny_lora_model, tiny_model

PRESET_CASES = [(family, preset) for family in FAMILIES for preset in ("full", "lora")]


def build(family: str, preset: str) -> nn.Module:
    return tiny_model(family) if preset == "full" else tiny_lora_model(family)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def gradients(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in trainable(model).items() if p.grad is not None}


def gradient_moments(model: nn.Module, batch: dict, draws: int) -> tuple[dict, dict]:
    """Mean and standard error of each trainable parameter's gradient over ``draws`` independent steps."""
    total, total_sq = {}, {}
    for _ in range(draws):
        for name, g in gradients(model, batch).items():
            g = g.double()
            total[name] = total.get(name, 0) + g
            total_sq[name] = total_sq.get(name, 0) + g * g
    mean = {n: s / draws for n, s in total.items()}
    se = {n: ((total_sq[n] / draws - mean[n] ** 2).clamp_min(0) * draws / (draws - 1) / draws).sqrt() for n in total}
    return mean, se


def assert_unbiased(mean: dict, se: dict, exact: dict) -> None:
    entries = sum(t.numel() for t in exact.values())
    limit = z_threshold(entries)
    for name, target in exact.items():
        target = target.double()
        # Exactly computed entries (SE 0) may differ from the reference only by float32 summation order.
        rounding = 1e-5 * target.abs().max().item() + 1e-8
        excess = (mean[name] - target).abs() - limit * se[name] - rounding
        assert excess.max().item() <= 0, (
            f"{name}: mean sampled gradient is more than {limit:.2f} standard errors from the exact gradient"
        )


@pytest.mark.parametrize("family,preset", PRESET_CASES)
def test_outputs_loss_unchanged_and_gradient_unbiased(family, preset):
    model = build(family, preset)
    batch = tiny_batch(family)
    reference = copy.deepcopy(model)
    ref_out = reference(**batch)
    exact = gradients(reference, batch)

    wtacrs.apply_wtacrs(model, budget=0.3, targets=preset)
    torch.manual_seed(0)
    out = model(**batch)
    assert torch.equal(out.loss, ref_out.loss)
    assert torch.equal(out.logits, ref_out.logits)

    mean, se = gradient_moments(model, batch, draws=500)
    assert set(mean) == set(exact)
    assert_unbiased(mean, se, exact)
    sampled = {n.sampler_name for n in model.modules() if isinstance(n, (wtacrs.SampledLinear, wtacrs.SampledConv1D))}
    assert any(se[f"{name}.weight"].max() > 0 for name in sampled), "no sampled gradient varied: nothing was sampled"


def test_biased_method_is_flagged():
    """The same criterion rejects deterministic top-k (no rescaling): the check can fail."""
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    exact = gradients(copy.deepcopy(model), batch)
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full", method="topk")
    mean, se = gradient_moments(model, batch, draws=20)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(mean, se, exact)


def sampled_inputs(model: nn.Module, batch: dict) -> list[tuple[int, int]]:
    """(rows N, features d) of each distinct input tensor read by a sampled layer with a trainable weight."""
    seen: dict[int, tuple[torch.Tensor, int, int]] = {}  # holds each input so that its id stays unique

    def record(module, args):
        x = args[0]
        seen.setdefault(id(x), (x, x.numel() // x.shape[-1], x.shape[-1]))

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, (wtacrs.SampledLinear, wtacrs.SampledConv1D)) and m.weight.requires_grad
    ]
    with torch.no_grad():
        model.eval()
        model(**batch)
        model.train()
    for h in hooks:
        h.remove()
    return [(n, d) for _x, n, d in seen.values()]


def saved_bytes(model: nn.Module, batch: dict) -> int:
    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(**batch).loss
    del loss
    return saved.nbytes


@pytest.mark.parametrize("family,preset", PRESET_CASES)
def test_saved_activation_bytes_fall_within_derived_bound(family, preset, capsys):
    """Bound: stock bytes with the target weights frozen (their inputs then are not saved for them) plus, per
    distinct sampled input (N, d), k = clamp(ceil(budget*N), 10, N) rows of d fp32 values + int32 index + fp32
    scale. It is also a lower bound: sampling never stores less than the rest of the model saves."""
    batch = tiny_batch(family)
    model = build(family, preset)
    stock = saved_bytes(model, batch)
    names = set(wtacrs.targets.resolve_targets(model, preset))
    frozen = copy.deepcopy(model)
    for name, module in frozen.named_modules():
        if name in names:
            module.weight.requires_grad_(False)
    without_targets = saved_bytes(frozen, batch)

    rows = []
    for budget in (0.3, 0.1):
        wtacrs.apply_wtacrs(model, budget=budget, targets=preset)
        inputs = sampled_inputs(model, batch)
        kept_bound = sum(num_kept_rows(n, budget) * (d * 4 + 4 + 4) for n, d in inputs)
        patched = saved_bytes(model, batch)
        wtacrs.remove_wtacrs(model)
        assert without_targets <= patched <= without_targets + kept_bound
        assert patched < stock
        rows.append((budget, patched, without_targets + kept_bound))
    with capsys.disabled():
        print(f"\n{family:8s} {preset:5s} stock {stock:8d} B | " + " | ".join(
            f"@{b}: {p:8d} B (bound {bd:8d}, {p / stock:.2f}x)" for b, p, bd in rows))


@pytest.mark.parametrize("family,preset", [("bert", "full"), ("gpt2", "full"), ("llama", "lora")])
def test_remove_restores_modules_exactly(family, preset):
    model = build(family, preset)
    batch = tiny_batch(family)
    before = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref_grads = gradients(model, batch)

    wtacrs.apply_wtacrs(model, targets=preset)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert any(isinstance(m, (wtacrs.SampledLinear, wtacrs.SampledConv1D)) for m in model.modules())

    wtacrs.remove_wtacrs(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    grads = gradients(model, batch)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model("llama")
    wtacrs.apply_wtacrs(model, targets="full")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    batch = tiny_batch("llama")
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    wtacrs.apply_wtacrs(loaded, targets="full")
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_apply_is_idempotent_and_refuses_other_settings():
    model = tiny_model("bert")
    wtacrs.apply_wtacrs(model, budget=0.3)
    layers = [m for m in model.modules() if isinstance(m, wtacrs.SampledLinear)]
    assert wtacrs.apply_wtacrs(model, budget=0.3) is model
    assert [m for m in model.modules() if isinstance(m, wtacrs.SampledLinear)] == layers
    with pytest.raises(ValueError, match="already patched.*remove_wtacrs"):
        wtacrs.apply_wtacrs(model, budget=0.1)


def test_describe_lists_each_patched_module():
    model = tiny_lora_model("llama")
    assert wtacrs.describe(model) == "not patched by wtacrs"
    wtacrs.apply_wtacrs(model, budget=0.1, targets="lora")
    report = wtacrs.describe(model)
    names = wtacrs.targets.resolve_targets(model, "lora")
    assert len(names) == 6 and all(name in report for name in names)
    assert "0.1" in report and "6 sampled layers" in report


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(targets="everything"), "unknown targets preset 'everything'"),
        (dict(targets=["no_such_layer"]), r"matched no linear module.*its linear modules are: .*query"),
        (dict(targets="lora"), "is this a PEFT LoRA model"),
        (dict(budget=0.0), "budget must be in"),
        (dict(budget=1.5), "budget must be in"),
        (dict(budget=float("nan")), "budget must be in"),
        (dict(method="bogus"), "method must be one of"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(kwargs, message):
    model = tiny_model("bert")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        wtacrs.apply_wtacrs(model, **kwargs)
    assert [type(m) for m in model.modules()] == before
    assert not wtacrs.is_patched(model)


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D modules"):
        wtacrs.apply_wtacrs(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))


def test_remove_on_unpatched_model_is_refused():
    with pytest.raises(ValueError, match="not patched"):
        wtacrs.remove_wtacrs(tiny_model("bert"))
