"""Run a module's own ``forward`` with a few torch functions swapped, decided once at patch time.

Compact dropout and ReLU (``wtacrs.masks``) and sampled attention matmuls (``wtacrs.attention``) have to replace
calls such as ``nn.functional.dropout(...)`` and ``torch.matmul(...)`` made inside a model's code. Intercepting
every torch call at run time (a ``TorchFunctionMode``) costs Python work per call. Instead, a patched module gets,
as its instance ``forward``, a copy of its class's ``forward`` function whose global names ``torch``, ``nn`` and
``F`` (whatever the modeling file calls them) resolve to namespaces where those few functions are replaced, and the
rest are torch's own. The same copy is made of the eager attention function that the forward calls by name
(``eager_attention_forward`` in transformers), so the model's own code runs unchanged, bit for bit, except for the
replaced calls. Undo deletes the instance attribute. ``torch.compile`` traces the copies like any function.
"""

from __future__ import annotations

import inspect
import sys
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Module-level functions a forward may call by name; copied with the same replacements.
HELPER_FUNCTIONS = ("eager_attention_forward",)


def proxy_namespaces(replacements: Mapping[str, Callable]) -> dict[int, types.ModuleType]:
    """Namespaces standing in for ``torch``, ``torch.nn`` and ``torch.nn.functional``, keyed by the ``id`` of the
    module they replace. ``replacements`` maps names such as ``"matmul"`` (found in ``torch``) or ``"dropout"``
    (found in ``torch.nn.functional``; ``torch.dropout`` too) to the functions to call instead."""
    functional = _proxy(F, {name: fn for name, fn in replacements.items() if hasattr(F, name)})
    nn_proxy = _proxy(nn, {"functional": functional})
    torch_proxy = _proxy(torch, {"nn": nn_proxy, **{name: fn for name, fn in replacements.items() if hasattr(torch, name)}})
    return {id(torch): torch_proxy, id(nn): nn_proxy, id(F): functional}


def _proxy(real: types.ModuleType, overrides: Mapping[str, Any]) -> types.ModuleType:
    proxy = types.ModuleType(real.__name__)
    proxy.__dict__.update(real.__dict__)
    proxy.__dict__.update(overrides)
    return proxy


def rebound(fn: types.FunctionType, namespaces: Mapping[int, types.ModuleType],
            replacements: Mapping[str, Callable], helpers: bool = True) -> types.FunctionType:
    """A copy of ``fn`` whose globals bound to torch / nn / functional resolve to ``namespaces``, whose globals
    bound to a replaced function (``from torch.nn.functional import dropout``) resolve to the replacement, and whose
    helper functions (``HELPER_FUNCTIONS``) are copied the same way.

    A decorated ``fn`` (``functools.wraps``: ``__wrapped__`` set, the wrapped function held in a closure cell, as
    transformers' ``deprecate_kwarg``) is copied with the wrapped function rebound in that cell, so the decorator
    still runs.
    """
    inner = getattr(fn, "__wrapped__", None)
    cells = fn.__closure__ or ()
    if isinstance(inner, types.FunctionType) and any(_holds(cell, inner) for cell in cells):
        new_inner = rebound(inner, namespaces, replacements, helpers)
        closure = tuple(types.CellType(new_inner) if _holds(cell, inner) else cell for cell in cells)
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__qualname__ = fn.__qualname__
        copy.__wrapped__ = new_inner
        return copy
    globals_ = _module_for(fn.__globals__, namespaces).__dict__
    by_function = {id(getattr(module, name)): fn_ for name, fn_ in replacements.items()
                   for module in (torch, F) if hasattr(module, name)}
    for name, value in fn.__globals__.items():
        if name.startswith("__import_"):  # Dynamo's aliases of imported modules: they must stay the real modules
            continue
        if id(value) in namespaces:
            globals_[name] = namespaces[id(value)]
        elif id(value) in by_function:
            globals_[name] = by_function[id(value)]
    for name in HELPER_FUNCTIONS if helpers else ():
        helper = fn.__globals__.get(name)
        if isinstance(helper, types.FunctionType):
            globals_[name] = rebound(helper, namespaces, replacements, helpers=False)
    copy = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__wrapped__ = fn
    return copy


