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

Models configured for ``eager`` (the library's choice where a model cannot take SDPA: soft-capped
logits in Gemma 2, attention sinks in gpt-oss, or never declared) are switched to a second key,
``"attnswap_eager"``, registered with ``eager``'s mask function, so every module gets the additive
float mask it got before. Its implementation calls the model file's own eager function (the
default the module passes to ``get_interface``) in a copy whose ``q @ kᵀ`` product is deferred by
the generic surgery (:mod:`..surgery.manual`): the scaling, the additive mask and ``position_bias``,
the softmax, dropout and ``@ v`` become one router call. What one SDPA call cannot express
(``tanh`` soft-capping, sink logits concatenated to the scores) makes that call's scores be
computed by the function's own code, counted with the reason. Attention weights are returned as
``None``, as ``sdpa`` returns them; a call whose weights are being captured
(``output_attentions``) runs the original function and is counted.

Not reached, and reported as such: models configured for other implementations (flash-attn,
flex), modules that look up ``ALL_ATTENTION_FUNCTIONS["sdpa"]`` by name (SAM2, EdgeTAM), and model
files that compare the implementation's name with the one switched from (switching the name
would change what they compute).
"""

from __future__ import annotations

import ast
import inspect
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..backends.optional import OptionalPackage
from ..errors import AttnSwapError
from ..routing import ROUTER_ATTR
from ..surgery import manual
from ..surgery.helpers import routed_function
from ..surgery.reroute import ClassRewrite
from ..surgery.scores import Lazy
from ..surgery.source import WRAPPING_DECORATORS, NotRewritable, compile_like, local_names, parse_method, resolve
from . import why_unreachable
from .holders import Holders

# wraps with functools.wraps, renames a keyword (`past_key_values` -> `cache`), registers nothing:
# the hand-written attention methods it decorates (BigBird, XLM, MPT, RoFormer, ...) are rewritten
# underneath it and decorated again
WRAPPING_DECORATORS.add("transformers.utils.deprecation.deprecate_kwarg")
# fill arguments from the config (use_cache, is_causal, return_dict) or collect hooked outputs around the call
WRAPPING_DECORATORS.update({
    "transformers.utils.generic.merge_with_config_defaults",
    "transformers.utils.generic.can_return_tuple",
    "transformers.utils.output_capturing.capture_outputs",
})

#: the implementation name attnswap registers for models configured for ``sdpa`` (in both interfaces)
KEY = "attnswap"
#: ... and for models configured for ``eager``
EAGER_KEY = "attnswap_eager"
SDPA = "sdpa"
EAGER = "eager"
#: the implementations attnswap switches from, the key each is switched to, and back
SWITCHED: dict[str, str] = {SDPA: KEY, EAGER: EAGER_KEY}
_SWITCHED_BACK: dict[str, str] = {key: name for name, key in SWITCHED.items()}
HOW = "transformers attention interface"

PACKAGE = OptionalPackage(modules=("transformers",), dist="transformers", minimum="5.0", below="6")

#: why a call ran the model file's own eager function although its module has a router
WEIGHTS_WANTED = "its attention weights were being captured (output_attentions): the model's own eager function ran"
UNKNOWN_CAPTURE = (
    "this transformers version does not show whether attention weights are being captured: the model's own eager "
    "function ran"
)

_lock = threading.RLock()
_forward: Callable | None = None


@dataclass(frozen=True)
class _ClassFacts:
    """What a module class's methods say, worked out once per class (a model has dozens of instances)."""

    #: whether it dispatches through the interface at all
    uses_interface: bool
    #: why it cannot be switched from ``sdpa`` (None: it can)
    sdpa_problem: str | None = None
    #: the model file's eager function it passes to ``get_interface`` as the default, or None
    eager: Callable | None = None
    #: that function with its ``q @ kᵀ`` product deferred to the module's router
    eager_routed: Callable | None = None
    #: why it cannot be switched from ``eager`` (None: it can)
    eager_problem: str | None = None


