"""Hugging Face transformers: attention modules reached through the library's ``AttentionInterface``.

A transformers attention module computes its projections, rotary embeddings and caches itself,
then calls ``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)``
with the module as first argument. attnswap registers one implementation under the key
``"attnswap"``: a copy of the library's own ``sdpa`` implementation whose single SDPA call goes
to the router of the module it is given (plain SDPA for a module without one). So everything
``sdpa`` does before that call (GQA by ``enable_gqa`` or ``repeat_kv``, the causal rule, a
``position_bias`` merged into the mask, soft-capping refused) is the library's own code, and the
router sees the call in SDPA's terms. The same key is registered for masks with the library's
``sdpa`` mask function, so masks are built exactly as for ``sdpa`` (an unregistered key makes
transformers drop padding masks silently).

What patching changes: the ``_attn_implementation_internal`` of each config a patched module
reads, from ``"sdpa"`` to ``"attnswap"``. Configs are shared (a model and its heads, two models
built from one config); a module that shares the config but has no router takes the plain SDPA
call, so a model that was not patched computes exactly what it computed. The config is set
back to ``"sdpa"`` when its last patched module is unpatched.

Not reached, and reported as such: models configured for another implementation (``eager``,
flash-attn, flex), modules that look up ``ALL_ATTENTION_FUNCTIONS["sdpa"]`` by name (SAM2,
EdgeTAM), and model files that compare the implementation's name with ``"sdpa"`` (switching the
name would change what they compute).
"""

from __future__ import annotations

import ast
import inspect
import sys
import threading
import types
from typing import Any, Callable

import torch

from ..backends.optional import OptionalPackage
from ..surgery.helpers import routed_function
from ..surgery.reroute import ClassRewrite
from ..surgery.source import NotRewritable
from . import why_unreachable
from .holders import Holders

#: the implementation name attnswap registers (in both the attention and the mask interface)
KEY = "attnswap"
#: the only implementation attnswap switches from, and back to
SDPA = "sdpa"
HOW = "transformers attention interface"

PACKAGE = OptionalPackage(modules=("transformers",), dist="transformers", minimum="5.0", below="6")

_lock = threading.RLock()
_forward: Callable | None = None
#: class -> (whether it dispatches through the interface, why the class cannot be switched), once per class:
#: a model has dozens of instances of one attention class
_class_facts: dict[type, tuple[bool, str | None]] = {}
#: file path -> why that model file cannot take a renamed implementation (None: it can)
_file_problems: dict[str, str | None] = {}


def routed_forward() -> Callable:
    """The library's current ``sdpa`` implementation, its SDPA call routed (made once)."""
    global _forward
    with _lock:
        if _forward is None:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            sdpa = ALL_ATTENTION_FUNCTIONS._global_mapping[SDPA]
            if not isinstance(sdpa, types.FunctionType):
                raise NotRewritable(f"transformers' 'sdpa' implementation is {sdpa!r}, not a Python function")
            params = list(inspect.signature(sdpa).parameters)
            _forward = routed_function(sdpa, params[0])[0]
        return _forward


