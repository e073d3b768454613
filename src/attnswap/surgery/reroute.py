"""SDPA sites: re-point a class's own ``scaled_dot_product_attention`` calls to its router.

For a module class whose methods call SDPA (under any spelling: ``F.``,
``torch.nn.functional.``, ``nn.functional.``, an imported or aliased name), each such method
is recompiled from its own source with every SDPA call ``f(q, k, v, ...)`` replaced by
``self.__dict__.get("_attnswap_router", UNROUTED).route(q, k, v, ...)``: same arguments, same
globals, same closure, same line numbers. (The default is plain SDPA, for a call still in
flight when another thread unpatches the module.) Everything else the module computes (projections, norms, rope, its bias)
stays the module's own code reading its own live attributes.

The rewritten methods live on a generated subclass, made once per class and swapped into
patched instances (``parametrize``-style), so unpatching is just restoring ``__class__``.
"""

from __future__ import annotations

import ast
import functools
import threading
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import NotScriptable
from ..routing import ROUTE_METHOD, ROUTER_ATTR, UNROUTED
from ..structure import replacement_for
from ..structure.builders import builder_names, method_replacements_for, method_wrappers_for
from . import helpers, manual, mha
from .source import NotRewritable, compile_like, local_names, parse_method, resolve, rewrapper, self_name

#: the closure name rerouted code reaches UNROUTED by
UNROUTED_NAME = "__attnswap_unrouted__"

SDPA = F.scaled_dot_product_attention
_SDPA_NAME = "scaled_dot_product_attention"


@dataclass(frozen=True)
class ClassRewrite:
    """What patching does to instances of one module class."""

    cls: type
    methods: dict[str, Callable] = field(default_factory=dict)
    calls: int = 0
    #: flags such as timm's ``fused_attn`` that must be True for the SDPA path to run
    gate_flags: tuple[str, ...] = ()
    #: why the class cannot be rerouted (then ``methods`` is empty)
    problem: str | None = None
    #: ``q @ kᵀ`` products of hand-written attention deferred to the router (see :mod:`.manual`)
    products: int = 0
    #: why a softmax attention of the class is deliberately left alone (not an error)
    left_alone: str | None = None
    #: the softmax it computes is not attention over tokens (left alone too)
    not_attention: bool = False
    #: an ``nn.MultiheadAttention`` (its forward replaced by :func:`.mha.forward`)
    mha: bool = False
    #: structure kinds of the bias builders whose calls now return structures (attnswap.structure)
    structures: tuple[str, ...] = ()
    #: module-level helpers the class's methods call and that now reach its router (see :mod:`.helpers`)
    helpers: tuple[str, ...] = ()
    #: reached through a model library's own extension point (a name in :mod:`attnswap.integrations`):
    #: the class is not swapped, the library calls the router
    integration: str | None = None
    #: how an integration reaches the site, for the report
    integration_how: str = ""

    @property
    def how(self) -> str:
        if self.integration is not None:
            return self.integration_how
        if self.mha:
            return "nn.MultiheadAttention"
        parts = []
        if self.calls:
            parts.append("SDPA call")
        if self.products:
            parts.append("hand-written")
        how = " + ".join(parts)
        if self.helpers:
            how += f" in {self.helpers[0].rsplit('.', 1)[-1]}()"
        return how

    @property
    def routable(self) -> bool:
        return self.problem is None and (bool(self.methods) or self.integration is not None)

    @property
    def builds_only(self) -> bool:
        """The class computes no attention, but builds a bias that now travels as structure
        (NaFlexViT's model class builds the padding mask its blocks' attention uses)."""
        return bool(self.structures) and not (self.calls or self.products or self.mha)


