"""Hand-written attention written as one straight chain, routed in one call.

Most hand-written attention is a run of consecutive statements on one name, used nowhere else::

    attn = q @ k.transpose(-2, -1) * self.scale + bias   # the scores product, scaled, biased
    attn = attn.softmax(dim=-1)                           # the softmax
    attn = self.attn_drop(attn)                           # dropout (optional)
    x = (attn @ v).transpose(1, 2)                        # the product with v (or v @ attnᵀ)

:func:`fuse_chains` rewrites such a run statically: every operand (``q``, ``k``, ``self.scale``,
``bias``, the softmax's ``dim``, ``self.attn_drop``) is evaluated where the module evaluated it,
in source order, into one tuple; the product with ``v`` becomes one call of a
:class:`FusedChain`. At call time it checks that the operands make an attention one SDPA call computes
exactly (plain tensors that fit, a number as scale, a softmax over the last dim, a dropout
module without hooks) and makes the router call. Whatever the check does not accept is
replayed operation by operation as the module wrote it, through the symbolic scores of
:mod:`.scores`: the fast path accepts a subset of what the symbolic path routes and builds the
same router call, so fusing changes the cost, never the result.

Why: each operation on a symbolic object is a Python dispatch; in EfficientViT-MSRA's attention
on CPU at batch 1 they cost ~20 µs per call, as much as the attention's arithmetic (measured
with ``benchmarks/manual_overhead.py``). A chain costs one call. Anything else (views of the
scores, Swin v2's per-head logit scale, a mix of softmaxes, scores returned or stored) keeps
the symbolic rewrite.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

from ..routing import ROUTER_ATTR
from ..call import broadcast
from .scores import _fits, _is_number, check_unwritten, wrong_output_shape

_BINOPS: dict[type, str] = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv"}
_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv}
_IOPS = {"add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "truediv": operator.itruediv}
_PRODUCT_KINDS = {"matmul": False, "method matmul": False, "bmm": True, "method bmm": True}


# -- recognising a chain (patch time) ------------------------------------------------------
def _mentions(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _is_simple(node: ast.AST) -> bool:
    """An operand whose evaluation cannot have side effects (so it may move before another)."""
    if isinstance(node, (ast.Name, ast.Constant)):
        return True
    if isinstance(node, ast.Attribute):
        return _is_simple(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _is_simple(node.operand)
    return False


def _int_constant(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_constant(node.operand)
        return None if inner is None else -inner
    return None


class _Chain:
    """One recognised chain: its spec (constants only) and its operands in evaluation order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.operands: list[ast.expr] = []
        self.ops: list[tuple] = []
        self.bmm = False
        #: (kind, bmm, feeds, transpose): kind "pv" for ``attn @ v``, "vpT" for ``v @ attnᵀ``
        #: (``transpose`` says how it is written); ``feeds``: the product feeds a softmax itself
        self.consumer: tuple = ()
        #: how many times the chain's statements name ``name``
        self.mentions = 0

    def spine(self, expr: ast.expr, is_leaf) -> bool:
        """``expr`` as ``leaf op e1 op e2 ...`` (``+ - * /``, the leaf on the left, or on the
        right of an operand without side effects); appends the ops and operands."""
        if is_leaf(expr):
            return True
        if not (isinstance(expr, ast.BinOp) and type(expr.op) in _BINOPS):
            return False
        op = _BINOPS[type(expr.op)]
        if not _mentions(expr.right, self.name) and self.spine(expr.left, is_leaf):
            self.ops.append(("bin", op, False))
            self.operands.append(expr.right)
            return True
        # ``e * (q @ kᵀ)``: e is evaluated first in the module, after q and k here
        if _is_simple(expr.left) and not _mentions(expr.left, self.name) and self.spine(expr.right, is_leaf):
            self.ops.append(("bin", op, True))
            self.operands.append(expr.left)
            return True
        return False

    def call(self, call: ast.Call, *, method: bool) -> bool:
        """``name.method(args)`` or ``fn(name, args)``: appends the op and its operands."""
        args = call.args if method else call.args[1:]
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            return False
        if any(_mentions(a, self.name) for a in (*args, *(k.value for k in call.keywords))):
            return False
        kwnames = tuple(k.arg for k in call.keywords)
        if method:
            self.ops.append(("method", call.func.attr, len(args), kwnames))
        else:
            if _mentions(call.func, self.name):
                return False
            self.ops.append(("call", len(args), kwnames))
            self.operands.append(call.func)
        self.operands.extend(args)
        self.operands.extend(k.value for k in call.keywords)
        return True


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)


