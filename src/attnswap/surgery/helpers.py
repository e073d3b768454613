"""Attention written in module-level helper functions, followed from the module that calls them.

torchvision's Swin computes its attention in ``shifted_window_attention(x, qkv_weight, ...)``,
which ``ShiftedWindowAttention.forward`` calls with its weights: the function knows no module,
so it has no router. A method that calls such a helper (statically resolvable: a global, closure
or import bound to a plain Python function outside torch, whose code, or that of a helper it
calls in turn, computes attention) calls a rewritten **copy** instead, with the module passed as
the keyword ``_attnswap_module``. The copy is rewritten like a method whose instance is that
argument: its SDPA calls go to the module's router, its hand-written ``q @ kᵀ`` products are
deferred (:mod:`.manual`), its own helper calls are followed (up to :data:`MAX_DEPTH`). The
original function, its global name and its other callers are untouched; unpatching restores
the method, so nothing of the copy is reached any more.

``torch.fx``: torchvision marks such helpers ``torch.fx.wrap`` leaves, so feature extraction
records them as one node instead of tracing their Python control flow. The copy keeps that:
while fx traces, it records itself as one ``call_function`` node whose ``_attnswap_module``
argument is a ``get_attr`` of the calling module, so the traced graph still routes.
"""

from __future__ import annotations

import ast
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import AttnSwapError
from . import manual
from .source import NotRewritable, compile_like, local_names, parse_method, resolve

#: the keyword a helper copy receives the calling module by
MODULE_ARG = "_attnswap_module"
#: how many calls deep helpers are followed
MAX_DEPTH = 4

_SDPA_NAME = "scaled_dot_product_attention"


@dataclass(frozen=True)
class HelperCopy:
    """A helper rewritten to reach its caller's router, and what it routes."""

    call: Callable
    calls: int
    products: int
    structures: tuple[str, ...]
    #: qualified names of the helpers followed (this one first)
    names: tuple[str, ...]


_copies: dict[Callable, HelperCopy | str | None] = {}
_lock = threading.RLock()


def _is_candidate(target: Any) -> bool:
    if not isinstance(target, types.FunctionType):
        return False
    module = getattr(target, "__module__", "") or ""
    return not (module == "torch" or module.startswith(("torch.", "attnswap.")))


def _mentions_attention(code: types.CodeType) -> bool:
    if _SDPA_NAME in code.co_names or any("softmax" in n.lower() for n in code.co_names):
        return True
    return any(isinstance(c, types.CodeType) and _mentions_attention(c) for c in code.co_consts)


def _callees(fn: types.FunctionType) -> list[types.FunctionType]:
    """Plain functions ``fn`` names as globals or closure variables (a cheap pre-check)."""
    found = []
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    for name in fn.__code__.co_names + fn.__code__.co_freevars:
        try:
            target = cells[name].cell_contents if name in cells else fn.__globals__.get(name)
        except ValueError:  # an empty cell (a closure variable not assigned yet)
            continue
        if _is_candidate(target):
            found.append(target)
    return found


def calls_helpers(fn: types.FunctionType, depth: int = 0, seen: frozenset = frozenset()) -> bool:
    """Whether ``fn`` names a helper that computes attention (itself or further down)."""
    if depth >= MAX_DEPTH:
        return False
    for target in _callees(fn):
        if target in seen:
            continue
        if _mentions_attention(target.__code__) or calls_helpers(target, depth + 1, seen | {fn}):
            return True
    return False


def helper_copy(fn: types.FunctionType, depth: int = 0) -> HelperCopy | str | None:
    """The copy of helper ``fn`` that reaches the router of the module it is given; why it
    cannot be made (a string); or None when ``fn`` computes no attention. Made once per helper."""
    with _lock:
        if fn in _copies:
            return _copies[fn]
        _copies[fn] = None  # a recursive helper stops here
        try:
            made = _make_copy(fn, depth)
        except NotRewritable as exc:
            made = f"{fn.__qualname__}: {exc}"
        _copies[fn] = made
        return made


def follow_calls(fn: Callable, funcdef: ast.FunctionDef, self_arg: str, depth: int = 0) -> tuple[dict[str, Any], list[HelperCopy], list[str]]:
    """Rewrites ``funcdef`` in place: each call of a helper that computes attention calls its
    copy with ``self_arg`` as the module. Returns the closure cells the rewritten code needs, the
    copies it calls, and why any helper met could not be followed."""
    cells: dict[str, Any] = {}
    used: list[HelperCopy] = []
    problems: list[str] = []
    names = local_names(funcdef)
    for node in ast.walk(funcdef):
        if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)):
            continue
        if any(k.arg == MODULE_ARG for k in node.keywords):
            continue
        target = resolve(node.func, fn, names)
        if not _is_candidate(target) or target is fn:
            continue
        if not (_mentions_attention(target.__code__) or calls_helpers(target, depth + 1)):
            continue
        copy = helper_copy(target, depth + 1)
        if copy is None:
            continue
        if isinstance(copy, str):
            problems.append(copy)
            continue
        cell = f"__attnswap_helper_{len(cells)}__"
        cells[cell] = copy.call
        used.append(copy)
        node.func = ast.copy_location(ast.Name(id=cell, ctx=ast.Load()), node.func)
        node.keywords.append(ast.keyword(arg=MODULE_ARG, value=ast.Name(id=self_arg, ctx=ast.Load())))
    return cells, used, problems