_class_facts: dict[type, _ClassFacts] = {}
#: (file path, implementation name) -> why that model file cannot take a renamed implementation (None: it can)
_file_problems: dict[tuple[str, str], str | None] = {}


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
    """Register ``"attnswap"`` (the routed ``sdpa``, with ``sdpa``'s masks) and ``"attnswap_eager"``
    (:func:`eager_forward`, with ``eager``'s masks) with transformers."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    forward = routed_forward()
    with _lock:
        for key, function in ((KEY, forward), (EAGER_KEY, eager_forward)):
            if ALL_ATTENTION_FUNCTIONS._global_mapping.get(key) is not function:
                AttentionInterface.register(key, function)
        for key, name in ((KEY, SDPA), (EAGER_KEY, EAGER)):
            mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[name]
            if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(key) is not mask:
                AttentionMaskInterface.register(key, mask)


def _captured() -> bool:
    """Whether the running model may be capturing attention weights (``output_attentions``)."""
    return _weights_wanted({}) is not None


# hand-written attention modules return their probabilities, and their callers use them only when
# ``output_attentions`` is set (the argument, or the model's capture): otherwise None, as ``sdpa`` returns
manual.RETURNED_WEIGHTS["transformers"] = ("output_attentions", _captured)


# -- models configured for eager -----------------------------------------------------------------
def _weights_wanted(kwargs: dict[str, Any]) -> str | None:
    """Why the caller may use the attention weights (so they must be computed), or None."""
    if kwargs.get("output_attentions"):
        return WEIGHTS_WANTED
    try:
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get() or {}  # what the running model's capture_outputs collects
    except (ImportError, AttributeError, TypeError):
        return UNKNOWN_CAPTURE
    return WEIGHTS_WANTED if any(name.endswith("attentions") for name in collected) else None


def eager_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The implementation registered as ``"attnswap_eager"``: the model file's own eager function,
    its scores deferred to ``module``'s router (see the module docstring)."""
    facts = _class_facts.get(type(module)) or _facts(type(module))
    if facts.eager is None:
        raise AttnSwapError(
            f"{type(module).__qualname__} shares a config that attnswap switched to {EAGER_KEY!r}, and attnswap could "
            f"not find the eager function it would run ({facts.eager_problem}); unpatch the model, or patch it with "
            f"exclude= for the modules of that class's model"
        )
    router = module.__dict__.get(ROUTER_ATTR)
    if router is None or facts.eager_routed is None:
        return facts.eager(module, *args, **kwargs)
    why = _weights_wanted(kwargs)
    if why is not None:
        router.note_settled(why)
        return facts.eager(module, *args, **kwargs)
    result = facts.eager_routed(module, *args, **kwargs)
    if type(result) is tuple:
        # the deferred probabilities nobody asked for are dropped, as ``sdpa`` returns None
        return tuple(None if isinstance(v, Lazy) else v for v in result)
    return result


def _eager_default(methods: list[Callable]) -> tuple[Callable | None, str | None]:
    """The function ``methods`` pass to ``ALL_ATTENTION_FUNCTIONS.get_interface(name, default)``."""
    found: list[Callable] = []
    for fn in methods:
        try:
            funcdef = parse_method(fn, is_method=True)
        except NotRewritable as exc:
            return None, f"{fn.__qualname__}: {exc}"
        names = local_names(funcdef)
        for node in ast.walk(funcdef):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_interface"
                and len(node.args) >= 2
            ):
                target = resolve(node.args[1], fn, names)
                if not isinstance(target, types.FunctionType):
                    return None, f"{fn.__qualname__} passes get_interface a default attnswap cannot resolve"
                if target not in found:
                    found.append(target)
    if len(found) != 1:
        return None, (
            "its methods pass no eager function to ALL_ATTENTION_FUNCTIONS.get_interface" if not found
            else f"its methods pass {len(found)} different eager functions to get_interface"
        )
    return found[0], None


def _routed_eager(fn: Callable) -> tuple[Callable | None, str | None]:
    """``fn`` (``eager_attention_forward(module, query, key, ...)``) with its scores product
    deferred to the router of the module it is given, or why it cannot be."""
    try:
        funcdef = parse_method(fn, is_method=False)
    except NotRewritable as exc:
        return None, f"{fn.__qualname__}: {exc}"
    params = funcdef.args.posonlyargs + funcdef.args.args
    if not params:
        return None, f"{fn.__qualname__} takes no module argument"
    cells = dict(manual.HELPERS)
    found = manual.defer_products(fn, funcdef, params[0].arg, settle_returns=False, cells=cells)
    if found is None:
        return None, f"{fn.__qualname__} computes no softmax(q @ kᵀ) attention that attnswap can follow"
    if isinstance(found, str):
        return None, f"{fn.__qualname__}: {found}"
    return compile_like(fn, funcdef, cells), None


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


def _flash_only(test: ast.expr) -> bool:
    """Whether an ``if`` test holds only when flash-attn is the configured implementation
    (``is_flash_attention_requested(config) and ...``): never under ``sdpa``, ``eager`` or attnswap's keys."""
    first = test.values[0] if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else test
    return (
        isinstance(first, ast.Call) and isinstance(first.func, (ast.Name, ast.Attribute))
        and (first.func.id if isinstance(first.func, ast.Name) else first.func.attr) == "is_flash_attention_requested"
    )