def _assigns(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


class _Finder:
    def __init__(self, products: Any, funcdef: ast.FunctionDef, self_arg: str) -> None:
        self.p = products
        self.self_arg = self_arg
        self.uses: dict[str, int] = {}
        for node in ast.walk(funcdef):
            if isinstance(node, ast.Name):
                self.uses[node.id] = self.uses.get(node.id, 0) + 1
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                for n in node.names:
                    self.uses[n] = self.uses.get(n, 0) + 1000

    def _product(self, node: ast.AST) -> bool:
        return id(node) in self.p.feeding and self.p.product_kind(node) in _PRODUCT_KINDS

    def chain_at(self, block: list[ast.stmt], start: int) -> tuple[_Chain, int, ast.expr, ast.expr] | None:
        """The chain starting at ``block[start]``: (chain, index of its consuming statement,
        the consuming product node, ``v``); or None."""
        first = block[start]
        name = _assigns(first)
        if name is None:
            return None
        chain = _Chain(name)
        found: list[ast.AST] = []

        def product_leaf(node: ast.AST) -> bool:
            if self._product(node):
                found.append(node)
                return True
            return False

        if not chain.spine(first.value, product_leaf) or len(found) != 1 or _mentions(first.value, name):
            return None
        product = found[0]
        a, b = self.p.operands(product)
        chain.bmm = _PRODUCT_KINDS[self.p.product_kind(product)]
        chain.operands[:0] = [a, b]
        mentions = 1  # the statements' own references to the name
        i = start + 1
        softmaxed = False
        while i < len(block):
            stmt = block[i]
            if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                if softmaxed or type(stmt.op) not in _BINOPS or _mentions(stmt.value, name):
                    return None
                chain.ops.append(("aug", _BINOPS[type(stmt.op)]))
                chain.operands.append(stmt.value)
                mentions += 1
            elif _assigns(stmt) == name:
                value = stmt.value
                if not softmaxed and chain.spine(value, lambda n: _is_name(n, name)):
                    if isinstance(value, ast.Name):
                        return None  # ``attn = attn``: nothing to follow
                elif isinstance(value, ast.Call) and self._call_on(chain, value, name, softmaxed):
                    softmaxed = softmaxed or self.p.softmax_input(value) is not None
                else:
                    return None
                mentions += 2
            else:
                break
            i += 1
        if not softmaxed or i >= len(block):
            return None
        consumer = self._consumer(chain, block[i], name)
        if consumer is None:
            return None
        chain.mentions = mentions + 1
        return chain, i, *consumer

    def _call_on(self, chain: _Chain, call: ast.Call, name: str, softmaxed: bool) -> bool:
        is_softmax = self.p.softmax_input(call) is not None
        if is_softmax == softmaxed:
            return False  # one softmax, then only calls on the probabilities (dropout)
        if isinstance(call.func, ast.Attribute) and _is_name(call.func.value, name):
            return is_softmax and chain.call(call, method=True)
        if not call.args or not _is_name(call.args[0], name):
            return False
        return chain.call(call, method=False)

    def _consumer(self, chain: _Chain, stmt: ast.stmt, name: str) -> tuple[ast.expr, ast.expr] | None:
        if not isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return)):
            return None
        for node in ast.walk(stmt):
            kind = self.p.product_kind(node)
            if kind not in _PRODUCT_KINDS:
                continue
            left, right = self.p.operands(node)
            bmm = _PRODUCT_KINDS[kind]
            feeds = id(node) in self.p.feeding  # (attention of attention's output)
            if _is_name(left, name) and not _mentions(right, name):
                chain.consumer = ("pv", bmm, feeds, None)
                return node, right
            transposed = self._transposed(right, name)
            if transposed is not None and not _mentions(left, name):
                chain.consumer = ("vpT", bmm, feeds, transposed)
                return node, left
        return None

    @staticmethod
    def _transposed(node: ast.AST, name: str) -> tuple | None:
        if isinstance(node, ast.Attribute) and node.attr == "mT" and _is_name(node.value, name):
            return ("mT",)
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "transpose"
            and _is_name(node.func.value, name) and len(node.args) == 2 and not node.keywords
        ):
            dims = [_int_constant(a) for a in node.args]
            if None not in dims:
                return ("transpose", *dims)
        return None


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, new: ast.expr) -> None:
        self.target, self.new = target, new

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return ast.copy_location(self.new, node)
        return super().visit(node)