def _make_copy(fn: types.FunctionType, depth: int) -> HelperCopy | str | None:
    from . import reroute  # reroute follows helpers, helpers reroute their SDPA calls

    if depth > MAX_DEPTH:
        return None
    funcdef = parse_method(fn, is_method=False)
    funcdef.args.kwonlyargs.append(ast.arg(arg=MODULE_ARG))
    funcdef.args.kw_defaults.append(None)  # required: only rewritten callers call a copy
    cells, nested, problems = follow_calls(fn, funcdef, MODULE_ARG, depth)
    if problems:
        return problems[0]
    sdpa = reroute._Rewriter(fn, MODULE_ARG, local_names(funcdef))
    funcdef = sdpa.visit(funcdef)
    if sdpa.stray:
        return f"{fn.__qualname__} uses {sdpa.stray[0]} other than by calling it"
    chains: dict[str, Any] = {}
    products = manual.defer_products(fn, funcdef, MODULE_ARG, settle_returns=True, cells=chains)
    if isinstance(products, str):
        return f"{fn.__qualname__}: {products}"
    products = products or 0
    if not (sdpa.calls or products or nested):
        return None
    cells.update({reroute.UNROUTED_NAME: reroute.UNROUTED, **sdpa.builders, **manual.HELPERS, **chains})
    copy = compile_like(fn, funcdef, cells)
    structures = list(sdpa.structures)
    for inner in nested:
        structures.extend(k for k in inner.structures if k not in structures)
    return HelperCopy(
        call=_fx_leaf(copy),
        calls=sdpa.calls + sum(h.calls for h in nested),
        products=products + sum(h.products for h in nested),
        structures=tuple(structures),
        names=(f"{fn.__module__}.{fn.__qualname__}", *(n for h in nested for n in h.names)),
    )


def routed_function(fn: types.FunctionType, module_param: str) -> tuple[Callable, int]:
    """A copy of ``fn`` whose SDPA calls go to the router of the module it receives as
    ``module_param`` (plain SDPA when that module has none), and how many calls it routes.

    For functions a library calls with the module as an argument (transformers' attention
    implementations take ``module`` first). The original function is untouched."""
    from . import reroute

    funcdef = parse_method(fn, is_method=False)
    sdpa = reroute._Rewriter(fn, module_param, local_names(funcdef))
    funcdef = sdpa.visit(funcdef)
    if sdpa.stray:
        raise NotRewritable(f"{fn.__qualname__} uses {sdpa.stray[0]} other than by calling it")
    if not sdpa.calls:
        raise NotRewritable(f"{fn.__qualname__} calls no scaled_dot_product_attention")
    return compile_like(fn, funcdef, {reroute.UNROUTED_NAME: reroute.UNROUTED, **sdpa.builders}), sdpa.calls


def _fx_leaf(copy: Callable) -> Callable:
    """``copy``, recorded as one graph node while torch.fx traces (see the module docstring)."""
    proxy = torch.fx.Proxy

    def call(*args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, proxy):
                return _trace_fx(copy, a.tracer, args, kwargs)
        return copy(*args, **kwargs)

    call.__wrapped__ = copy  # type: ignore[attr-defined]
    call.__qualname__ = copy.__qualname__
    call.__name__ = copy.__name__
    call.__module__ = copy.__module__
    return call


def _trace_fx(copy: Callable, tracer: Any, args: tuple, kwargs: dict) -> Any:
    module = kwargs.pop(MODULE_ARG)
    root = getattr(tracer, "root", None)
    path = None
    if isinstance(root, torch.nn.Module):
        path = next((name for name, m in root.named_modules(remove_duplicate=False) if m is module and name), None)
    if path is None:
        raise AttnSwapError(
            f"torch.fx is tracing {copy.__qualname__} called by a patched module that is not a submodule of the "
            "traced model; trace the model that contains it, or unpatch before tracing"
        )
    kwargs[MODULE_ARG] = tracer.create_proxy("get_attr", path, (), {})
    return tracer.create_proxy("call_function", copy, args, kwargs)
