"""apply_wtacrs / remove_wtacrs / describe on tiny Hugging Face and PEFT LoRA models of every family in
tests/tiny_models.py: outputs unchanged, less saved for backward, exact undo, applying twice, the description.
(Unbiased gradients per family: tests/test_models_unbiased.py.)

The patched forward runs the same kernels on the same tensors as the stock forward (``F.linear`` / ``Conv1D``'s
``addmm``, ReLU and dropout values, with attention sampling the model's eager ``torch.matmul``), so outputs are
compared for equality against a stock model that computes attention the same way (eager against eager).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from torch import nn

import wtacrs
from wtacrs.memory import SavedTensors
from wtacrs.targets import resolve_targets
from tiny_models import FAMILIES, tiny_batch, tiny_lora_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [pytest.param(family, preset, id=f"{family}-{preset}") for family in FAMILIES for preset in ("full", "lora")]
LOSSES = [pytest.param(False, id="loss-ignores-padding"), pytest.param(True, id="loss-reads-padding")]
#: Families whose attention class transformers 4 chooses when the model is built (SDPA by default), so that
#: attention sampling needs them built eager there (test_errors.py checks the error otherwise).
EAGER_AT_BUILD = {"bert", "roberta", "distilbert"} if int(transformers.__version__.split(".")[0]) < 5 else set()


def build(family: str, preset: str, **from_config) -> nn.Module:
    return (tiny_model if preset == "full" else tiny_lora_model)(family, **from_config)


def build_for_attention_sampling(family: str, preset: str) -> nn.Module:
    return build(family, preset, **({"attn_implementation": "eager"} if family in EAGER_AT_BUILD else {}))


def sampled_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (wtacrs.SampledLinear, wtacrs.SampledConv1D))]


def saved_bytes(model: nn.Module, batch: dict) -> int:
    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(**batch).loss
    del loss
    return saved.nbytes


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def forwards(model: nn.Module) -> dict[str, object]:
    """Each module's forward as the instance sees it (instance attribute or class function)."""
    return {name: module.__dict__.get("forward", type(module).forward) for name, module in model.named_modules()}


@pytest.mark.parametrize("loss_on_padding", LOSSES)
@pytest.mark.parametrize("family,preset", CASES)
def test_outputs_unchanged_and_every_trainable_parameter_gets_a_gradient(family, preset, loss_on_padding):
    model = build(family, preset)
    batch = tiny_batch(family, padded=True, loss_on_padding=loss_on_padding)
    stock = copy.deepcopy(model)
    reference = stock(**batch)
    reference.loss.backward()

    wtacrs.apply_wtacrs(model, budget=0.3)
    assert len(sampled_layers(model)) == len(resolve_targets(stock, "full" if preset == "full" else "lora").names)
    out = model(**batch)
    assert torch.equal(out.loss, reference.loss)
    assert torch.equal(out.logits, reference.logits)
    out.loss.backward()
    for (name, p), (_, p_stock) in zip(model.named_parameters(), stock.named_parameters()):
        assert (p.grad is None) == (p_stock.grad is None), name
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name


@pytest.mark.parametrize("family,preset", CASES)
def test_outputs_unchanged_with_attention_sampling(family, preset):
    """The model is switched to eager attention, so it is compared with a stock model built eager."""
    batch = tiny_batch(family, padded=True, loss_on_padding=True)
    stock = build(family, preset, attn_implementation="eager")
    model = build_for_attention_sampling(family, preset)
    reference = stock(**batch)
    wtacrs.apply_wtacrs(model, budget=0.3, sample_attention=True)
    out = model(**batch)
    assert torch.equal(out.loss, reference.loss)
    assert torch.equal(out.logits, reference.logits)
    out.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family,preset", CASES)
def test_saved_bytes_below_stock_and_falling_with_the_budget(family, preset, capsys):
    batch = tiny_batch(family, padded=True)
    model = build(family, preset)
    stock = saved_bytes(model, batch)
    patched = {}
    for budget in (0.3, 0.1):
        wtacrs.apply_wtacrs(model, budget=budget)
        patched[budget] = saved_bytes(model, batch)
        wtacrs.remove_wtacrs(model)
    assert patched[0.1] <= patched[0.3] < stock
    assert saved_bytes(model, batch) == stock  # removed: stock again
    with capsys.disabled():
        print(f"\n{family:10s} {preset:4s} stock {stock:7d} B | @0.3 {patched[0.3] / stock:.3f} | "
              f"@0.1 {patched[0.1] / stock:.3f}")


