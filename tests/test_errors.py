"""Every user-facing error of docs/errors.md, one test per row: the mistake raises exactly the documented message
(or, for the command line, prints it as one line and exits 2), and the model and the data are left as they were.

The messages are read from the table in docs/errors.md, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import wtacrs
from wtacrs.app import data
from wtacrs.app.cli import main
from wtacrs.hf import ExampleIdCollator
from tiny_models import tiny_batch, tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def documented() -> dict[str, tuple[str, str]]:
    """Row id -> (raised, message) from the table of docs/errors.md (cells in backticks)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"E\d+", cells[0]):
            raised, message = (re.fullmatch(r"`(.*)`", c).group(1) for c in cells[2:])
            rows[cells[0]] = (raised, message.replace("\\|", "|"))
    return rows


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class Snapshot:
    """What a failed call must not change: module classes, forwards, hooks, parameters and buffers (values and
    gradients), the training flag, and any tensors passed in."""

    def __init__(self, model: nn.Module, *tensors: torch.Tensor) -> None:
        self.model, self.tensors = model, tensors
        self.state = self._take(model, tensors)

    @staticmethod
    def _take(model, tensors):
        return (
            [(n, type(m), m.__dict__.get("forward"), len(m._forward_hooks), len(m._forward_pre_hooks), m.training)
             for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            [t.clone() for t in tensors],
            wtacrs.is_patched(model), model.__dict__.keys() - {"_modules"},
        )

    def unchanged(self) -> bool:
        modules, state, grads, tensors, patched, attrs = self._take(self.model, self.tensors)
        old_modules, old_state, old_grads, old_tensors, old_patched, old_attrs = self.state
        same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        return (modules == old_modules and patched == old_patched and attrs == old_attrs
                and state.keys() == old_state.keys() and all(torch.equal(state[k], old_state[k]) for k in state)
                and all(same(grads[n], old_grads[n]) for n in grads)
                and all(torch.equal(a, b) for a, b in zip(tensors, old_tensors)))


def raised(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(Exception) as info:
        call()
    return type(info.value).__name__, str(info.value)


def library_error(model: nn.Module, call: Callable[[nn.Module], object], *tensors: torch.Tensor) -> tuple[str, str]:
    snapshot = Snapshot(model, *tensors)
    result = raised(lambda: call(model))
    assert snapshot.unchanged(), "the failed call changed the model or its inputs"
    return result


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def command_error(argv: list[str], capsys, folder: Path | None = None) -> tuple[str, str]:
    """``wtacrs ARGV``: exit status 2, one line on stderr and nothing else; files under ``folder`` untouched."""
    before = files_of(folder) if folder else None
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert files_of(folder) == before if folder else True
    prefix = f"wtacrs {argv[0]}: error: "
    assert err.startswith(prefix), err
    return "exit 2", err[len(prefix):-1]


def write_sst2(folder: Path, train: str) -> Path:
    task = folder / "SST-2"
    task.mkdir(parents=True)
    (task / "train.tsv").write_text(train)
    (task / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    return task


# --- the cases, by row of docs/errors.md --------------------------------------------------------------------------

def e01(tmp):  # budget out of range
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, budget=1.5, targets="all-linear"))


def e02(tmp):  # budget of the wrong type
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, budget="0.3", targets="all-linear"))


def e03(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, method="wta", targets="all-linear"))


def e04(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, min_rows=0, targets="all-linear"))


def e05(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, floor=0.0, targets="all-linear"))


def e06(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, probs="gradients", targets="all-linear"))


def e07(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, targets="everything"))


def e08(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, targets=["q_proj"]))


def e09(tmp):
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m, targets="lora"))


def e10(tmp):  # the default targets on a model without repeated blocks
    return library_error(mlp(), lambda m: wtacrs.apply_wtacrs(m))


def e11(tmp):
    return library_error(nn.Sequential(nn.ReLU()), lambda m: wtacrs.apply_wtacrs(m))


def e12(tmp):  # patched again with other settings
    model = wtacrs.apply_wtacrs(mlp(), budget=0.3, targets="all-linear")
    return library_error(model, lambda m: wtacrs.apply_wtacrs(m, budget=0.1, targets="all-linear"))


def e13(tmp):
    return library_error(mlp(), wtacrs.remove_wtacrs)


def e14(tmp):  # patched after FSDP2 wrapping (one CPU process)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = fully_shard(mlp(), mesh=init_device_mesh("cpu", (1,)))
        return library_error(model, lambda m: wtacrs.apply_wtacrs(m, targets="all-linear"))
    finally:
        dist.destroy_process_group()


class SdpaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(F.scaled_dot_product_attention(*self.qkv(x).chunk(3, dim=-1)))


def e15(tmp):  # attention sampling on attention computed without torch.matmul
    model = nn.Sequential(SdpaAttention())
    return library_error(model, lambda m: wtacrs.apply_wtacrs(m, targets="all-linear", sample_attention=True))


def e16(tmp):  # attention sampling on transformers 4's SDPA class for BERT (chosen when the model was built)
    model = tiny_model("bert")
    if not TRANSFORMERS_4:  # transformers 5 switches the model to eager attention, and back on removal
        wtacrs.apply_wtacrs(model, sample_attention=True)
        assert model.config._attn_implementation == "eager"
        wtacrs.remove_wtacrs(model)
        assert model.config._attn_implementation == "sdpa"
        return "ValueError", ("attention sampling cannot reach the attention matmuls of BertSdpaSelfAttention: its "
                              "forward calls neither torch.matmul nor an eager_attention_forward function that does; "
                              "transformers 4.57.6 chose this sdpa attention class when the model was built: load "
                              "the model with attn_implementation='eager'")
    message = library_error(model, lambda m: wtacrs.apply_wtacrs(m, sample_attention=True))
    return message[0], message[1].replace(transformers.__version__, "4.57.6")


