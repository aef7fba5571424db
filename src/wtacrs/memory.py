"""What autograd keeps for backward: total bytes (``SavedTensors``) and bytes by kind (``saved_by_kind``).

``saved_by_kind(model, inputs)`` runs one forward and walks the autograd graph from the loss: every node's
``_saved_*`` tensors (and ``saved_tensors`` of custom Functions), de-duplicated by storage, parameters excluded,
counted at the storage's full size. Each storage gets one kind:

* ``relu``: saved by ReLU's backward (stock: its output; compact: a 1-bit mask).
* ``dropout``: dropout masks (``NativeDropoutBackward0`` on GPU; on CPU ``F.dropout`` multiplies by a float noise
  tensor, recognised as a two-valued ``{0, 1/(1-p)}`` tensor saved by a multiplication; compact: 1-bit masks).
* ``attention``: softmax outputs, matmuls of two activations (``Q Kᵀ``, ``attn · V``), SDPA and sampled-attention
  saves.
* ``norm``: LayerNorm/RMSNorm saves (by node, or by the module that saved the tensor: a class named ``*Norm*``).
* ``linear``: inputs of linear layers with a trainable weight (kept rows for sampled layers) — what linear
  sampling can cut. A storage that a ``relu``/``dropout``/``attention``/``norm`` op also saves is counted under
  that op, since it stays stored anyway, and listed in ``SavedReport.shared_linear_inputs``.
* ``other``: everything else (elementwise products, embeddings' indices, position biases...).

Findings on T5 (random init, CPU, fp32; ``results/memory_*.txt``):

* With dropout > 0 in training no linear input is stored twice: ``wo`` reads the dropout output, not the ReLU
  output, and ``o`` reads a contiguous copy of the attention output that no other op keeps (eager attention).
* With dropout 0 the ReLU output *is* ``wo``'s input: stock PyTorch stores it once for both, so sampling ``wo``
  adds 0.3 of it unless ReLU is compact (then it is 1 bit + 0.3). With SDPA, the output its backward keeps is
  also ``o``'s input whenever ``transpose(1, 2).contiguous()`` is a no-op (CUDA flash/efficient kernels return
  that layout; on CPU seen for the short decoder cross-attention): sampling ``o`` then saves nothing.
* In eager attention with dropout 0 the softmax output is the ``attn · V`` operand; attention sampling keeps it
  whole for that reason (``wtacrs.attention``).
* LoRA with dropout > 0: each of q/k/v's adapters stores its own dropped-out copy of the input (3 copies); with
  dropout 0 they share one tensor, and sampling each adapter separately would store 3 samples of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


class SavedTensors:
    """Context manager recording every tensor autograd saves for backward while it is active.

    Bytes are de-duplicated by storage (a tensor saved by several ops, or views of one buffer, count once)
    and counted at the storage's full size, which is what stays allocated. Parameters are excluded: tensors
    that are ``nn.Parameter`` and any storage of ``exclude`` (e.g. ``model.parameters()``).

    Example::

        with SavedTensors(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        print(saved.nbytes)
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if not isinstance(t, nn.Parameter):
            key = _storage_key(t)
            if key not in self._excluded:
                self._storages[key] = t.untyped_storage().nbytes()
        return t

    def __contains__(self, t: Tensor) -> bool:
        """Whether ``t``'s storage (``t`` itself or any view of its buffer) was saved."""
        return _storage_key(t) in self._storages

    @property
    def nbytes(self) -> int:
        """Total bytes of the distinct storages saved so far."""
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


KINDS: tuple[str, ...] = ("linear", "relu", "dropout", "attention", "norm", "other")

_RELU_NODES = {"ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1",
               "_CompactReLUFunctionBackward"}
_DROPOUT_NODES = {"NativeDropoutBackward0", "_CompactDropoutFunctionBackward"}
_ATTENTION_NODES = {"SoftmaxBackward0", "_SoftmaxBackward0", "_SampledMatmulFunctionBackward"}
_NORM_NODES = {"NativeLayerNormBackward0", "NativeGroupNormBackward0", "FusedRmsNormBackward0",
               "_FusedRmsNormBackward0"}
_MATMUL_NODES = {"MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0", "MvBackward0",
                 "AddmvBackward0", "LinearBackward0"}
_SAMPLED_LINEAR_NODES = {"SampledLinearFunctionBackward", "SampledConv1DFunctionBackward"}
#: When one storage is saved by several ops, the op listed first owns it.
_PRIORITY = ("relu", "dropout", "attention", "norm", "linear", "other")


@dataclass(frozen=True)
class SavedItem:
    """One saved storage: its size, kind, and the graph nodes and modules that saved it."""

    nbytes: int
    kind: str
    nodes: tuple[str, ...]
    modules: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str


@dataclass
class SavedReport:
    items: list[SavedItem]

    @property
    def total(self) -> int:
        return sum(item.nbytes for item in self.items)

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind, every kind of ``KINDS`` present (0 when none)."""
        out = dict.fromkeys(KINDS, 0)
        for item in self.items:
            out[item.kind] += item.nbytes
        return out

    def shared_linear_inputs(self) -> list[SavedItem]:
        """Linear-layer inputs that another op keeps whole anyway (sampling those layers saves nothing). Only
        floating-point tensors: a 1-bit dropout mask or a scalar that a sampled layer shares with another op is no
        input."""
        return [item for item in self.items if item.kind != "linear" and "linear" in _node_kinds(item.nodes)
                and item.shape != () and getattr(torch, item.dtype).is_floating_point]

    def to_dict(self) -> dict:
        return {"total": self.total, "by_kind": self.by_kind(),
                "shared_linear_inputs": [asdict(i) for i in self.shared_linear_inputs()]}


def _node_kinds(nodes: Iterable[str]) -> set[str]:
    return {node.split(":", 1)[0] for node in nodes}


class _ModuleTracker:
    """Knows the innermost module running, through forward hooks on every module."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[tuple[str, str]] = []
        self.handles = []
        for name, module in model.named_modules():
            label = (name or "<root>", type(module).__name__)
            self.handles.append(module.register_forward_pre_hook(lambda *a, _l=label: self.stack.append(_l)))
            self.handles.append(module.register_forward_hook(self._pop, always_call=True))

    def _pop(self, *_args) -> None:  # a forward hook's return value would replace the module's output
        self.stack.pop()

    def current(self) -> tuple[str, str]:
        return self.stack[-1] if self.stack else ("<outside>", "")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _saved_of(node) -> list[tuple[str, Tensor]]:
    """(attribute, tensor) pairs a graph node keeps for backward."""
    found = []
    if hasattr(node, "saved_tensors") and not hasattr(node, "_saved_self"):  # custom autograd.Function
        try:
            found.extend(("saved_tensors", t) for t in node.saved_tensors if isinstance(t, Tensor))
        except RuntimeError:  # already freed by a backward
            pass
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        found.extend((attr, t) for t in values if isinstance(t, Tensor))
    return found


_VIEW_NODES = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
               "ExpandBackward0", "ToCopyBackward0", "ReshapeAliasBackward0"}