@pytest.mark.parametrize("sample_attention", [False, True], ids=["linear", "linear+attention"])
@pytest.mark.parametrize("family,preset", CASES)
def test_remove_restores_modules_forwards_state_and_attention(family, preset, sample_attention):
    batch = tiny_batch(family, padded=True, loss_on_padding=True)
    model = build_for_attention_sampling(family, preset) if sample_attention else build(family, preset)
    types, funcs = module_types(model), forwards(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    reference = model(**batch)
    reference.loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    wtacrs.apply_wtacrs(model, budget=0.3, sample_attention=sample_attention)
    assert wtacrs.is_patched(model)
    assert module_types(model) != types
    assert list(model.state_dict()) == list(state)  # same keys, values shared with the original parameters
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model(**batch).loss.backward()  # a training step leaves nothing behind either
    model.zero_grad(set_to_none=True)

    wtacrs.remove_wtacrs(model)
    assert not wtacrs.is_patched(model)
    assert module_types(model) == types
    assert forwards(model) == funcs
    assert model.config._attn_implementation == attn
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # The stock model again: the same kernels in the same order as before patching.
    out = model(**batch)
    assert torch.equal(out.logits, reference.logits)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    assert all(torch.equal(grads[n], reference_grads[n]) for n in grads)


@pytest.mark.parametrize("family,preset", CASES)
def test_forward_signatures_unchanged(family, preset):
    """Callers read them: transformers 4's Trainer passes num_items_in_batch only to a forward taking **kwargs."""
    model = build_for_attention_sampling(family, preset)
    before = {name: (type(m), inspect.signature(m.forward)) for name, m in model.named_modules()}
    wtacrs.apply_wtacrs(model, sample_attention=True)
    after = {name: (type(m), inspect.signature(m.forward)) for name, m in model.named_modules()}
    kept = [name for name in before if name in after and after[name][0] is before[name][0]]  # not swapped
    assert any("forward" in model.get_submodule(name).__dict__ for name in kept)  # some forwards were rebound
    assert all(after[name] == before[name] for name in kept)


def test_remove_from_an_unpatched_model_is_an_error():
    with pytest.raises(ValueError, match="^model is not patched by wtacrs.apply_wtacrs; nothing to remove$"):
        wtacrs.remove_wtacrs(tiny_model("bert"))


@pytest.mark.parametrize("family,preset", [("qwen3", "lora"), ("distilbert", "full"), ("t5v1.1", "full")])
def test_apply_twice_with_the_same_settings_does_nothing(family, preset):
    model = build_for_attention_sampling(family, preset)
    wtacrs.apply_wtacrs(model, budget=0.3, sample_attention=True)
    layers, funcs, report = sampled_layers(model), forwards(model), wtacrs.describe(model)
    assert wtacrs.apply_wtacrs(model, budget=0.3, sample_attention=True) is model
    assert sampled_layers(model) == layers and forwards(model) == funcs and wtacrs.describe(model) == report
    wtacrs.remove_wtacrs(model)  # one removal undoes it
    assert not sampled_layers(model) and not wtacrs.is_patched(model)


def test_apply_with_other_settings_is_refused_and_changes_nothing():
    model = tiny_model("gpt_neox")
    wtacrs.apply_wtacrs(model, budget=0.3)
    layers, funcs = sampled_layers(model), forwards(model)
    with pytest.raises(ValueError, match=r"^model is already patched with WtacrsConfig\(budget=0.3, .*\); call "
                                         r"wtacrs.remove_wtacrs\(model\) before applying other settings$"):
        wtacrs.apply_wtacrs(model, budget=0.1)
    assert sampled_layers(model) == layers and forwards(model) == funcs
    assert all(layer.budget == 0.3 for layer in layers)
    wtacrs.remove_wtacrs(model)
    wtacrs.apply_wtacrs(model, budget=0.1)  # after removal, other settings are fine
    assert all(layer.budget == 0.1 for layer in sampled_layers(model))


@pytest.mark.parametrize("family,preset", [("opt", "full"), ("mistral", "lora"), ("bart", "full")])
def test_describe_lists_each_sampled_layer_and_what_it_stored(family, preset):
    model = build(family, preset)
    assert wtacrs.describe(model) == "not patched by wtacrs"
    wtacrs.apply_wtacrs(model, budget=0.1)
    names = resolve_targets(model, "auto").names
    lines = wtacrs.describe(model).splitlines()
    rows = {line.split()[0]: line for line in lines[2:2 + len(names)]}
    assert list(rows) == names
    assert all("0.1" in row and "wta_crs" in row and "not run in training yet" in row for row in rows.values())
    assert f"{len(names)} sampled layers" in lines[-1]
    assert "compact ReLU/dropout masks: True" in lines[-1] and "attention sampling: False" in lines[-1]

    model(**tiny_batch(family, padded=True)).loss.backward()
    rows = wtacrs.describe(model).splitlines()[2:2 + len(names)]
    assert not any("not run in training yet" in row for row in rows)


def test_describe_says_a_frozen_layer_stores_nothing():
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    wtacrs.apply_wtacrs(model)
    row = next(line for line in wtacrs.describe(model).splitlines() if line.startswith("model.layers.0.mlp.down_proj"))
    assert row.endswith("nothing: frozen weight")


def test_eval_mode_and_no_grad_store_no_samples():
    model = tiny_model("qwen3")
    batch = tiny_batch("qwen3")
    wtacrs.apply_wtacrs(model)
    model.eval()
    with SavedTensors(exclude=model.parameters()) as saved:
        with torch.no_grad():
            model(**batch)
    assert saved.nbytes == 0
    assert all("not run in training yet" in line for line in wtacrs.describe(model).splitlines()[2:10])


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model("mistral")
    wtacrs.apply_wtacrs(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    batch = tiny_batch("mistral")
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    wtacrs.apply_wtacrs(loaded)
    assert list(loaded.state_dict()) == list(model.state_dict())
