"""Hand-written attention sites: find ``q @ kᵀ`` products that feed a softmax, and defer them.

A method is a hand-written attention when a softmax's input depends (through assignments,
in source order) on a matrix product it computes: ``attn = q @ k.transpose(-2, -1)``, scaled,
biased, viewed and masked by any code, then ``attn.softmax(-1)`` / ``F.softmax`` /
``self.softmax(attn)``. Only those products are rewritten, to
``__attnswap_mm__(self, a, b)``, which returns a :class:`~.scores.Scores` that follows the
rest of the module's own code and becomes the router call at ``@ v`` (see :mod:`.scores`).
A ``forward`` also settles anything symbolic it would return, so callers always get tensors.

Why not ``torch.fx``: tracing a whole ``forward`` bakes in what should stay live and breaks
on ordinary timm code. Measured on timm 1.0.31: tracing LeViT's attention in eval mode writes
a ``"Proxy(getattr_2)"`` key into the module's own bias cache (``str(device)`` of a proxy);
Swin v2-cr's trace takes the ``mask is not None`` branch for every call, mask or not; MViTv2
does not trace at all (``TraceError``: shapes used in control flow). Rewriting only the
product keeps every other line the module's own, read at call time, so there is nothing to
guard or retrace.

Classes that compute softmax attention that no single SDPA call expresses are listed in
:data:`NOT_EXPRESSIBLE` and left alone; so are softmaxes that are not attention
(:data:`NOT_ATTENTION`). Functions known to *add* a bias to the scores they are given (and
write it in place, which the symbolic scores cannot follow) are in :data:`ADDITIVE`: their
calls are rewritten so the bias is computed from zeros and added.
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
from typing import Any, Callable

import torch

from ..routing import ROUTER_ATTR
from .chains import FusedChain, fuse_chains
from .scores import Lazy, Probs, additive, einsum_scores, scores_or_product
from .source import Missing, compile_like, local_names, parse_method, resolve, self_name

#: classes with softmax attention that one SDPA call cannot compute: left alone, with the reason
NOT_EXPRESSIBLE: dict[str, str] = {
    "timm.models.cait.TalkingHeadAttn": (
        "talking-head attention mixes heads with a Linear before and after the softmax; "
        "no attention kernel takes that (an exact rewrite costs heads x the compute)"
    ),
    "timm.models.efficientformer_v2.Attention2d": (
        "talking-head attention: 1x1 convolutions mix heads before and after the softmax; no attention kernel takes that"
    ),
    "timm.models.volo.OutlookAttention": (
        "outlook attention has no q·kᵀ: its weights come from a Linear over pooled features, then fold"
    ),
}

#: softmaxes over something other than q·kᵀ scores (or degenerate ones): never touched
NOT_ATTENTION: dict[str, str] = {
    "timm.models.csatv2.SpatialTransformerBlock": (
        "its q/k/v are (batch, features), so the softmax runs over the batch axis, and a LayerNorm(1) makes them "
        "constant: not an attention over tokens"
    ),
}

#: functions that return ``scores + g(...)`` (written in place into a slice of ``scores``), by
#: ``module.qualname`` (matched without importing their libraries)
ADDITIVE: frozenset[str] = frozenset({
    "timm.models.mvitv2.cal_rel_pos_type",
    "torchvision.models.video.mvit._add_rel_pos",
})

#: fuse straight chains into one call (:mod:`.chains`); off, every chain runs symbolically (tests compare the two)
FUSE_CHAINS = True

#: a model library's convention for the attention weights a ``forward`` returns, by top-level package:
#: (the parameter of ``forward`` that asks for them, a check of whether the library is capturing them
#: anyway). Where ``forward`` has that parameter, it is false and nothing captures them, probabilities
#: it would return are returned as None (what the library's fused implementations return) instead
#: of being computed by the module's own code. Integrations add their library's.
RETURNED_WEIGHTS: dict[str, tuple[str, Callable[[], bool]]] = {}

MM_HELPER = "__attnswap_mm__"
EINSUM_HELPER = "__attnswap_einsum__"
ADDITIVE_HELPER = "__attnswap_additive__"
SETTLE_HELPER = "__attnswap_settle__"
WEIGHTS_HELPER = "__attnswap_weights__"


def _mm(module: torch.nn.Module, a: Any, b: Any, bmm: bool = False, scores: bool = True) -> Any:
    """``a @ b`` (``torch.bmm`` when ``bmm``); symbolic scores when ``scores`` (the product feeds
    a softmax) and its operands may be ``q`` and ``kᵀ``."""
    # a product of symbolic scores or probabilities names its dunder explicitly: dynamo traces
    # ``lazy @ v`` as ``Tensor.matmul(v, lazy)``, the same call it makes for ``v @ lazy``
    if isinstance(a, Lazy):
        return torch.bmm(a, b) if bmm else a.__matmul__(b)
    if isinstance(b, Lazy):
        return torch.bmm(a, b) if bmm else b.__rmatmul__(a)
    if not scores:  # ``attn @ v`` after the probabilities settled: just the product
        return torch.bmm(a, b) if bmm else a @ b
    return scores_or_product(module.__dict__.get(ROUTER_ATTR), a, b, torch.bmm if bmm else operator.matmul)


def _einsum(module: torch.nn.Module, equation: Any, *operands: Any) -> Any:
    return einsum_scores(module.__dict__.get(ROUTER_ATTR), equation, *operands)


def _additive(module: torch.nn.Module, fn: Callable, scores: Any, *args: Any, **kwargs: Any) -> Any:
    return additive(module.__dict__.get(ROUTER_ATTR), fn, scores, *args, **kwargs)


def _settle(value: Any) -> Any:
    if isinstance(value, Lazy):
        return value.settle("returned from forward")
    if type(value) in (tuple, list) and any(isinstance(v, Lazy) for v in value):
        return type(value)(_settle(v) for v in value)
    return value


def _unasked(value: Any) -> Any:
    if isinstance(value, Probs) and value.sym is not None and value._value is None:
        return None  # weights nobody asked for
    if type(value) in (tuple, list):
        return type(value)(_unasked(v) for v in value)
    return _settle(value)


def _weights(captured: Callable[[], bool], value: Any, asked: Any) -> Any:
    return _settle(value) if asked or captured() else _unasked(value)


HELPERS: dict[str, Any] = {MM_HELPER: _mm, EINSUM_HELPER: _einsum, ADDITIVE_HELPER: _additive, SETTLE_HELPER: _settle}


def class_label(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def left_alone(cls: type) -> tuple[str, bool] | None:
    """Why instances of ``cls`` are deliberately not routed, and whether they are attention at all."""
    for klass in cls.__mro__:
        label = class_label(klass)
        if label in NOT_EXPRESSIBLE:
            return NOT_EXPRESSIBLE[label], True
        if label in NOT_ATTENTION:
            return NOT_ATTENTION[label], False
    return None


class _Products:
    """Which matrix products (and einsums) a method computes, and which of them feed a softmax."""

    def __init__(self, fn: Callable, self_arg: str | None, names: set[str], lazy_methods: frozenset[str]) -> None:
        self.fn, self.self_arg, self.local_names = fn, self_arg, names
        #: methods of the class that may return symbolic probabilities (ConViT's get_attention)
        self.lazy_methods = lazy_methods
        self.lazy_calls: set[int] = set()
        self.taint: dict[str, frozenset[int]] = {}
        self.products: dict[int, ast.AST] = {}
        self.einsums: set[int] = set()
        self.feeding: set[int] = set()
        #: products (``attn @ v``) -> the products their operands derive from
        self.consuming: dict[int, frozenset[int]] = {}

    def _resolved(self, node: ast.expr) -> Any:
        return resolve(node, self.fn, self.local_names)

    def product_kind(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            return "matmul"
        if isinstance(node, ast.Call) and len(node.args) == 2 and not node.keywords:
            target = self._resolved(node.func)
            if target is torch.matmul:
                return "matmul"
            if target is torch.bmm:
                return "bmm"
        if isinstance(node, ast.Call) and self._resolved(node.func) is torch.einsum:
            return "einsum"
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("matmul", "bmm")
            and len(node.args) == 1 and not node.keywords and not isinstance(node.args[0], ast.Starred)
            and self._resolved(node.func) is Missing
        ):
            return "method " + node.func.attr  # q.matmul(kᵀ) (torchvision's Swin)
        return None

    def operands(self, node: ast.AST) -> list[ast.expr]:
        """The two factors of a product node (``a @ b``, ``torch.matmul(a, b)``, ``a.matmul(b)``)."""
        if isinstance(node, ast.BinOp):
            return [node.left, node.right]
        if self.product_kind(node) in ("method matmul", "method bmm"):
            return [node.func.value, node.args[0]]
        return list(node.args)

    def softmax_input(self, node: ast.AST) -> ast.expr | None:
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        target = self._resolved(func)
        if target in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax):
            return node.args[0] if node.args else None
        if isinstance(func, ast.Attribute) and target is Missing:
            if isinstance(func.value, ast.Name) and func.value.id == self.self_arg:
                # self.softmax(attn): an nn.Softmax submodule
                return node.args[0] if "softmax" in func.attr.lower() and node.args else None
            if func.attr == "softmax":
                return func.value
        if isinstance(func, ast.Call) and self._resolved(func.func) is torch.nn.Softmax and node.args:
            return node.args[0]  # nn.Softmax(dim=-1)(attn), made at the call (BLIP's text encoder)
        return None

    def sources(self, expr: ast.AST) -> frozenset[int]:
        """The products whose result flows into ``expr``. A product's operands are not
        followed: ``q`` and ``k`` may come from other products (``x @ w``), but only the
        product ``q @ kᵀ`` itself is the scores."""
        found: set[int] = set()
        stack = [expr]
        while stack:
            node = stack.pop()
            kind = self.product_kind(node)
            if kind is not None:
                self.products[id(node)] = node
                if kind == "einsum":
                    self.einsums.add(id(node))
                found.add(id(node))
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                found |= self.taint.get(node.id, frozenset())
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == self.self_arg
                and node.func.attr in self.lazy_methods
            ):
                self.lazy_calls.add(id(node))
                found.add(id(node))
            stack.extend(ast.iter_child_nodes(node))
        return frozenset(found)

    def _assign(self, target: ast.AST, sources: frozenset[int], augment: bool) -> None:
        if isinstance(target, ast.Name):
            self.taint[target.id] = (self.taint.get(target.id, frozenset()) | sources) if augment else sources
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._assign(elt, sources, augment)
        elif isinstance(target, ast.Starred):
            self._assign(target.value, sources, augment)
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            # attn[...] = expr: the array now also depends on expr
            self._assign(target.value, sources, True)

    def _operands(self, node: ast.AST) -> list[ast.expr]:
        return [] if self.product_kind(node) in (None, "einsum") else self.operands(node)

    def statement(self, stmt: ast.stmt) -> None:
        for node in ast.walk(stmt):
            inp = self.softmax_input(node)
            if inp is not None:
                self.feeding |= self.sources(inp)
            operands = self._operands(node)
            if operands:
                used = frozenset().union(*(self.sources(o) for o in operands))
                if used:
                    self.consuming[id(node)] = self.consuming.get(id(node), frozenset()) | used
        if isinstance(stmt, ast.Assign):
            src = self.sources(stmt.value)
            for target in stmt.targets:
                self._assign(target, src, False)
        elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) and stmt.value is not None:
            self._assign(stmt.target, self.sources(stmt.value), isinstance(stmt, ast.AugAssign))
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            self._assign(stmt.target, self.sources(stmt.iter), False)
        if isinstance(stmt, ast.If):
            # either branch may run: what follows sees the assignments of both
            before = dict(self.taint)
            self._block(stmt.body)
            after_body, self.taint = self.taint, dict(before)
            self._block(stmt.orelse)
            for name, sources in after_body.items():
                self.taint[name] = self.taint.get(name, frozenset()) | sources
            return
        # a loop body runs twice, so it sees what its previous iteration assigned
        passes = 2 if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)) else 1
        for _ in range(passes):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(stmt, block, None) or ():
                    if isinstance(child, ast.ExceptHandler):
                        for s in child.body:
                            self.statement(s)
                    elif isinstance(child, ast.stmt) and not isinstance(child, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                        self.statement(child)

    def _block(self, statements: list[ast.stmt]) -> None:
        for child in statements:
            if not isinstance(child, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                self.statement(child)

    def run(self, funcdef: ast.FunctionDef) -> None:
        for stmt in funcdef.body:
            self.statement(stmt)


class _Rewriter(ast.NodeTransformer):
    def __init__(self, products: _Products, rewrite: set[int], is_forward: bool, weights_flag: str | None = None) -> None:
        self.p = products
        self.rewrite = rewrite
        self.is_forward = is_forward
        self.weights_flag = weights_flag
        self.count = 0
        self.additive = 0
        self._depth = 0

    def _self(self) -> ast.Name:
        return ast.Name(id=self.p.self_arg, ctx=ast.Load())

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self._depth += 1
        try:
            return self.generic_visit(node)
        finally:
            self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        if self.is_forward and self._depth == 1 and node.value is not None:
            if self.weights_flag is not None:
                call = ast.Call(
                    func=ast.Name(id=WEIGHTS_HELPER, ctx=ast.Load()),
                    args=[node.value, ast.Name(id=self.weights_flag, ctx=ast.Load())], keywords=[],
                )
            else:
                call = ast.Call(func=ast.Name(id=SETTLE_HELPER, ctx=ast.Load()), args=[node.value], keywords=[])
            node.value = ast.copy_location(call, node.value)
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        key = id(node)
        self.generic_visit(node)
        if key in self.rewrite:
            self.count += key in self.p.feeding
            return ast.copy_location(
                ast.Call(
                    func=ast.Name(id=MM_HELPER, ctx=ast.Load()),
                    args=[self._self(), node.left, node.right, *self._flags(key, False)],
                    keywords=[],
                ),
                node,
            )
        return node

    def _flags(self, key: int, bmm: bool) -> list[ast.expr]:
        """``_mm``'s ``bmm`` and ``scores`` arguments, when not their defaults."""
        if key not in self.p.feeding:
            return [ast.Constant(value=bmm), ast.Constant(value=False)]
        return [ast.Constant(value=True)] if bmm else []

    def visit_Call(self, node: ast.Call) -> ast.AST:
        key = id(node)
        kind = self.p.product_kind(node) if key in self.rewrite else None
        is_additive = self._is_additive(node)
        self.generic_visit(node)
        if kind == "einsum" and not node.keywords:
            self.count += 1
            return ast.copy_location(
                ast.Call(func=ast.Name(id=EINSUM_HELPER, ctx=ast.Load()), args=[self._self(), *node.args], keywords=[]),
                node,
            )
        if kind is not None:
            self.count += key in self.p.feeding
            return ast.copy_location(
                ast.Call(
                    func=ast.Name(id=MM_HELPER, ctx=ast.Load()),
                    args=[self._self(), *self.p.operands(node), *self._flags(key, kind.endswith("bmm"))],
                    keywords=[],
                ),
                node,
            )
        if is_additive:
            self.additive += 1
            return ast.copy_location(
                ast.Call(
                    func=ast.Name(id=ADDITIVE_HELPER, ctx=ast.Load()),
                    args=[self._self(), node.func, *node.args],
                    keywords=node.keywords,
                ),
                node,
            )
        return node

    def _is_additive(self, node: ast.Call) -> bool:
        if not node.args or any(isinstance(a, ast.Starred) for a in node.args[:1]):
            return False
        target = self.p._resolved(node.func)
        name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        return inspect.isfunction(target) and name in ADDITIVE