def e17(tmp):  # input of the wrong width
    x, weight = torch.randn(3, 5), torch.randn(3, 4, requires_grad=True)
    snapshot = Snapshot(nn.Module(), x, weight)
    result = raised(lambda: wtacrs.sampled_linear(x, weight))
    assert snapshot.unchanged()
    return result


def e18(tmp):  # integer input
    x, weight = torch.ones(3, 4, dtype=torch.long), torch.randn(2, 4, requires_grad=True)
    snapshot = Snapshot(nn.Module(), x, weight)
    result = raised(lambda: wtacrs.sampled_linear(x, weight))
    assert snapshot.unchanged()
    return result


def e19(tmp):  # a model fed a non-finite activation: raised after backward
    model = wtacrs.apply_wtacrs(mlp(), targets="all-linear")
    x = torch.randn(3, 20, 4)
    x[0, 0, 0] = float("nan")
    x_before = x.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(x).sum()
    result = raised(loss.backward)
    # The weights and the input are as they were; only gradients (NaN, as without sampling) were written.
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num()) and torch.equal(x.isnan(), x_before.isnan())
    return result


def e20(tmp):  # probabilities with a negative entry
    probs = torch.tensor([0.5, -0.1, 0.2, 0.1, 0.3])
    snapshot = Snapshot(nn.Module(), probs)
    result = raised(lambda: wtacrs.sample_rows(probs, 2))
    assert snapshot.unchanged()
    return result


def e21(tmp):  # a batch without example ids for the per-example gradient cache
    features = [{"input_ids": [5, 6], "example_id": 0}, {"input_ids": [7, 8]}]
    result = raised(lambda: ExampleIdCollator(lambda fs: fs)(features))
    assert features == [{"input_ids": [5, 6], "example_id": 0}, {"input_ids": [7, 8]}]
    return result


def e22(tmp):  # a data folder that does not exist
    result = raised(lambda: data.load_task("sst2", data_dir=tmp / "glue"))
    assert not (tmp / "glue").exists()
    return result


def e23(tmp):  # a data folder without the task's files
    (tmp / "glue" / "CoLA").mkdir(parents=True)
    before = files_of(tmp)
    result = raised(lambda: data.load_task("sst2", data_dir=tmp / "glue"))
    assert files_of(tmp) == before
    return result


def e24(tmp):  # a label that the task does not have
    write_sst2(tmp / "glue", "sentence\tlabel\ngood\t1\nbad\tpositive\n")
    before = files_of(tmp)
    result = raised(lambda: data.load_task("sst2", data_dir=tmp / "glue"))
    assert files_of(tmp) == before
    return result


def e25(tmp):  # too few columns
    write_sst2(tmp / "glue", "good 1\n")
    before = files_of(tmp)
    result = raised(lambda: data.load_task("sst2", data_dir=tmp / "glue"))
    assert files_of(tmp) == before
    return result


def e26(tmp):
    return raised(lambda: data.get_task("imdb"))


def e27(tmp, capsys):  # wtacrs finetune on a model folder that does not exist
    return command_error(["finetune", "--model", str(tmp / "my-model"), "--task", "movies", "--quiet",
                          "--out", str(tmp / "out.json")], capsys, tmp)


def e28(tmp, capsys):  # wtacrs memory on a name it does not know
    return command_error(["memory", "bert-huge"], capsys, tmp)


def e29(tmp, capsys):  # wtacrs memory on a folder without a Hugging Face config
    (tmp / "notes.txt").write_text("not a model")
    return command_error(["memory", str(tmp)], capsys, tmp)


def e30(tmp, capsys):
    return command_error(["memory", "t5-small", "--arms", "qlora"], capsys, tmp)


def e31(tmp, capsys):
    return command_error(["memory", "t5-small", "--batch-size", "0"], capsys, tmp)


def e32(tmp, capsys):
    return command_error(["finetune", "--task", "movies", "--budget", "1.5", "--out", str(tmp / "out.json")],
                         capsys, tmp)


def e33(tmp, capsys):
    return command_error(["demo", "--rows", "0"], capsys, tmp)


def e34(tmp, capsys):  # wtacrs compare on a file that is not a results file
    (tmp / "results.json").write_text('{"accuracy": 0.9}')
    return command_error(["compare", str(tmp / "results.json"), "--no-plot"], capsys, tmp)


CASES = {f"E{int(name[1:]):02d}": case for name, case in globals().items() if re.fullmatch(r"e\d+", name)}


def test_every_documented_error_has_a_case_and_every_case_a_row():
    assert sorted(documented()) == sorted(CASES)
    assert len(CASES) >= 15


@pytest.mark.parametrize("row", sorted(CASES))
def test_documented_error(row, tmp_path, capsys):
    case = CASES[row]
    got = case(tmp_path, capsys) if case.__code__.co_argcount == 2 else case(tmp_path)
    kind, message = got
    message = message.replace(str(tmp_path), "<tmp>")
    assert (kind, message) == documented()[row]