class _ClassCache(OrderedDict):
    """Per-class results, least recently used dropped past ``capacity``: classes made at run
    time (a factory per model) must not be kept alive for the life of the process. A dropped
    entry is recomputed when its class is met again."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


#: how many classes each per-class cache keeps (timm has about 1,400 classes in all)
CLASS_CACHE_SIZE = 2048
_cache: _ClassCache = _ClassCache(CLASS_CACHE_SIZE)
_library_classes: _ClassCache = _ClassCache(CLASS_CACHE_SIZE)
_cache_lock = threading.RLock()
_aliases_cache: dict[int, tuple[dict, frozenset[str]]] = {}


def _is_torch_class(klass: type) -> bool:
    mod = getattr(klass, "__module__", "") or ""
    return klass is object or mod == "torch" or mod.startswith("torch.")


def is_library_class(cls: type) -> bool:
    """A class of PyTorch's own, not a torch-made wrapper around the user's class.

    FSDP2's ``fully_shard`` (and ``replicate``) re-class a module as ``FSDP<cls>``, a class
    defined in a torch module whose bases are a torch mixin and the user's class; the
    attention it computes is still the user's."""
    if not _is_torch_class(cls):
        return False
    with _cache_lock:  # the LRU reorders on every read: reads and writes share the lock
        found = _library_classes.get(cls)
        if found is None:
            found = all(_is_torch_class(k) for k in cls.__mro__)
            _library_classes.put(cls, found)
    return found


def _sdpa_aliases(globals_: dict) -> frozenset[str]:
    """Global names that are bound to SDPA itself (``from ... import scaled_dot_product_attention as attn``)."""
    cached = _aliases_cache.get(id(globals_))
    if cached is not None and cached[0] is globals_:
        return cached[1]
    names = frozenset(k for k, v in list(globals_.items()) if v is SDPA)
    _aliases_cache[id(globals_)] = (globals_, names)
    return names


def _code_mentions(code: types.CodeType, names: frozenset[str]) -> bool:
    if names.intersection(code.co_names):
        return True
    return any(isinstance(c, types.CodeType) and _code_mentions(c, names) for c in code.co_consts)


def _plain_function(attr: Any) -> Callable | None:
    if isinstance(attr, (staticmethod, classmethod)):
        return attr.__func__
    if isinstance(attr, types.FunctionType):
        return attr
    return None


def analyze(cls: type) -> ClassRewrite | None:
    """How to reroute ``cls``, or None when it computes no attention. Cached per class."""
    with _cache_lock:
        if cls in _cache:
            return _cache.get(cls)
        result = _analyze(cls)
        _cache.put(cls, result)
        return result


def _methods(cls: type):
    seen: set[str] = set()
    mro = cls.__mro__
    for i, klass in enumerate(mro):
        if _is_torch_class(klass):
            if not all(_is_torch_class(k) for k in mro[i + 1:]):
                seen.update(vars(klass))  # a torch mixin ahead of the user's class: its methods win
            continue
        for name, attr in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            fn = _plain_function(attr)
            if fn is not None:
                yield name, attr, fn


def _mentions_softmax(code: types.CodeType) -> bool:
    if any("softmax" in n.lower() for n in code.co_names):
        return True
    return any(isinstance(c, types.CodeType) and _mentions_softmax(c) for c in code.co_consts)