def rewrite_manual(
    fn: Callable, *, is_method: bool, lazy_methods: frozenset[str] = frozenset(), name: str | None = None
) -> tuple[Callable, int] | str | None:
    """``fn`` with its softmax-feeding products deferred, and how many; or a reason it cannot be
    (a string); or None when ``fn`` computes no hand-written attention.

    ``lazy_methods``: methods of the class rewritten so, whose results may be symbolic; a product
    ``fn`` computes from them (ConViT's ``get_attention(x) @ v``) is rewritten too. ``name``: the
    attribute the class holds ``fn`` under (``fn.__name__`` by default); a ``forward`` settles
    what it returns (or drops unasked weights, see :data:`RETURNED_WEIGHTS`)."""
    funcdef = parse_method(fn, is_method=is_method)
    self_arg = self_name(funcdef, is_method=is_method)
    cells = dict(HELPERS)
    is_forward = (name or fn.__name__) == "forward"
    weights_flag = None
    convention = RETURNED_WEIGHTS.get(getattr(fn, "__module__", "").partition(".")[0])
    if is_forward and convention is not None and convention[0] in local_names(funcdef.args):
        weights_flag = convention[0]
        cells[WEIGHTS_HELPER] = functools.partial(_weights, convention[1])
    found = defer_products(
        fn, funcdef, self_arg, settle_returns=is_forward, lazy_methods=lazy_methods, cells=cells,
        weights_flag=weights_flag,
    )
    if found is None or isinstance(found, str):
        return found
    return compile_like(fn, funcdef, cells), found


