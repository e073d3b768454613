"""Bias builders that patching swaps for structured ones.

A library's module (here :mod:`.timm`) registers, for a function it knows that builds an
attention bias, a structured replacement with the same signature that returns a
:class:`~.base.StructuredMask` instead of the tensor. The SDPA rewrite (``surgery.reroute``)
calls the replacement where a rerouted method called the builder; nothing else changes.

A replacement is only used for the exact code it was written against: the registration
carries a fingerprint of the builder's code (its AST without the docstring), and a builder
whose code differs (another version of the library) keeps being called as it is, with the
reason recorded in :data:`skipped`. While ``torch.compile``/``torch.fx`` trace, or on tensor
subclasses, a replacement calls the original builder.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import textwrap
import threading
from dataclasses import dataclass
from typing import Any, Callable

#: top-level package of a library -> the attnswap module that registers its builders (imported
#: only when a rewritten method calls a function of that library), and the builders' names (so
#: methods that call one are found without importing anything)
LIBRARY_ROOMS: dict[str, tuple[str, frozenset[str]]] = {
    "timm": ("attnswap.structure.timm", frozenset({"get_decomposed_rel_pos_bias", "create_attention_mask"})),
}


def builder_names() -> frozenset[str]:
    """The plain names of every builder a library room may register (what a method's code must mention)."""
    return frozenset().union(*(names for _, names in LIBRARY_ROOMS.values()))


@dataclass(frozen=True)
class Builder:
    """One registered builder: what it replaces and how."""

    #: the original's ``module.qualname``
    target: str
    #: :func:`fingerprint` of the original code the replacement was written against
    fingerprint: str
    #: the structure kind the replacement returns
    kind: str
    #: ``make(original)`` -> the replacement (same signature)
    make: Callable[[Callable], Callable]


_builders: dict[str, Builder] = {}
#: (class target, method name) -> Builder for methods that build a bias
_method_builders: dict[tuple[str, str], Builder] = {}
#: (class target, method name) -> Builder for methods that build a bias inline (wrapped)
_method_wrappers: dict[tuple[str, str], Builder] = {}
#: target -> Builder for functions that add a bias to hand-written scores
_additive_builders: dict[str, Builder] = {}
#: (what, function) -> its replacement (None: not replaced), made once per function
_replacements: dict[tuple[str, Callable], Any] = {}
_loaded: set[str] = set()
_lock = threading.RLock()
#: builders found with code that differs from the registered fingerprint: target -> reason
skipped: dict[str, str] = {}


def register_builder(target: str, fingerprint: str, kind: str, make: Callable[[Callable], Callable]) -> None:
    """Swap calls to the function named ``target`` (``module.qualname``), when its code has this
    ``fingerprint``, for ``make(original)``, which returns ``kind`` structures."""
    with _lock:
        _builders[target] = Builder(target, fingerprint, kind, make)
        _replacements.clear()


def register_method_builder(cls_target: str, method: str, fingerprint: str, kind: str, make: Callable[[Callable], Callable]) -> None:
    """Give patched instances of the class named ``cls_target`` (``module.qualname``) a
    ``method`` that returns ``kind`` structures: ``make(original_method)``, used only while the
    class's own ``method`` has this ``fingerprint``."""
    with _lock:
        _method_builders[(cls_target, method)] = Builder(f"{cls_target}.{method}", fingerprint, kind, make)


def register_method_wrapper(cls_target: str, method: str, fingerprint: str, kind: str, make: Callable[[Callable], Callable]) -> None:
    """For a bias a method builds inline, around its SDPA call (Swin's shift mask, expanded to
    every image): patched instances of ``cls_target`` get ``make(rerouted_method)``, which
    computes what the method computes with the bias as a ``kind`` structure and calls the
    rerouted method for everything else. Used only while the class's own ``method`` has this
    ``fingerprint``."""
    with _lock:
        _method_wrappers[(cls_target, method)] = Builder(f"{cls_target}.{method}", fingerprint, kind, make)


def register_additive_builder(target: str, fingerprint: str, kind: str, make: Callable[[Callable], Callable]) -> None:
    """For a function hand-written attention calls as ``scores = fn(scores, ...)`` to add a bias
    (MViTv2's ``cal_rel_pos_type``, written into a slice of the scores in place): ``make(fn)``
    returns ``bias_of(scores, ...)``, the ``kind`` structure of the term ``fn`` adds (or None to
    let ``fn`` run), used only while ``fn`` has this ``fingerprint``."""
    with _lock:
        _additive_builders[target] = Builder(target, fingerprint, kind, make)
        _replacements.clear()


def additive_bias_for(fn: Callable) -> Callable | None:
    """The ``bias_of`` registered for the additive function ``fn`` (see
    :func:`register_additive_builder`), or None. Asked at every call of ``fn``: the answer is
    cached per function (without the lock) once known."""
    key = ("additive", fn)
    if key in _replacements:
        return _replacements[key]
    target = _target(fn)
    with _lock:
        _load_room(getattr(fn, "__module__", "") or "")
        builder = None if target is None else _additive_builders.get(target)
        if builder is None:
            _replacements[key] = None
            return None
        return _made(key, builder, lambda: builder.make(fn))


def method_replacements_for(cls: type) -> dict[str, tuple[Callable, str]]:
    """Methods of ``cls`` (or the classes it inherits them from) to replace with structured
    builders: name -> (replacement, kind)."""
    out = {}
    for name, fn, builder in _known_methods(cls, _method_builders):
        made = _made(("method", fn), builder, lambda: functools.wraps(fn)(builder.make(fn)))
        if made is not None:
            out[name] = (made, builder.kind)
    return out


def method_wrappers_for(cls: type) -> dict[str, tuple[Callable[[Callable], Callable], str]]:
    """Methods of ``cls`` to wrap once rerouted (see :func:`register_method_wrapper`): name ->
    (``make(rerouted)``, kind)."""
    out = {}
    for name, fn, builder in _known_methods(cls, _method_wrappers):
        if _made(("wrapper", fn), builder, lambda: builder.make) is not None:
            out[name] = (builder.make, builder.kind)
    return out


def _known_methods(cls: type, registry: dict[tuple[str, str], Builder]) -> list[tuple[str, Callable, Builder]]:
    """(name, function, builder) for each method of ``cls`` registered in ``registry``, as the
    class resolves it (one overridden below the registered class is not the code it knows)."""
    found: dict[str, tuple[str, Callable, Builder]] = {}
    with _lock:
        _load_room(getattr(cls, "__module__", "") or "")
        for klass in cls.__mro__:
            _load_room(getattr(klass, "__module__", "") or "")
            target = _target(klass)
            for (cls_target, method), builder in registry.items():
                if cls_target != target or method not in vars(klass) or method in found:
                    continue
                fn = vars(klass)[method]
                if getattr(cls, method, None) is fn:
                    found[method] = (method, fn, builder)
    return list(found.values())


def _made(key: Any, builder: Builder, make: Callable[[], Any]) -> Any:
    """``make()`` when ``key``'s function has the fingerprint ``builder`` was written for (else
    None, with the reason in :data:`skipped`); cached per function."""
    with _lock:
        if key not in _replacements:
            made = None
            actual = fingerprint(key[1])
            if actual == builder.fingerprint:
                made = make()
            else:
                skipped[builder.target] = (
                    f"{builder.target} differs from the code attnswap's structured form was written for "
                    f"(fingerprint {actual}, known {builder.fingerprint}): its bias is built as a tensor"
                )
            _replacements[key] = made
        return _replacements[key]


def fingerprint(fn: Callable) -> str | None:
    """A digest of ``fn``'s code that ignores its docstring, comments and formatting (None when
    its source cannot be read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        node.body = body[1:]  # the docstring
    return hashlib.sha256(ast.dump(node, include_attributes=False).encode()).hexdigest()[:16]


def _target(fn: Any) -> str | None:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    return f"{module}.{qualname}"


def _load_room(module: str) -> None:
    entry = LIBRARY_ROOMS.get(module.split(".", 1)[0])
    room = None if entry is None else entry[0]
    if room is not None and room not in _loaded:
        _loaded.add(room)
        importlib.import_module(room)


def replacement_for(fn: Any) -> tuple[Callable, str] | None:
    """The structured replacement for the function ``fn`` and its kind, or None."""
    if not inspect.isfunction(fn):
        return None
    target = _target(fn)
    if target is None:
        return None
    with _lock:
        _load_room(fn.__module__)
        builder = _builders.get(target)
        if builder is None:
            return None
        made = _made(("function", fn), builder, lambda: functools.wraps(fn)(builder.make(fn)))
        return None if made is None else (made, builder.kind)