def _holds(cell: types.CellType, value: object) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _module_for(original: dict, namespaces: Mapping[int, types.ModuleType]) -> types.ModuleType:
    """The module whose dict holds the rebound copies of ``original``'s functions: a copy of the original module's
    namespace, under its own name in ``sys.modules`` (tools such as Dynamo find a function's module by the
    ``__name__`` in its globals and import it; they must find this one, whose names resolve differently). One per
    (original module, set of namespaces); removed from ``sys.modules`` when the namespaces are freed."""
    torch_proxy = namespaces[id(torch)]
    modules = torch_proxy.__dict__.setdefault("__wtacrs_modules__", {})
    name = original.get("__name__", "module")
    if name not in modules:
        own_name = f"{name}.__wtacrs_{id(torch_proxy):x}"
        module = types.ModuleType(own_name)
        module.__dict__.update(original)
        module.__dict__["__name__"] = own_name
        sys.modules[own_name] = module
        weakref.finalize(torch_proxy, sys.modules.pop, own_name, None)
        modules[name] = module
    return modules[name]


def calls_any(fn: Callable, names: set[str]) -> bool:
    """Whether the code of ``fn`` (or of a helper function it calls by name) may call one of ``names`` through
    ``torch`` / ``nn`` / ``F`` or by a direct import: it mentions such a name and a global bound to one of those."""
    while isinstance(getattr(fn, "__wrapped__", None), types.FunctionType):
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    globals_ = getattr(fn, "__globals__", {})
    torch_like = {id(torch), id(nn), id(F)} | {id(getattr(m, n)) for n in names for m in (torch, F) if hasattr(m, n)}
    if names & set(code.co_names) and any(id(globals_.get(n)) in torch_like for n in code.co_names):
        return True
    return any(name in code.co_names and calls_any(globals_.get(name), names) for name in HELPER_FUNCTIONS)


class Replacements:
    """What a patch replaces (subclasses: ``wtacrs.masks``, ``wtacrs.attention``). Picklable, so that patched models
    pickle: the rebound code is rebuilt from it on load."""

    def functions(self) -> dict[str, Callable]:
        raise NotImplementedError

    def call(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        """Run ``forward(module, *args, **kwargs)``; a subclass may set up per-call state around it."""
        return forward(module, *args, **kwargs)


class PatchedForward:
    """A module's instance ``forward``: its class's forward rebound with ``replacements``' functions."""

    def __init__(self, module: nn.Module, replacements: Replacements) -> None:
        self.module = module
        self.replacements = replacements
        functions = replacements.functions()
        self._forward = rebound(type(module).forward, proxy_namespaces(functions), functions)
        # The class forward's signature: callers read it (transformers 4's Trainer passes num_items_in_batch only
        # to a forward that takes **kwargs).
        self.__signature__ = inspect.signature(type(module).forward.__get__(module))

    def __call__(self, *args, **kwargs):
        return self.replacements.call(self.module, self._forward, args, kwargs)

    def __reduce__(self):
        return PatchedForward, (self.module, self.replacements)


def set_forward(module: nn.Module, replacements: Replacements) -> "ForwardSwap":
    """Give ``module`` an instance forward that runs its class's forward with ``replacements`` (the class is
    untouched). Refuses a module that already has one."""
    if "forward" in module.__dict__:
        raise ValueError(f"{type(module).__name__} already has an instance forward; remove the other patch first")
    module.forward = PatchedForward(module, replacements)
    return ForwardSwap(module)


class ForwardSwap:
    """Undo record of ``set_forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def undo(self) -> None:
        self.module.__dict__.pop("forward", None)