def _analyze(cls: type) -> ClassRewrite | None:
    if mha.is_plain_mha(cls):
        return ClassRewrite(cls, methods={"forward": mha.forward}, mha=True)
    known = manual.left_alone(cls)
    if known is not None:
        return ClassRewrite(cls, left_alone=known[0], not_attention=not known[1])
    sdpa_methods: list[tuple[str, Any, Callable]] = []
    softmax_methods: list[tuple[str, Any, Callable]] = []
    #: method name -> how to decorate its rewrite as the class decorates it
    redecorate: dict[str, Callable[[Callable], Callable]] = {}
    #: the class's methods, each under the decorators attnswap can apply again
    own: list[tuple[str, Any, Callable]] = []
    for name, attr, fn in _methods(cls):
        own.append((name, attr, fn))
        inner = fn
        while inner is not None:  # look through decorators that wrap (functools.wraps)
            mentions = frozenset({_SDPA_NAME}) | _sdpa_aliases(inner.__globals__)
            if _code_mentions(inner.__code__, mentions) or _mentions_softmax(inner.__code__):
                if inner is not fn:
                    again = rewrapper(fn, inner)
                    if isinstance(again, str):
                        return ClassRewrite(cls, problem=f"{cls.__qualname__}.{name}: {again}")
                    redecorate[name] = again
                    own[-1] = (name, attr, inner)
                if _code_mentions(inner.__code__, mentions):
                    sdpa_methods.append((name, attr, inner))
                else:
                    softmax_methods.append((name, attr, inner))
                break
            inner = getattr(inner, "__wrapped__", None)
    methods: dict[str, Callable] = {}
    calls = products = 0
    flags: list[str] = []
    structures: list[str] = []
    not_followed: str | None = None
    for name, attr, fn in sdpa_methods:
        try:
            found = _rewrite(fn, is_method=isinstance(attr, types.FunctionType))
        except NotRewritable as exc:
            return ClassRewrite(cls, problem=f"{cls.__qualname__}.{name}: {exc}")
        if found is None:
            softmax_methods.append((name, attr, fn))  # mentions the name, but it is not SDPA
            continue
        new_fn, n_calls, gates, kinds = found
        methods[name] = new_fn
        calls += n_calls
        flags.extend(g for g in gates if g not in flags)
        structures.extend(k for k in kinds if k not in structures)
    for name, attr, fn in softmax_methods:
        if not _mentions_softmax(fn.__code__):
            continue
        try:
            found_manual = manual.rewrite_manual(fn, is_method=isinstance(attr, types.FunctionType), name=name)
        except NotRewritable as exc:
            found_manual = str(exc)
        if isinstance(found_manual, str):
            not_followed = not_followed or f"{cls.__qualname__}.{name}: {found_manual}"
        elif found_manual is not None:
            methods[name], n_products = found_manual
            products += n_products
    if products:
        # methods computing with what those return (ConViT: get_attention(x) @ v)
        lazy_methods = frozenset(methods)
        for name, attr, fn in own:
            if name in methods or not lazy_methods.intersection(fn.__code__.co_names):
                continue
            try:
                found_manual = manual.rewrite_manual(
                    fn, is_method=isinstance(attr, types.FunctionType), lazy_methods=lazy_methods, name=name
                )
            except NotRewritable:
                continue  # its products settle the probabilities: computed as written, counted
            if found_manual is not None and not isinstance(found_manual, str):
                methods[name] = found_manual[0]
    followed: list[str] = []
    for name, attr, fn in own:
        # a method that calls a module-level helper computing attention (torchvision's Swin)
        if name in methods or not helpers.calls_helpers(fn):
            continue
        try:
            found_helpers = _follow_helpers(fn, is_method=isinstance(attr, types.FunctionType))
        except NotRewritable as exc:
            not_followed = not_followed or f"{cls.__qualname__}.{name}: {exc}"
            continue
        if isinstance(found_helpers, str):
            not_followed = not_followed or f"{cls.__qualname__}.{name}: {found_helpers}"
            continue
        if found_helpers is not None:
            methods[name], copies = found_helpers
            for copy in copies:
                calls += copy.calls
                products += copy.products
                structures.extend(k for k in copy.structures if k not in structures)
                followed.extend(n for n in copy.names if n not in followed)
    builders = builder_names()
    for name, attr, fn in own:
        if name in methods or not _code_mentions(fn.__code__, builders):
            continue
        try:
            found = _rewrite(fn, is_method=isinstance(attr, types.FunctionType), builders_only=True)
        except NotRewritable:
            continue  # the bias stays a tensor: nothing is lost
        if found is not None:
            methods[name] = found[0]
            structures.extend(k for k in found[3] if k not in structures)
    for name, (replacement, kind) in method_replacements_for(cls).items():
        # a method that builds a bias (BEiT's _get_rel_pos_bias): only where its result reaches a
        # rerouted SDPA call or routed hand-written attention of this class, or the class computes
        # no attention at all
        if name not in methods and (calls or products or not (methods or softmax_methods)):
            methods[name] = replacement
            structures.extend(k for k in (kind,) if k not in structures)
    for name, (wrap, kind) in method_wrappers_for(cls).items():
        # a method that builds its bias inline around its SDPA call (Swin's shift mask): the
        # wrapper makes the bias a structure and calls the rerouted method for anything else
        if name in methods and calls:
            methods[name] = functools.wraps(methods[name])(wrap(methods[name]))
            structures.extend(k for k in (kind,) if k not in structures)
    for name, again in redecorate.items():
        if name in methods:
            methods[name] = again(methods[name])  # outermost, as the class had it
    if not methods:
        return ClassRewrite(cls, left_alone=not_followed) if not_followed else None
    return ClassRewrite(
        cls, methods=methods, calls=calls, gate_flags=tuple(flags), products=products, structures=tuple(structures),
        helpers=tuple(followed),
    )