def ensure_registered() -> None:
    """Register ``"attnswap"`` with transformers: the routed implementation, and ``sdpa``'s masks."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    forward = routed_forward()
    with _lock:
        if ALL_ATTENTION_FUNCTIONS._global_mapping.get(KEY) is not forward:
            AttentionInterface.register(KEY, forward)
        sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[SDPA]
        if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(KEY) is not sdpa_mask:
            AttentionMaskInterface.register(KEY, sdpa_mask)


# -- which modules, and why not --------------------------------------------------------------
def _codes(fn: Any) -> list[types.CodeType]:
    code = getattr(fn, "__code__", None)
    found, stack = [], [code] if code is not None else []
    while stack:
        c = stack.pop()
        found.append(c)
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    return found


def _interface_methods(cls: type) -> list[Callable]:
    """The methods of ``cls`` (its transformers bases included) that dispatch through the interface."""
    found = []
    for klass in cls.__mro__:
        # model files only: PreTrainedModel's own methods name the interface to configure it
        if not klass.__module__.startswith("transformers.models."):
            continue
        for value in vars(klass).values():
            if callable(value) and hasattr(value, "__wrapped__"):  # decorated (output capturing, kwargs checks)
                value = inspect.unwrap(value)
            if any("ALL_ATTENTION_FUNCTIONS" in c.co_names for c in _codes(value)):
                found.append(value)
    return found


def _by_name(methods: list[Callable]) -> str | None:
    """A lookup of one implementation by its name (``ALL_ATTENTION_FUNCTIONS["sdpa"]``), which
    bypasses the config."""
    for fn in methods:
        try:
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return f"the source of {fn.__qualname__} is not available to check how it picks its attention"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "ALL_ATTENTION_FUNCTIONS" and isinstance(node.slice, ast.Constant)
            ):
                return (
                    f"{fn.__qualname__} looks up ALL_ATTENTION_FUNCTIONS[{node.slice.value!r}] by name, bypassing the "
                    "config, so no registered implementation reaches it"
                )
    return None


def _names_sdpa(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == SDPA
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_sdpa(e) for e in node.elts)
    return False


def file_problem(source: str, filename: str) -> str | None:
    """Why a model file would compute something else once its config names ``"attnswap"``
    instead of ``"sdpa"``: it compares ``_attn_implementation`` with ``"sdpa"``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return f"{filename} could not be parsed"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if any(isinstance(s, ast.Attribute) and s.attr == "_attn_implementation" for s in sides) and any(
            _names_sdpa(s) for s in sides
        ):
            return (
                f"{filename}:{node.lineno} compares config._attn_implementation with 'sdpa'; under another "
                "implementation's name that code would compute differently"
            )
    return None


def _module_file_problem(cls: type) -> str | None:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return f"the source of {cls.__module__} is not available to check it"
    with _lock:
        if path not in _file_problems:
            try:
                source = inspect.getsource(module)
            except (OSError, TypeError):
                _file_problems[path] = f"the source of {cls.__module__} is not available to check it"
            else:
                _file_problems[path] = file_problem(source, f"{cls.__module__.rsplit('.', 1)[-1]}.py")
        return _file_problems[path]


def site_for(module: torch.nn.Module, cls: type) -> ClassRewrite | None:
    """How ``module`` is reached through the attention interface, or None when it does not use it."""
    from transformers import PreTrainedModel

    with _lock:
        if cls not in _class_facts:
            methods = [] if issubclass(cls, PreTrainedModel) else _interface_methods(cls)
            _class_facts[cls] = (bool(methods), (_by_name(methods) or _module_file_problem(cls)) if methods else None)
        uses_interface, class_problem = _class_facts[cls]
    if not uses_interface:
        return None  # computes attention in its own code, if at all: the generic surgery's case
    problem = why_unreachable(PACKAGE, routed_forward, "transformers")
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if problem is None and not hasattr(config, "_attn_implementation_internal"):
        problem = "it has no transformers config to select its attention implementation by"
    if problem is None and impl not in (SDPA, KEY):
        problem = (
            f"its config selects attn_implementation={impl!r}; attnswap reaches transformers models that use 'sdpa' "
            "(their default): build or load the model with attn_implementation='sdpa'"
        )
    problem = problem or class_problem
    return ClassRewrite(cls, calls=1, problem=problem, integration=__name__.rsplit(".", 1)[-1], integration_how=HOW)


# -- switching configs --------------------------------------------------------------------------
def _switch_back(config: Any) -> None:
    if config._attn_implementation_internal == KEY:
        config._attn_implementation_internal = SDPA


#: the configs switched to KEY, and the patched modules that read each
_switched = Holders(_switch_back)


def attach(module: torch.nn.Module) -> None:
    ensure_registered()
    _switched.hold(module.config, module)
    module.config._attn_implementation_internal = KEY


def detach(module: torch.nn.Module) -> None:
    if not _switched.release(module.config, module):
        _switch_back(module.config)  # a copied or unpickled model's own config