def defer_products(
    fn: Callable, funcdef: ast.FunctionDef, self_arg: str | None, *, settle_returns: bool,
    lazy_methods: frozenset[str] = frozenset(), cells: dict[str, Any] | None = None, weights_flag: str | None = None,
) -> int | str | None:
    """Rewrites ``funcdef`` (``fn``'s own tree) in place: its softmax-feeding products and the
    products consuming them call the helpers in :data:`HELPERS` with ``self_arg`` (the module);
    straight chains become one call each (:mod:`.chains`), added to ``cells`` by the names the
    code calls them by. Returns how many scores products, None when there are none, or why it
    cannot be (a string)."""
    products = _Products(fn, self_arg, local_names(funcdef), lazy_methods)
    products.run(funcdef)
    # the scores products, and the products that consume their probabilities (``attn @ v``)
    lazy = products.feeding | products.lazy_calls
    rewrite = set(products.feeding)
    rewrite.update(node for node, used in products.consuming.items() if used & lazy)
    if not rewrite:
        return None
    if self_arg is None:
        return "computes attention outside an instance method, so there is no router to reach"
    fused = fuse_chains(products, funcdef, self_arg) if FUSE_CHAINS else {}
    if cells is not None:
        cells.update(fused)
    rewriter = _Rewriter(products, rewrite, is_forward=settle_returns, weights_flag=weights_flag)
    rewriter.visit(funcdef)
    return rewriter.count + sum(isinstance(c, FusedChain) for c in fused.values())