def _reads_parameter(node, depth: int = 3) -> bool:
    """Whether an input of ``node`` is a trainable leaf (through views): a matmul with a weight. A linear layer
    whose input needs no gradient saves no weight, so the saved tensors alone cannot tell."""
    for next_node, _ in node.next_functions:
        if next_node is None:
            continue
        name = type(next_node).__name__
        if name == "AccumulateGrad" or (depth > 1 and name in _VIEW_NODES and _reads_parameter(next_node, depth - 1)):
            return True
    return False


def _is_dropout_noise(t: Tensor) -> bool:
    """A constant-free {0, c} float tensor that needs no gradient: CPU ``F.dropout``'s saved noise."""
    if t.requires_grad or t.grad_fn is not None or not t.is_floating_point() or t.numel() < 2:
        return False
    top = t.max()
    return bool(top > 0) and bool(((t == 0) | (t == top)).all()) and bool((t == 0).any())


def _kind_of(node_name: str, t: Tensor, node_has_param: bool, module_class: str) -> str:
    if node_name in _RELU_NODES:
        return "relu"
    if node_name in _DROPOUT_NODES:
        return "dropout"
    if node_name.startswith("Mul") and _is_dropout_noise(t):
        return "dropout"
    if node_name in _ATTENTION_NODES or "ScaledDotProduct" in node_name:
        return "attention"
    if node_name in _NORM_NODES:
        return "norm"
    if node_name in _SAMPLED_LINEAR_NODES:
        return "linear"
    if node_name in _MATMUL_NODES:
        return "linear" if node_has_param else "attention"
    if "Norm" in module_class:
        return "norm"
    return "other"


def _loss_of(output) -> Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    if isinstance(output, Tensor):
        return output.float().sum()
    first = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return first.float().sum()


def saved_by_kind(model: nn.Module, inputs: Mapping[str, Tensor] | Tensor, exclude: Iterable[Tensor] = ()) -> SavedReport:
    """Run ``model(**inputs)`` (or ``model(inputs)``) once and sort what autograd saved for backward by kind.

    The loss is ``output.loss`` when the model returns one, else the sum of its first output. Parameters and the
    storages of ``exclude`` are not counted. The same total (without kinds) is what ``wtacrs.memory.SavedTensors``
    measures, except tensors saved for parts of the graph the loss does not reach.
    """
    excluded = {_storage_key(p) for p in model.parameters()} | {_storage_key(t) for t in exclude}
    tracker = _ModuleTracker(model)
    origin: dict[tuple, set[tuple[str, str]]] = {}

    def pack(t: Tensor) -> Tensor:
        origin.setdefault(_storage_key(t), set()).add(tracker.current())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    finally:
        tracker.remove()
    loss = _loss_of(output)

    storages: dict[tuple, dict] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        name = type(node).__name__
        saved = [(attr, t) for attr, t in _saved_of(node) if t.untyped_storage().data_ptr() != 0]
        has_param = _reads_parameter(node) or any(
            _storage_key(t) in excluded or isinstance(t, nn.Parameter) for _, t in saved)
        for attr, t in saved:
            key = _storage_key(t)
            if key in excluded or isinstance(t, nn.Parameter):
                continue
            modules = origin.get(key, {("<unknown>", "")})
            module_class = " ".join(cls for _, cls in modules)
            kind = _kind_of(name, t, has_param, module_class)
            entry = storages.setdefault(key, {"nbytes": t.untyped_storage().nbytes(), "kinds": set(), "nodes": set(),
                                              "modules": {m for m, _ in modules}, "shape": tuple(t.shape),
                                              "dtype": str(t.dtype).removeprefix("torch.")})
            entry["kinds"].add(kind)
            entry["nodes"].add(f"{kind}:{name}.{attr}")
    items = [
        SavedItem(e["nbytes"], next(k for k in _PRIORITY if k in e["kinds"]), tuple(sorted(e["nodes"])),
                  tuple(sorted(e["modules"])), e["shape"], e["dtype"])
        for e in storages.values()
    ]
    items.sort(key=lambda item: -item.nbytes)
    return SavedReport(items)