def _reachable(tree: ast.AST):
    """The nodes of ``tree`` outside branches taken only under flash-attn (SAM2's fallback to
    ``ALL_ATTENTION_FUNCTIONS["sdpa"]`` for calls flash-attn cannot take)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _flash_only(node.test):
            stack.extend([node.test, *node.orelse])
        else:
            stack.extend(ast.iter_child_nodes(node))


def _by_name(methods: list[Callable]) -> str | None:
    """A lookup of one implementation by its name (``ALL_ATTENTION_FUNCTIONS["sdpa"]``), which
    bypasses the config, where it can run under the names attnswap switches between."""
    for fn in methods:
        try:
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return f"the source of {fn.__qualname__} is not available to check how it picks its attention"
        for node in _reachable(tree):
            if (
                isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "ALL_ATTENTION_FUNCTIONS" and isinstance(node.slice, ast.Constant)
            ):
                return (
                    f"{fn.__qualname__} looks up ALL_ATTENTION_FUNCTIONS[{node.slice.value!r}] by name, bypassing the "
                    "config, so no registered implementation reaches it"
                )
    return None


def _names(node: ast.expr, name: str) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == name
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names(e, name) for e in node.elts)
    return False


def file_problem(source: str, filename: str, name: str = SDPA) -> str | None:
    """Why a model file would compute something else once its config names attnswap's key instead
    of ``name``: it compares ``_attn_implementation`` with ``name``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return f"{filename} could not be parsed"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if any(isinstance(s, ast.Attribute) and s.attr == "_attn_implementation" for s in sides) and any(
            _names(s, name) for s in sides
        ):
            return (
                f"{filename}:{node.lineno} compares config._attn_implementation with {name!r}; under another "
                "implementation's name that code would compute differently"
            )
    return None


def _module_file_problem(cls: type, name: str) -> str | None:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return f"the source of {cls.__module__} is not available to check it"
    with _lock:
        if (path, name) not in _file_problems:
            try:
                source = inspect.getsource(module)
            except (OSError, TypeError):
                _file_problems[path, name] = f"the source of {cls.__module__} is not available to check it"
            else:
                _file_problems[path, name] = file_problem(source, f"{cls.__module__.rsplit('.', 1)[-1]}.py", name)
        return _file_problems[path, name]


def _facts(cls: type) -> _ClassFacts:
    from transformers import PreTrainedModel

    with _lock:
        if cls in _class_facts:
            return _class_facts[cls]
        methods = [] if issubclass(cls, PreTrainedModel) else _interface_methods(cls)
        if not methods:
            facts = _ClassFacts(uses_interface=False)
        else:
            by_name = _by_name(methods)
            eager, eager_problem = _eager_default(methods)
            eager_routed = None
            if eager is not None:
                eager_routed, eager_problem = _routed_eager(eager)
            facts = _ClassFacts(
                uses_interface=True,
                sdpa_problem=by_name or _module_file_problem(cls, SDPA),
                eager=eager,
                eager_routed=eager_routed,
                eager_problem=by_name or eager_problem or _module_file_problem(cls, EAGER),
            )
        _class_facts[cls] = facts
        return facts


def site_for(module: torch.nn.Module, cls: type) -> ClassRewrite | None:
    """How ``module`` is reached through the attention interface, or None when it does not use it."""
    facts = _facts(cls)
    if not facts.uses_interface:
        return None  # computes attention in its own code, if at all: the generic surgery's case
    problem = why_unreachable(PACKAGE, routed_forward, "transformers")
    config = getattr(module, "config", None)
    impl = _SWITCHED_BACK.get(getattr(config, "_attn_implementation", None), getattr(config, "_attn_implementation", None))
    if problem is None and not hasattr(config, "_attn_implementation_internal"):
        problem = "it has no transformers config to select its attention implementation by"
    if problem is None and impl not in SWITCHED:
        problem = (
            f"its config selects attn_implementation={impl!r}; attnswap reaches transformers models that use 'sdpa' "
            "or 'eager': build or load the model with one of them"
        )
    if problem is None:
        problem = facts.sdpa_problem if impl == SDPA else facts.eager_problem
    eager = impl == EAGER
    return ClassRewrite(
        cls, calls=0 if eager else 1, products=1 if eager else 0, problem=problem,
        integration=__name__.rsplit(".", 1)[-1], integration_how=f"{HOW} (its eager function, scores deferred)" if eager else HOW,
    )


# -- switching configs --------------------------------------------------------------------------
def _switch_back(config: Any) -> None:
    name = _SWITCHED_BACK.get(config._attn_implementation_internal)
    if name is not None:
        config._attn_implementation_internal = name


#: the configs switched to a key, and the patched modules that read each
_switched = Holders(_switch_back)


def attach(module: torch.nn.Module) -> None:
    ensure_registered()
    config = module.config
    _switched.hold(config, module)
    impl = config._attn_implementation_internal
    config._attn_implementation_internal = SWITCHED.get(impl, impl)


def detach(module: torch.nn.Module) -> None:
    if not _switched.release(module.config, module):
        _switch_back(module.config)  # a copied or unpickled model's own config