def _blocks(stmts: list[ast.stmt]):
    yield stmts
    for stmt in stmts:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                yield from _blocks(inner)
        for handler in getattr(stmt, "handlers", None) or ():
            yield from _blocks(handler.body)


def fuse_chains(products: Any, funcdef: ast.FunctionDef, self_arg: str) -> dict[str, Any]:
    """Rewrites ``funcdef`` in place: each chain (see the module docstring) becomes its operands'
    tuple and one call of a :class:`FusedChain`. ``products`` is the data-flow pass already run
    on it. Returns the chains (and :func:`_pin`) by the names the rewritten code calls them by
    (closure cells).

    A name is fused only when every use of it in the function is inside its chains (LeViT
    writes one chain per branch of an ``if``, on one name): each chain then starts by assigning
    the name and ends at its only read after the softmax, so nothing else can see the
    probabilities."""
    finder = _Finder(products, funcdef, self_arg)
    found: list[tuple[list[ast.stmt], int, tuple]] = []
    for block in _blocks(funcdef.body):
        i = 0
        while i < len(block):
            chain = finder.chain_at(block, i)
            if chain is None:
                i += 1
                continue
            found.append((block, i, chain))
            i = chain[1] + 1
    mentions: dict[str, int] = {}
    for _, _, (chain, *_rest) in found:
        mentions[chain.name] = mentions.get(chain.name, 0) + chain.mentions
    fused = [f for f in found if finder.uses.get(f[2][0].name, 0) == mentions[f[2][0].name]]
    chains: dict[str, Any] = {PIN_HELPER: _pin} if fused else {}
    # later chains of a block first, so the earlier ones' indices still hold
    for number, (block, start, (chain, end, product, v)) in reversed(list(enumerate(fused))):
        temp, name = f"__attnswap_chain{number}__", f"__attnswap_fused{number}__"
        chains[name] = FusedChain((chain.bmm, tuple(chain.ops), chain.consumer))
        # q and k with their version counters read right after them (see _pin)
        pinned = ast.Starred(
            value=ast.Call(func=ast.Name(id=PIN_HELPER, ctx=ast.Load()), args=chain.operands[:2], keywords=[]),
            ctx=ast.Load(),
        )
        hold = ast.copy_location(
            ast.Assign(
                targets=[ast.Name(id=temp, ctx=ast.Store())],
                value=ast.Tuple(elts=[pinned, *chain.operands[2:]], ctx=ast.Load()),
            ),
            block[start],
        )
        call = ast.Call(
            func=ast.Name(id=name, ctx=ast.Load()),
            args=[ast.Name(id=self_arg, ctx=ast.Load()), ast.Name(id=temp, ctx=ast.Load()), v],
            keywords=[],
        )
        consumer = _Replace(product, call).visit(block[end])
        block[start:end + 1] = [hold, consumer]
    return chains


# -- running a chain (call time) -----------------------------------------------------------
PIN_HELPER = "__attnswap_pin__"