def _follow_helpers(fn: Callable, *, is_method: bool) -> tuple[Callable, list] | str | None:
    """``fn`` recompiled to call the copies of the attention helpers it calls, and those copies;
    why a helper cannot be followed (a string); or None when none computes attention after all."""
    funcdef = parse_method(fn, is_method=is_method)
    self_arg = self_name(funcdef, is_method=is_method)
    if self_arg is None:
        return "calls an attention helper outside an instance method, so there is no router to pass it"
    cells, copies, problems = helpers.follow_calls(fn, funcdef, self_arg)
    if problems and not copies:
        return problems[0]
    if not copies:
        return None
    return compile_like(fn, funcdef, cells), copies


class _Rewriter(ast.NodeTransformer):
    def __init__(self, fn: Callable, self_name: str | None, local_names: set[str]) -> None:
        self.fn = fn
        self.self_name = self_name
        self.local_names = local_names
        self.calls = 0
        self.gates: list[str] = []
        self.stray: list[str] = []
        self._branch: list[tuple[ast.If, str]] = []
        #: closure name -> structured replacement of a bias builder the method calls
        self.builders: dict[str, Callable] = {}
        #: structure kinds of those builders, in call order
        self.structures: list[str] = []

    def _is_sdpa(self, node: ast.expr) -> bool:
        return isinstance(node, (ast.Name, ast.Attribute)) and resolve(node, self.fn, self.local_names) is SDPA

    def visit_If(self, node: ast.If) -> ast.AST:
        node.test = self.visit(node.test)
        for branch in ("body", "orelse"):
            self._branch.append((node, branch))
            setattr(node, branch, [self.visit(stmt) for stmt in getattr(node, branch)])
            self._branch.pop()
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if not self._is_sdpa(node.func):
            self._swap_builder(node)
            return self.generic_visit(node)
        node.args = [self.visit(a) for a in node.args]
        node.keywords = [self.visit(k) for k in node.keywords]
        if self.self_name is None:
            raise NotRewritable("calls scaled_dot_product_attention outside an instance method, no router to reach")
        self.calls += 1
        self._note_gates()
        # self.__dict__.get(ROUTER_ATTR, UNROUTED), not self.<ROUTER_ATTR>: a call still in flight
        # when another thread unpatches the module finds no router and runs the original call
        instance_dict = ast.Attribute(value=ast.Name(id=self.self_name, ctx=ast.Load()), attr="__dict__", ctx=ast.Load())
        router = ast.Call(
            func=ast.Attribute(value=instance_dict, attr="get", ctx=ast.Load()),
            args=[ast.Constant(ROUTER_ATTR), ast.Name(id=UNROUTED_NAME, ctx=ast.Load())],
            keywords=[],
        )
        node.func = ast.copy_location(ast.Attribute(value=router, attr=ROUTE_METHOD, ctx=ast.Load()), node.func)
        return node

    def _swap_builder(self, node: ast.Call) -> None:
        """A call to a bias builder with a structured form calls that form (see attnswap.structure)."""
        if not isinstance(node.func, (ast.Name, ast.Attribute)):
            return
        found = replacement_for(resolve(node.func, self.fn, self.local_names))
        if found is None:
            return
        replacement, kind = found
        name = f"__attnswap_builder_{len(self.builders)}__"
        self.builders[name] = replacement
        self.structures.append(kind)
        node.func = ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node.func)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and self._is_sdpa(node):
            self.stray.append(node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and self._is_sdpa(node):
            self.stray.append(ast.unparse(node))
            return node
        return self.generic_visit(node)

    def _note_gates(self) -> None:
        for if_node, branch in self._branch:
            test, want = if_node.test, True
            if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
                test, want = test.operand, False
            on_true_branch = (branch == "body") == want
            if (
                on_true_branch
                and isinstance(test, ast.Attribute)
                and isinstance(test.value, ast.Name)
                and test.value.id == self.self_name
                and "fused" in test.attr.lower()
                and test.attr not in self.gates
            ):
                self.gates.append(test.attr)


def _rewrite(
    fn: Callable, *, is_method: bool, builders_only: bool = False
) -> tuple[Callable, int, list[str], tuple[str, ...]] | None:
    """``fn`` recompiled with its SDPA calls rerouted and its bias builders' calls structured;
    None when it calls no SDPA (with ``builders_only``: no builder)."""
    funcdef = parse_method(fn, is_method=is_method)
    rewriter = _Rewriter(fn, self_name(funcdef, is_method=is_method), local_names(funcdef))
    funcdef = rewriter.visit(funcdef)
    if rewriter.stray:
        raise NotRewritable(
            f"uses {rewriter.stray[0]} other than by calling it (stored or passed on), so its calls cannot be rerouted"
        )
    if (rewriter.calls == 0) if not builders_only else (rewriter.calls or not rewriter.builders):
        return None
    cells = {UNROUTED_NAME: UNROUTED, **rewriter.builders}
    return compile_like(fn, funcdef, cells), rewriter.calls, rewriter.gates, tuple(rewriter.structures)


# -- generated subclasses --------------------------------------------------------------------

_generated: _ClassCache = _ClassCache(CLASS_CACHE_SIZE)


def patched_class(rewrite: ClassRewrite) -> type:
    """The subclass of ``rewrite.cls`` that carries the rewritten methods (made once)."""
    cls = rewrite.cls
    with _cache_lock:
        gen = _generated.get(cls)
        if gen is None:
            namespace: dict[str, Any] = dict(rewrite.methods)
            namespace.update(
                __module__=cls.__module__,
                __qualname__=cls.__qualname__,
                __doc__=cls.__doc__,
                __reduce_ex__=_reduce_ex,
                __prepare_scriptable__=_refuse_scripting,
                _attnswap_original_class=cls,
            )
            gen = type(cls)(cls.__name__, (cls,), namespace)
            _generated.put(cls, gen)
        return gen


def original_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before patching (its class when it is not patched).

    A module patched and then re-classed by a wrapper (FSDP2's ``fully_shard`` makes
    ``FSDP<generated>``) gets the same wrapper around its original class."""
    cls = type(module)
    inherited = getattr(cls, "_attnswap_original_class", None)  # one C-level MRO lookup
    if inherited is None:
        return cls
    found = cls.__dict__.get("_attnswap_original_class")
    return found if found is not None else _rewrapped(cls)


_rewrapped_classes: _ClassCache = _ClassCache(CLASS_CACHE_SIZE)


def _rewrapped(cls: type) -> type:
    """``cls`` rebuilt with every generated base replaced by the class it was generated from."""
    with _cache_lock:
        found = _rewrapped_classes.get(cls)
        if found is None:
            bases = []
            for base in cls.__bases__:
                if "_attnswap_original_class" in vars(base):
                    base = vars(base)["_attnswap_original_class"]
                elif any("_attnswap_original_class" in vars(b) for b in base.__mro__[1:]):
                    base = _rewrapped(base)
                bases.append(base)
            namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            found = type(cls)(cls.__name__, tuple(bases), namespace)
            _rewrapped_classes.put(cls, found)
        return found


def _refuse_scripting(self: torch.nn.Module) -> torch.nn.Module:
    # torch.jit.script calls this on every submodule before compiling anything
    router = self.__dict__.get(ROUTER_ATTR)
    routed = f"routed to {router.policy.backend!r}" if router is not None else "building its bias as structure"
    raise NotScriptable(
        f"torch.jit.script was given a model with attnswap-patched attention "
        f"({original_class(self).__qualname__}, {routed}). "
        "TorchScript cannot compile the routed code, and scripting the original code would drop the "
        "routing. Unpatch first (attnswap.unpatch(model)) to script the original model, or use "
        "torch.compile / torch.export, which keep the routing."
    )


def _reduce_ex(self: torch.nn.Module, protocol: int) -> tuple:
    # pickle and deepcopy rebuild the instance through the original class (importable by name),
    # then swap the generated class back in, so a patched model round-trips still patched.
    return (_rebuild_patched, (original_class(self),), self.__getstate__())


def _rebuild_patched(cls: type) -> torch.nn.Module:
    obj = cls.__new__(cls)
    rewrite = analyze(cls)
    if rewrite is None or not rewrite.routable:
        raise RuntimeError(f"attnswap cannot re-create the patched {cls.__qualname__}: {rewrite and rewrite.problem}")
    obj.__class__ = patched_class(rewrite)
    return obj
