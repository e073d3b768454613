"""Shared by the rewriters: a method's own AST, name resolution, and recompiling it in place."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from typing import Any, Callable


class NotRewritable(Exception):
    """Why a method cannot be recompiled (the message is shown in the patch report)."""


def parse_method(fn: Callable, *, is_method: bool) -> ast.FunctionDef:
    """``fn``'s own ``def``, ready to transform; raises :class:`NotRewritable` with the reason."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise NotRewritable(f"its source is not available ({exc})") from None
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise NotRewritable(f"its source does not parse on its own ({exc.msg})") from None
    funcdef = tree.body[0] if tree.body else None
    if not isinstance(funcdef, (ast.FunctionDef, ast.AsyncFunctionDef)) or funcdef.name != fn.__name__:
        raise NotRewritable("its source is not a plain `def` (a lambda or generated function)")
    if not is_method:  # its @staticmethod/@classmethod line is not part of the function
        funcdef.decorator_list = [
            d for d in funcdef.decorator_list if not (isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod"))
        ]
    if funcdef.decorator_list:
        # A decorator that returned the function itself (``torch.jit.ignore``, registration
        # decorators) only set attributes, and those are copied onto the rewritten function.
        if getattr(fn, "__wrapped__", None) is not None or fn.__code__.co_name != funcdef.name:
            raise NotRewritable("it is decorated; rewriting would drop the decorator")
        funcdef.decorator_list = []
    return funcdef


#: decorators that only wrap (``functools.wraps``, nothing registered or changed when applied), by
#: ``module.qualname`` of the decorator or of the factory that makes it: a method decorated only with
#: these is rewritten underneath and decorated again. Libraries' integrations add theirs.
WRAPPING_DECORATORS: set[str] = {
    # PyTorch's grad-mode context managers, used as decorators
    "torch.autograd.grad_mode.no_grad",
    "torch.autograd.grad_mode.enable_grad",
    "torch.autograd.grad_mode.inference_mode",
}


def rewrapper(fn: Callable, inner: Callable) -> Callable[[Callable], Callable] | str:
    """How to decorate a rewrite of ``inner`` the way ``fn`` decorates it (``fn`` wraps ``inner``
    through ``__wrapped__``), or why that cannot be done (a string).

    Each decorator expression of ``inner``'s ``def`` must name a :data:`WRAPPING_DECORATORS` entry; it
    is evaluated again in ``inner``'s module, as the class body evaluated it."""
    try:
        funcdef = ast.parse(textwrap.dedent(inspect.getsource(inner))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return "it is wrapped by a decorator whose source is not available"
    if not isinstance(funcdef, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return "it is wrapped by a decorator attnswap cannot read"
    levels, wrapper = 0, fn
    while wrapper is not inner and wrapper is not None:
        levels, wrapper = levels + 1, getattr(wrapper, "__wrapped__", None)
    if wrapper is None or levels != len(funcdef.decorator_list):
        return "it is wrapped by a decorator that does not show in its source"
    decorators = []
    for expr in funcdef.decorator_list:
        target = resolve(expr.func if isinstance(expr, ast.Call) else expr, inner, set())
        label = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        if label not in WRAPPING_DECORATORS:
            return f"it is wrapped by a decorator ({ast.unparse(expr)}); rewriting would drop it"
        try:
            decorators.append(eval(compile(ast.Expression(expr), inner.__code__.co_filename, "eval"), inner.__globals__))
        except Exception as exc:  # evaluated again as the class body did; anything else: leave it alone
            return f"its decorator {ast.unparse(expr)} could not be applied again ({exc})"

    def decorate(rewritten: Callable) -> Callable:
        for decorator in reversed(decorators):
            rewritten = decorator(rewritten)
        return rewritten

    return decorate


def self_name(funcdef: ast.FunctionDef, *, is_method: bool) -> str | None:
    args = funcdef.args.posonlyargs + funcdef.args.args
    return args[0].arg if (is_method and args) else None


def resolve(node: ast.expr, fn: Callable, local_names: set[str]) -> Any:
    """The object a ``Name``/``Attribute`` chain refers to, if it is fixed (module-level)."""
    missing = Missing
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
        base = resolve(node.value, fn, local_names)
        if base is missing or not isinstance(base, (types.ModuleType, type)):
            return missing
        return getattr(base, node.attr, missing)
    return missing


class Missing:
    """What :func:`resolve` returns for a name that is not fixed at module level."""


def local_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
    return names


def compile_like(fn: Callable, funcdef: ast.FunctionDef, extra_cells: dict[str, Any] | None = None) -> Callable:
    """Compile ``funcdef`` into a function with ``fn``'s globals, closure cells, defaults and line numbers.

    ``extra_cells`` become closure variables of the new function (helpers the rewrite calls),
    so nothing is added to the module's globals."""
    code = fn.__code__
    extra = dict(extra_cells or {})
    ast.increment_lineno(funcdef, code.co_firstlineno - 1)
    factory = ast.FunctionDef(
        name="__attnswap_factory__",
        args=ast.arguments(
            posonlyargs=[], args=[ast.arg(arg=name) for name in (*code.co_freevars, *extra)], vararg=None,
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
    cells.update((name, types.CellType(value)) for name, value in extra.items())
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
