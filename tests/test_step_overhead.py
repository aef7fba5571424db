"""Host-side cost of a training step of a patched model: no host syncs beyond the stock model's, few extra ops.

Measured with ``torch.profiler`` on CPU, as counts (times on a shared CI machine say little):

* host syncs: ``aten::item`` / ``_local_scalar_dense`` / ``is_nonzero`` / ``_unique2`` / ``nonzero`` calls; on a GPU
  each one stalls the host until the device has caught up.
* top-level ops: aten ops called from Python or from autograd's engine (not from inside another aten op): one
  dispatch each, the Python-side overhead of a step.
* kernels: aten ops that compute something and call nothing that does (views, allocations and metadata do not
  count), roughly the kernels a GPU would launch.

A Triton kernel counts as one op and one kernel. The kernels run on CUDA tensors; here they run on CPU tensors under
Triton's interpreter in a child process (``tests/interpreted.py``), and the reference path in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::_unique2", "aten::nonzero")
#: Ops that launch no kernel: views, allocations, metadata.
NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
    "aten::numpy_T", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::slice",
    "aten::select", "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::resize_", "aten::resolve_conj", "aten::resolve_neg", "aten::unbind", "aten::split", "aten::chunk",
    "aten::narrow", "aten::lift_fresh", "aten::_unsafe_view", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::result_type", "aten::promote_types", "aten::set_", "aten::is_same_size", "aten::size", "aten::stride",
}
TRITON_LAUNCH = "triton_kernel"
#: The most a patched step may cost, in top-level ops, per top-level op of the stock step.
MAX_RATIO = 1.6

pytestmark = pytest.mark.usefixtures("one_thread")


def bert(lora: bool) -> torch.nn.Module:
    """Tiny BERT with dropout 0.1 (hidden, attention and LoRA) and eager attention."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=64, num_labels=2,
        attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                           target_modules=["query", "key", "value"]))
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(2, 128, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=g)}


def patched(lora: bool) -> torch.nn.Module:
    import wtacrs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wtacrs.apply_wtacrs(bert(lora), 0.3, sample_attention=lora)


def _in_launch(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == TRITON_LAUNCH:
            return True
        parent = parent.cpu_parent
    return False


def step_counts(model: torch.nn.Module) -> dict[str, int]:
    """Counts of one training step (forward and backward) after two warm-up steps."""
    inputs = batch()

    def step():
        model(**inputs).loss.backward()

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    launches = sum(e.name == TRITON_LAUNCH for e in events)
    ops = [e for e in events if e.name.startswith("aten::") and not _in_launch(e)]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    # An op computes if nothing it calls computes (allocations and views inside do not count).
    computing = [e for e in ops if e.name not in NO_KERNEL]
    parents = {id(e.cpu_parent) for e in computing if e.cpu_parent is not None}
    kernels = [e for e in computing if id(e) not in parents]
    return {"ops": len(top) + launches, "kernels": len(kernels) + launches,
            "syncs": sum(e.name in SYNC_OPS for e in ops), "triton": launches}


def all_counts() -> dict[str, dict[str, int]]:
    return {
        "full": step_counts(bert(lora=False)), "full+wta": step_counts(patched(lora=False)),
        "lora": step_counts(bert(lora=True)), "lora+wta+masks+attn": step_counts(patched(lora=True)),
    }


def _count_launches() -> None:
    """Make every Triton launch one ``TRITON_LAUNCH`` range, so that the interpreter's own work inside is not
    counted."""
    from triton.runtime.interpreter import GridExecutor

    call = GridExecutor.__call__

    def counted(self, *args, **kwargs):
        with record_function(TRITON_LAUNCH):
            return call(self, *args, **kwargs)

    GridExecutor.__call__ = counted


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, dict[str, int]]]:
    """Counts per arm on the reference path (this process) and the Triton path (a child under the interpreter)."""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                           cwd=Path(__file__).parent)
    assert child.returncode == 0, child.stderr[-4000:]
    return {"reference": all_counts(), "triton": json.loads(child.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("arm, stock", [("full+wta", "full"), ("lora+wta+masks+attn", "lora")])
def test_no_host_sync_beyond_the_stock_step(counts, path, arm, stock):
    assert counts[path][arm]["syncs"] <= counts[path][stock]["syncs"], counts[path]


@pytest.mark.parametrize("arm, stock", [("full+wta", "full"), ("lora+wta+masks+attn", "lora")])
def test_op_count_within_the_target_on_the_cuda_path(counts, arm, stock):
    """The Triton path is what runs on CUDA: its top-level op count stays within MAX_RATIO of the stock step's."""
    triton_path = counts["triton"]
    assert triton_path[arm]["triton"] > 0, "the Triton kernels did not run"
    ratio = triton_path[arm]["ops"] / triton_path[stock]["ops"]
    assert ratio <= MAX_RATIO, (f"{arm}: {ratio:.2f}x the stock step's ops", counts)


if __name__ == "__main__":  # the child process: Triton path, counts as JSON on the last line
    sys.path.insert(0, str(Path(__file__).parent))
    _count_launches()
    torch.set_num_threads(1)
    print(json.dumps(all_counts()))
