"""SDPA sites: re-point a class's own ``scaled_dot_product_attention`` calls to its router.

For a module class whose methods call SDPA (under any spelling: ``F.``,
``torch.nn.functional.``, ``nn.functional.``, an imported or aliased name), each such method
is recompiled from its own source with every SDPA call ``f(q, k, v, ...)`` replaced by
``self._attnswap_router.route(q, k, v, ...)``: same arguments, same globals, same closure, same
line numbers. Everything else the module computes (projections, norms, rope, its bias)
stays the module's own code reading its own live attributes.

The rewritten methods live on a generated subclass, made once per class and swapped into
patched instances (``parametrize``-style), so unpatching is just restoring ``__class__``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..routing import ROUTE_METHOD, ROUTER_ATTR

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

    @property
    def routable(self) -> bool:
        return self.problem is None and bool(self.methods)


class _NotRewritable(Exception):
    pass


_cache: dict[type, ClassRewrite | None] = {}
_cache_lock = threading.RLock()
_aliases_cache: dict[int, tuple[dict, frozenset[str]]] = {}


def _is_torch_class(klass: type) -> bool:
    mod = getattr(klass, "__module__", "") or ""
    return klass is object or mod == "torch" or mod.startswith("torch.")


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
    """How to reroute ``cls``, or None when no method of it mentions SDPA. Cached per class."""
    with _cache_lock:
        if cls in _cache:
            return _cache[cls]
        result = _analyze(cls)
        _cache[cls] = result
        return result


def _analyze(cls: type) -> ClassRewrite | None:
    seen: set[str] = set()
    candidates: list[tuple[str, Any, Callable]] = []
    for klass in cls.__mro__:
        if _is_torch_class(klass):
            continue
        for name, attr in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            fn = _plain_function(attr)
            if fn is None:
                continue
            inner = fn
            while inner is not None:  # look through decorators that wrap (functools.wraps)
                mentions = frozenset({_SDPA_NAME}) | _sdpa_aliases(inner.__globals__)
                if _code_mentions(inner.__code__, mentions):
                    if inner is not fn:
                        return ClassRewrite(
                            cls,
                            problem=f"{cls.__qualname__}.{name}: it is wrapped by a decorator; rewriting would drop it",
                        )
                    candidates.append((name, attr, fn))
                    break
                inner = getattr(inner, "__wrapped__", None)
    if not candidates:
        return None
    methods: dict[str, Callable] = {}
    calls = 0
    flags: list[str] = []
    for name, attr, fn in candidates:
        try:
            found = _rewrite(fn, is_method=isinstance(attr, types.FunctionType))
        except _NotRewritable as exc:
            return ClassRewrite(cls, problem=f"{cls.__qualname__}.{name}: {exc}")
        if found is None:
            continue  # mentions the name, but it is not SDPA (a method of the same name, say)
        new_fn, n_calls, gates = found
        methods[name] = new_fn
        calls += n_calls
        flags.extend(g for g in gates if g not in flags)
    if not methods:
        return None
    return ClassRewrite(cls, methods=methods, calls=calls, gate_flags=tuple(flags))


def _resolve(node: ast.expr, fn: Callable, local_names: set[str]) -> Any:
    """The object a ``Name``/``Attribute`` chain refers to, if it is fixed (module-level)."""
    missing = _Missing
    if isinstance(node, ast.Name):
        if node.id in local_names:
            return missing
        code = fn.__code__
        if node.id in code.co_freevars and fn.__closure__ is not None:
            try:
                return fn.__closure__[code.co_freevars.index(node.id)].cell_contents
            except ValueError:
                return missing
        if node.id in fn.__globals__:
            return fn.__globals__[node.id]
        builtins = fn.__globals__.get("__builtins__", {})
        if isinstance(builtins, types.ModuleType):
            builtins = vars(builtins)
        return builtins.get(node.id, missing)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, fn, local_names)
        if base is missing or not isinstance(base, (types.ModuleType, type)):
            return missing
        return getattr(base, node.attr, missing)
    return missing


class _Missing:
    pass


def _local_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
    return names


class _Rewriter(ast.NodeTransformer):
    def __init__(self, fn: Callable, self_name: str | None, local_names: set[str]) -> None:
        self.fn = fn
        self.self_name = self_name
        self.local_names = local_names
        self.calls = 0
        self.gates: list[str] = []
        self.stray: list[str] = []
        self._branch: list[tuple[ast.If, str]] = []

    def _is_sdpa(self, node: ast.expr) -> bool:
        return isinstance(node, (ast.Name, ast.Attribute)) and _resolve(node, self.fn, self.local_names) is SDPA

    def visit_If(self, node: ast.If) -> ast.AST:
        node.test = self.visit(node.test)
        for branch in ("body", "orelse"):
            self._branch.append((node, branch))
            setattr(node, branch, [self.visit(stmt) for stmt in getattr(node, branch)])
            self._branch.pop()
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if not self._is_sdpa(node.func):
            return self.generic_visit(node)
        node.args = [self.visit(a) for a in node.args]
        node.keywords = [self.visit(k) for k in node.keywords]
        if self.self_name is None:
            raise _NotRewritable("calls scaled_dot_product_attention outside an instance method, no router to reach")
        self.calls += 1
        self._note_gates()
        router = ast.Attribute(value=ast.Name(id=self.self_name, ctx=ast.Load()), attr=ROUTER_ATTR, ctx=ast.Load())
        node.func = ast.copy_location(ast.Attribute(value=router, attr=ROUTE_METHOD, ctx=ast.Load()), node.func)
        return node

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


def _rewrite(fn: Callable, *, is_method: bool) -> tuple[Callable, int, list[str]] | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise _NotRewritable(f"its source is not available ({exc})") from None
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise _NotRewritable(f"its source does not parse on its own ({exc.msg})") from None
    funcdef = tree.body[0] if tree.body else None
    if not isinstance(funcdef, (ast.FunctionDef, ast.AsyncFunctionDef)) or funcdef.name != fn.__name__:
        raise _NotRewritable("its source is not a plain `def` (a lambda or generated function)")
    if not is_method:  # its @staticmethod/@classmethod line is not part of the function
        funcdef.decorator_list = [
            d for d in funcdef.decorator_list if not (isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod"))
        ]
    if funcdef.decorator_list:
        raise _NotRewritable("it is decorated; rewriting would drop the decorator")
    args = funcdef.args.posonlyargs + funcdef.args.args
    self_name = args[0].arg if (is_method and args) else None
    rewriter = _Rewriter(fn, self_name, _local_names(funcdef))
    funcdef = rewriter.visit(funcdef)
    if rewriter.stray:
        raise _NotRewritable(
            f"uses {rewriter.stray[0]} other than by calling it (stored or passed on), so its calls cannot be rerouted"
        )
    if rewriter.calls == 0:
        return None
    return _compile_like(fn, funcdef), rewriter.calls, rewriter.gates


def _compile_like(fn: Callable, funcdef: ast.FunctionDef) -> Callable:
    """Compile ``funcdef`` into a function with ``fn``'s globals, closure cells, defaults and line numbers."""
    code = fn.__code__
    ast.increment_lineno(funcdef, code.co_firstlineno - 1)
    factory = ast.FunctionDef(
        name="__attnswap_factory__",
        args=ast.arguments(
            posonlyargs=[], args=[ast.arg(arg=name) for name in code.co_freevars], vararg=None,
            kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[],
        ),
        body=[funcdef, ast.copy_location(ast.Return(value=ast.Name(id=funcdef.name, ctx=ast.Load())), funcdef)],
        decorator_list=[],
        returns=None,
        type_comment=None,
        **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}),
    )
    ast.copy_location(factory, funcdef)
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    compiled = compile(module, code.co_filename, "exec", dont_inherit=True)
    factory_code = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    new_code = next(c for c in factory_code.co_consts if isinstance(c, types.CodeType) and c.co_name == fn.__name__)
    cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
    closure = tuple(cells[name] for name in new_code.co_freevars)
    new_fn = types.FunctionType(new_code, fn.__globals__, fn.__name__, fn.__defaults__, closure or None)
    new_fn.__kwdefaults__ = fn.__kwdefaults__
    new_fn.__qualname__ = fn.__qualname__
    new_fn.__module__ = fn.__module__
    new_fn.__doc__ = fn.__doc__
    new_fn.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    new_fn.__dict__.update(fn.__dict__)
    new_fn.__attnswap_original__ = fn  # type: ignore[attr-defined]
    return new_fn


# -- generated subclasses --------------------------------------------------------------------

_generated: dict[type, type] = {}


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
                _attnswap_original_class=cls,
            )
            gen = type(cls)(cls.__name__, (cls,), namespace)
            _generated[cls] = gen
        return gen


def original_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before patching (its class when it is not patched)."""
    cls = type(module)
    return cls.__dict__.get("_attnswap_original_class", cls)


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