def _pin(a: Any, b: Any) -> tuple[Any, Any, tuple[int, int] | None]:
    """``a``, ``b`` and their version counters as the module computed ``a @ b``: the fused call
    takes the product later, after the chain's other operands were evaluated."""
    # versions_of(), inlined (a frame less at every call)
    if _is_compiling() or not (isinstance(a, _Tensor) and isinstance(b, _Tensor)):
        return a, b, None
    return a, b, (a._version, b._version)


_global_hooks = (
    _nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks,
    _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks,
)
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


def _plain_module(m: Any, cls: type) -> bool:
    """``m`` is exactly a ``cls`` whose call runs its class's ``forward`` and nothing else."""
    return (
        type(m) is cls and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        and not any(_global_hooks) and getattr(m, "_compiled_call_impl", None) is None and "forward" not in m.__dict__
        and not _tracing_state()
    )


def _operand_count(op: tuple) -> int:
    kind = op[0]
    if kind in ("bin", "aug"):
        return 1
    if kind == "method":
        return op[2] + len(op[3])
    return 1 + op[1] + len(op[2])


class _Args:
    """Where a call's parameters sit among a chain's operands (its arguments start at ``start``)."""

    __slots__ = ("start", "nargs", "kwnames", "clash")

    def __init__(self, start: int, nargs: int, kwnames: tuple[str, ...]) -> None:
        self.start, self.nargs, self.kwnames = start, nargs, kwnames
        #: a parameter given by position and by keyword: a TypeError the module raises itself
        self.clash = False

    def at(self, name: str, position: int) -> int | None:
        """The operand index of parameter ``name`` (``position`` when positional), None if not passed."""
        if name in self.kwnames:
            self.clash = self.clash or position < self.nargs
            return self.start + self.nargs + self.kwnames.index(name)
        return self.start + position if position < self.nargs else None


def _get(operands: tuple, at: int | None, default: Any) -> Any:
    return default if at is None else operands[at]


_ADD, _SUB, _MUL, _DIV, _OTHER = range(5)
_TERM_CODES = {"add": _ADD, "sub": _SUB, "mul": _MUL, "truediv": _DIV}


class FusedChain:
    """One fused chain's spec, unpacked once at patch time; called as ``chain(module, operands, v)``.

    Its fast path reads each operand once and builds no symbolic object: every check it makes
    is one the symbolic path makes at the same point, so it routes exactly the calls that path
    routes through these operations, with the same arguments (tests/surgery/test_chains.py)."""

    __slots__ = (
        "bmm", "placed", "terms", "fast", "softmax_fn", "softmax_plain", "softmax_args", "softmax_torch_args",
        "drops", "transposed", "consumer_bmm", "feeds", "dims", "check_dims",
    )

    def __init__(self, spec: tuple) -> None:
        self.bmm, ops, consumer = spec
        #: each op with the index of its first operand
        self.placed: list[tuple[tuple, int]] = []
        i = 3  # after q, k and their versions (_pin)
        for op in ops:
            self.placed.append((op, i))
            i += _operand_count(op)
        # the first call is the softmax (the recogniser allows no other call before it)
        softmax_at = next(n for n, (op, _) in enumerate(self.placed) if op[0] in ("method", "call"))
        #: (operand index, code) of the number and tensor terms before the softmax
        self.terms: list[tuple[int, int]] = []
        for op, at in self.placed[:softmax_at]:
            reflected = op[0] == "bin" and op[2]
            code = _TERM_CODES[op[1]]
            self.terms.append((at, _OTHER if reflected and code in (_SUB, _DIV) else code))
        op, at = self.placed[softmax_at]
        #: operand indices of the softmax's ``dim`` and ``dtype`` (None: not passed); for a call,
        #: as ``F.softmax(attn, dim, _stacklevel, dtype)`` reads them, and as ``torch.softmax(attn, dim, dtype)``
        self.softmax_fn: int | None = None
        if op[0] == "method":  # attn.softmax(dim, dtype)
            args = _Args(at, op[2], op[3])
            self.softmax_args = self.softmax_torch_args = (args.at("dim", 0), args.at("dtype", 1))
            self.softmax_plain = False
        else:
            args = _Args(at + 1, op[1], op[2])
            self.softmax_fn = at
            self.softmax_args = (args.at("dim", 0), args.at("dtype", 2))
            self.softmax_torch_args = (args.at("dim", 0), args.at("dtype", 1))
            #: called with nothing but the scores: may be an ``nn.Softmax`` module
            self.softmax_plain = not op[1] and not op[2]
        #: (operand index of the callable, indices of p and training, or None for a module) per dropout
        self.drops: list[tuple[int, int | None, int | None, bool]] = []
        fast = not args.clash
        for op, at in self.placed[softmax_at + 1:]:
            drop = _Args(at + 1, op[1], op[2])
            self.drops.append((at, drop.at("p", 0), drop.at("training", 1), not op[1] and not op[2]))
            fast = fast and not drop.clash
        self.fast = fast
        self.transposed = consumer[0] == "vpT"
        self.consumer_bmm, self.feeds, self.dims = consumer[1:]
        self.check_dims = self.transposed and self.dims[0] == "transpose" and {self.dims[1], self.dims[2]} != {-2, -1}

    def __call__(self, module: torch.nn.Module, operands: tuple, v: Any) -> Any:
        router = module.__dict__.get(ROUTER_ATTR)
        a, b, versions = operands[0], operands[1], operands[2]
        if versions is not None and (a._version, b._version) != versions:
            check_unwritten(router, a, b, versions)
        if router is not None and self.fast:
            out = self._fast(router, a, b, operands, v)
            if out is not None:
                return out
        return self._replay(module, operands, v)

    def _fast(self, router: Any, a: Any, b: Any, operands: tuple, v: Any) -> torch.Tensor | None:
        # product_facts(), inlined: in a model every Python frame and attribute read here runs
        # with cold caches, at every call
        kind_a, kind_b = type(a), type(b)
        if not ((kind_a is _Tensor or kind_a is _Parameter) and (kind_b is _Tensor or kind_b is _Parameter)):
            return None
        a_shape, b_shape = a.shape, b.shape
        dtype, device = a.dtype, a.device
        if (
            len(a_shape) < 2 or len(b_shape) < 2 or b.dtype is not dtype or not dtype.is_floating_point
            or b.device != device or a_shape[-1] != b_shape[-2]
        ):
            return None
        lead = a_shape[:-2]
        if b_shape[:-2] != lead:
            lead = broadcast(lead, b_shape[:-2])
            if lead is None:
                return None
        if self.bmm and (len(a_shape) != 3 or len(b_shape) != 3 or a_shape[0] != b_shape[0]):
            return None
        shape = (*lead, a_shape[-2], b_shape[-1])
        scale = 1.0
        biases: list[torch.Tensor] = []
        for at, code in self.terms:
            other = operands[at]
            if code <= _SUB:
                kind = type(other)
                if not ((kind is _Tensor or kind is _Parameter) and other.dtype is dtype and other.device == device):
                    return None
                other_shape = other.shape  # the usual bias, the scores' trailing dims, checked here
                if other_shape != shape[len(shape) - len(other_shape):] and not _fits(shape, other):
                    return None
                biases.append(other if code == _ADD else -other)
            elif code != _OTHER and _is_number(other):
                # as the symbolic scores fold a number (bit for bit the same arithmetic)
                scale = scale * (other if code == _MUL else 1.0 / other)
                biases = [t * other if code == _MUL else t / other for t in biases]
            else:
                return None
        # functions compared by identity, never looked up in a dict (dynamo misjudges those)
        if self.softmax_fn is None:
            dim_at, dtype_at = self.softmax_args
            dim, sm_dtype = _get(operands, dim_at, None), _get(operands, dtype_at, None)
        else:
            softmax = operands[self.softmax_fn]
            if softmax is F.softmax or softmax is torch.softmax:
                dim_at, dtype_at = self.softmax_args if softmax is F.softmax else self.softmax_torch_args
                dim, sm_dtype = _get(operands, dim_at, None), _get(operands, dtype_at, None)
            elif self.softmax_plain and _plain_module(softmax, torch.nn.Softmax):
                dim, sm_dtype = softmax.dim, None
            else:
                return None
        if not isinstance(dim, int) or dim not in (-1, len(shape) - 1) or not (sm_dtype is None or sm_dtype == dtype):
            return None
        dropout_p = 0.0
        for fn_at, p_at, training_at, plain in self.drops:
            fn = operands[fn_at]
            if fn is F.dropout:
                p, training = _get(operands, p_at, 0.5), _get(operands, training_at, True)
            elif plain and _plain_module(fn, torch.nn.Dropout):
                p, training = fn.p, fn.training
            elif plain and _plain_module(fn, torch.nn.Identity):
                continue
            else:
                return None
            if training and p != 0:
                if dropout_p:
                    return None  # dropout twice: the symbolic path settles
                dropout_p = float(p)
        # route_scores(), inlined for the same reason (tests compare the two paths' router calls)
        kind = type(v)
        if kind is not _Tensor and kind is not _Parameter:
            return None
        if self.transposed:
            dims = self.dims
            if self.check_dims:  # transpose(1, 2): the last two dims only for 3-D scores
                nd = len(shape)
                if {dims[1] % nd, dims[2] % nd} != {nd - 2, nd - 1}:
                    return None
            v = v.mT  # a property: cheaper than transpose(-2, -1), the same view
        if v.dtype is not dtype or v.device != device:
            return None
        v_shape = v.shape
        lead = shape[:-2]
        if len(v_shape) < 2 or v_shape[-2] != shape[-1]:
            return None
        v_lead = v_shape[:-2]
        if v_lead != lead and (
            len(v_lead) > len(lead) or any(n != 1 and n != m for m, n in zip(reversed(lead), reversed(v_lead)))
        ):
            return None  # v would enlarge the batch dims: the product broadcasts, attention does not
        q = a if a_shape[:-2] == lead else a.expand(*lead, *a_shape[-2:])
        bias = None
        for term in biases:
            bias = term if bias is None else bias + term
        out = router.route(q, b.mT, v, bias, dropout_p, False, scale)
        out_shape = out.shape
        if out_shape[:-2] != lead or out_shape[-2] != shape[-2] or out_shape[-1] != v_shape[-1]:
            raise wrong_output_shape(router, out_shape, (*lead, shape[-2], v_shape[-1]))
        if self.transposed:
            return out.mT.contiguous()
        return out if out.is_contiguous() else out.contiguous()

    def _replay(self, module: torch.nn.Module, operands: tuple, v: Any) -> Any:
        """The chain as the module wrote it, through the symbolic scores (what the unfused rewrite runs)."""
        from .manual import _mm

        x = _mm(module, operands[0], operands[1], self.bmm)
        for op, i in self.placed:
            kind = op[0]
            if kind == "bin":
                x = _OPS[op[1]](operands[i], x) if op[2] else _OPS[op[1]](x, operands[i])
            elif kind == "aug":
                x = _IOPS[op[1]](x, operands[i])
            elif kind == "method":
                nargs, kwnames = op[2], op[3]
                x = getattr(x, op[1])(*operands[i:i + nargs], **dict(zip(kwnames, operands[i + nargs:i + nargs + len(kwnames)])))
            else:
                fn, nargs, kwnames = operands[i], op[1], op[2]
                rest = operands[i + 1:i + 1 + nargs + len(kwnames)]
                x = fn(x, *rest[:nargs], **dict(zip(kwnames, rest[nargs:])))
        if not self.transposed:
            return _mm(module, x, v, self.consumer_bmm, self.feeds)
        dims = self.dims
        xt = x.mT if dims[0] == "mT" else x.transpose(dims[1], dims[2])
        return _mm(module, v, xt, self.consumer_bmm, self.feeds)
