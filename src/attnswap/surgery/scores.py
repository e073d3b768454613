"""Hand-written attention, routed: attention scores that stay symbolic until ``@ v``.

A module that computes ``softmax(q @ kᵀ · scale + bias) @ v`` by hand has its ``q @ kᵀ``
rewritten (see :mod:`.manual`) to return a :class:`Scores` object instead of the product.
That object records two things about everything the module's own code then does to it:

- a **replay**: the exact operations, so that the tensor the module would have computed can
  be produced bit for bit whenever the algebra below cannot follow (``settle``);
- a **symbolic form**, while the operations keep it an attention: ``q``, ``k``, a scale (a
  number, or a per-row tensor folded into ``q``), additive biases (also added in a
  temporary ``view``, like Swin's shift mask), then ``softmax`` over the last dim, dropout,
  a transpose, and a linear mix with other tensors (ConViT's gated positional attention).

When the probabilities meet ``@ v`` in symbolic form, the product is the site's router
call: ``route(q, k, v, attn_mask=bias, dropout_p, scale)``. Any other use (a talking-head
mix, an in-place write, a dtype change, an op we do not model) settles the object with its
replay, so the module computes exactly what it always did and the router counts why.

Everything runs at call time, in the module's own code: ``self.training``, ``attn_drop.p``,
window sizes and masks are read live, so nothing can go stale.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from ..call import broadcast
from ..structure.base import StructuredMask
from ..structure.builders import additive_bias_for
from ..structure.windows import WindowedBias

_Tensor = torch.Tensor
_SOFTMAX_FUNCS = frozenset({F.softmax, torch.softmax, _Tensor.softmax})
_MATMUL_FUNCS = frozenset({torch.matmul, _Tensor.matmul, _Tensor.__matmul__, torch.bmm, _Tensor.bmm})
_TENSOR_BINARY: dict[Callable, Callable] = {
    _Tensor.__add__: operator.add, torch.add: operator.add, _Tensor.add: operator.add,
    _Tensor.__sub__: operator.sub, torch.sub: operator.sub, _Tensor.sub: operator.sub,
    _Tensor.__mul__: operator.mul, torch.mul: operator.mul, _Tensor.mul: operator.mul,
    _Tensor.__truediv__: operator.truediv, torch.div: operator.truediv, _Tensor.div: operator.truediv,
    _Tensor.__matmul__: operator.matmul, torch.matmul: operator.matmul, _Tensor.matmul: operator.matmul,
}
_REFLECTED: tuple[tuple[Callable, Callable], ...] = tuple(
    (getattr(_Tensor, name), op)
    for name, op in (
        ("__radd__", operator.add), ("__rsub__", operator.sub), ("__rmul__", operator.mul),
        ("__rtruediv__", operator.truediv), ("__rdiv__", operator.truediv), ("__rmatmul__", operator.matmul),
    )
)


def _reflected_op(func: Callable) -> Callable | None:
    """The operator of a tensor's reflected dunder: ``func(t, x)`` computes ``x op t``.

    Python reaches them only after the left operand declined; dynamo reaches them first for a
    non-tensor left operand (``Scores - bias`` is traced as ``Tensor.__rsub__(bias, scores)``).
    Matched by identity, not by a dict keyed on functions, whose membership dynamo misjudges."""
    for reflected, op in _REFLECTED:
        if func is reflected:
            return op
    return None

def _settled(x: Any) -> Any:
    return x.settle() if isinstance(x, Lazy) else x


def _is_plain_tensor(x: Any) -> bool:
    return type(x) is _Tensor or type(x) is torch.nn.Parameter


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _infer_shape(current: tuple[int, ...], shape: tuple) -> tuple[int, ...] | None:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if not all(isinstance(s, int) for s in shape):
        return None
    numel = math.prod(current)
    if shape.count(-1) > 1:
        return None
    if -1 in shape:
        rest = math.prod([s for s in shape if s != -1])
        if rest == 0 or numel % rest:
            return None
        shape = tuple(numel // rest if s == -1 else s for s in shape)
    return tuple(shape) if math.prod(shape) == numel else None


def _unview_bias(bias: _Tensor, viewed: tuple[int, ...], base: tuple[int, ...]) -> _Tensor | None:
    """``bias`` (broadcastable to ``viewed``) as a tensor broadcastable to ``base``.

    ``viewed`` and ``base`` are two shapes of the same scores; their dims are matched in
    groups of equal product. A group where the bias is all size-1 stays size 1; any other
    group is expanded and merged. So Swin's ``(B·nW, H, N, N)`` viewed as ``(B, nW, H, N, N)``
    with a ``(1, nW, 1, N, N)`` shift mask gives a ``(B·nW, 1, N, N)`` bias, not one per head.
    """
    bias = bias.reshape((1,) * (len(viewed) - bias.dim()) + tuple(bias.shape))
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(viewed) or j < len(base):
        gv: list[int] = []
        gb: list[int] = []
        pv = pb = 1
        if i < len(viewed):
            gv.append(i)
            pv *= viewed[i]
            i += 1
        if j < len(base):
            gb.append(j)
            pb *= base[j]
            j += 1
        while pv != pb:
            if pv < pb and i < len(viewed):
                gv.append(i)
                pv *= viewed[i]
                i += 1
            elif pb < pv and j < len(base):
                gb.append(j)
                pb *= base[j]
                j += 1
            else:
                return None
        groups.append((gv, gb))
    expand_sizes = list(bias.shape)
    out_shape: list[int] = []
    for gv, gb in groups:
        if all(bias.shape[d] == 1 for d in gv):
            out_shape.extend(1 for _ in gb)
        else:
            for d in gv:
                expand_sizes[d] = viewed[d]
            out_shape.extend(base[d] for d in gb)
    return bias.expand(expand_sizes).reshape(out_shape)


def versions_of(q: Any, k: Any) -> tuple[int, int] | None:
    """The version counters of ``q`` and ``k`` (None while compiling: a graph orders its own writes)."""
    if torch.compiler.is_compiling() or not (isinstance(q, _Tensor) and isinstance(k, _Tensor)):
        return None
    return q._version, k._version


def check_unwritten(router: Any, q: _Tensor, k: _Tensor, versions: tuple[int, int] | None) -> None:
    """Raise when ``q`` or ``k`` was written in place since ``versions`` were read: the product
    ``q @ kᵀ`` was deferred, so what the module computed from the old values is gone."""
    if versions is not None and (q._version, k._version) != versions:
        from ..errors import AttnSwapError

        site = getattr(router, "site", "") or "<root>"
        raise AttnSwapError(
            f"site {site}: the module wrote q or k of its hand-written attention in place between q @ kᵀ and the "
            "product with v; attnswap defers q @ kᵀ, so it cannot compute what the module computes. Leave this "
            "module out with patch(..., exclude=[...]), and please report the model"
        )


class Lazy:
    """A value the module's code holds in place of a tensor: replayable, maybe symbolic."""

    __slots__ = ("_replay", "_value", "sym", "router")
    _noun = "scores"  # what the value is, in the reasons counted when it settles

    def __init__(self, router: Any, replay: tuple[Callable, tuple, dict], sym: Any) -> None:
        self.router = router
        self._replay = replay
        self._value: _Tensor | None = None
        self.sym = sym

    # -- settling ------------------------------------------------------------------------
    def settle(self, why: str | None = None) -> _Tensor:
        """The tensor the module's own code computes here (replayed once, then cached)."""
        if self._value is None:
            sym = self.sym
            if type(sym) is _ScoresSym:
                check_unwritten(self.router, sym.q, sym.k, sym.versions)
            if why is not None and self.router is not None:
                self.router.note_settled(why)
            fn, args, kwargs = self._replay
            self._value = fn(*tree_map(_settled, args), **tree_map(_settled, kwargs))
        return self._value

    def _derive(self, fn: Callable, args: tuple, kwargs: dict | None, sym: Any, cls: type | None = None) -> Lazy:
        return (cls or type(self))(self.router, (fn, args, kwargs or {}), sym)

    def _fallback(self, fn: Callable, args: tuple, kwargs: dict | None, why: str) -> Any:
        # nested too: ``torch.cat([scores, sinks])`` holds the scores in a list
        for a in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(a, Lazy) and a.sym is not None:
                a.settle(why)
        return fn(*tree_map(_settled, args), **tree_map(_settled, kwargs or {}))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lazy = next((a for a in args if isinstance(a, Lazy)), None)
        if lazy is not None and lazy.sym is not None and lazy._value is None:
            if len(args) == 2 and not kwargs:
                op = _TENSOR_BINARY.get(func)
                if op is not None:
                    return lazy._binary(op, args[1] if args[0] is lazy else args[0], args[0] is not lazy)
                op = _reflected_op(func)
                if op is not None:
                    return lazy._binary(op, args[0] if args[1] is lazy else args[1], args[1] is not lazy)
            handled = lazy._torch_function(func, args, kwargs)
            if handled is not NotImplemented:
                return handled
        name = getattr(func, "__name__", str(func))
        out = Lazy._fallback(lazy, func, args, kwargs, f"scores passed to {name}")
        if name.endswith("_") and not name.endswith("__"):
            for a in args:
                if isinstance(a, Lazy):
                    a.sym = None
        return out

    def _torch_function(self, func, args, kwargs):
        return NotImplemented

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.sym is not None and self._value is None:
            self.settle(f"scores used through .{name}")
        if name.endswith("_"):
            self.sym = None  # an in-place method: the symbolic form no longer describes the value
        return getattr(self.settle(), name)

    def __setitem__(self, index, value) -> None:
        self.settle("scores written in place")[index] = _settled(value)
        self.sym = None

    def __getitem__(self, index):
        return self.settle("scores indexed")[tree_map(_settled, index)]

    def __repr__(self) -> str:
        state = "symbolic" if self.sym is not None else "settled"
        return f"<attnswap {type(self).__name__} ({state}): {self.settle()!r}>"

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        return iter(self.settle("scores iterated"))

    def __bool__(self) -> bool:
        return bool(self.settle("scores used as a bool"))

    def __neg__(self):
        return -self.settle("scores negated")

    def __format__(self, spec: str) -> str:
        return format(self.settle(), spec)

    # shape-like attributes answer without computing anything
    @property
    def shape(self) -> torch.Size:
        return self.settle().shape if self.sym is None else torch.Size(self.sym.shape)

    def size(self, dim: int | None = None):
        shape = self.shape
        return shape if dim is None else shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.settle().dtype if self.sym is None else self.sym.dtype

    @property
    def device(self) -> torch.device:
        return self.settle().device if self.sym is None else self.sym.device

    def _binary(self, op: Callable, other: Any, reflected: bool) -> Any:
        if isinstance(other, StructuredMask) and not self._keeps_structure(op, other, reflected):
            other = other._outside("hand-written attention")  # here, the tensor it stands for
        args = (other, self) if reflected else (self, other)
        if self.sym is not None and self._value is None:
            out = self._symbolic_binary(op, other, reflected)
            if out is not NotImplemented and out is not None:
                return out
        return self._fallback(op, args, None, f"{self._noun} combined by {op.__name__}")

    def _symbolic_binary(self, op, other, reflected):
        return NotImplemented

    def _keeps_structure(self, op: Callable, other: StructuredMask, reflected: bool) -> bool:
        """Whether a structured bias can join the symbolic form as it is (scores add it)."""
        return False

    def __add__(self, other):
        return self._binary(operator.add, other, False)

    def __radd__(self, other):
        return self._binary(operator.add, other, True)

    def __sub__(self, other):
        return self._binary(operator.sub, other, False)

    def __rsub__(self, other):
        return self._binary(operator.sub, other, True)

    def __mul__(self, other):
        return self._binary(operator.mul, other, False)

    def __rmul__(self, other):
        return self._binary(operator.mul, other, True)

    def __truediv__(self, other):
        return self._binary(operator.truediv, other, False)

    def __rtruediv__(self, other):
        return self._binary(operator.truediv, other, True)

    def __matmul__(self, other):
        return self._binary(operator.matmul, other, False)

    def __rmatmul__(self, other):
        return self._binary(operator.matmul, other, True)


class _ScoresSym:
    """``(q · q_mul) @ kᵀ · scale + Σ biases``, shaped ``shape``; maybe under a temporary view."""

    __slots__ = ("q", "k", "scale", "q_mul", "biases", "shape", "dtype", "device", "viewed", "viewed_biases", "versions")

    def __init__(self, q, k, shape):
        self.q, self.k = q, k
        #: q's and k's version counters when the product was taken (views share their base's)
        self.versions = versions_of(q, k)
        self.scale = 1.0
        self.q_mul: _Tensor | None = None
        self.biases: list[_Tensor] = []
        self.shape = shape
        self.dtype, self.device = q.dtype, q.device
        self.viewed: tuple[int, ...] | None = None
        self.viewed_biases: list[_Tensor] = []

    def copy(self) -> _ScoresSym:
        # spelled out: a loop over __slots__ with getattr/setattr costs 3x as much, on every
        # operation the module applies to its scores
        new = _ScoresSym.__new__(_ScoresSym)
        new.q, new.k, new.scale, new.q_mul = self.q, self.k, self.scale, self.q_mul
        new.biases, new.shape, new.dtype, new.device = list(self.biases), self.shape, self.dtype, self.device
        new.viewed, new.viewed_biases = self.viewed, list(self.viewed_biases)
        new.versions = self.versions
        return new

    @property
    def current_shape(self) -> tuple[int, ...]:
        return self.viewed if self.viewed is not None else self.shape


def _fits(shape: tuple[int, ...], other: _Tensor) -> bool:
    """``other`` broadcasts to ``shape`` without enlarging it."""
    other_shape = other.shape
    if other_shape == shape[len(shape) - len(other_shape):]:  # the usual bias: the scores' trailing dims
        return True
    if len(other_shape) > len(shape):
        return False
    for a, b in zip(reversed(shape), reversed(other_shape)):
        if b != 1 and b != a:
            return False
    return True


def _compatible(t: _Tensor, sym: _ScoresSym) -> bool:
    return _is_plain_tensor(t) and t.dtype == sym.dtype and t.device == sym.device


def _windowed(sym: _ScoresSym) -> WindowedBias | None:
    """Swin v2's shift mask, added in a ``(B, nW, H, N, N)`` view of ``(B·nW, H, N, N)`` scores
    as ``mask [1, nW, 1, N, N]`` on top of one ``[1, H, N, N]`` bias: the two as a
    :class:`WindowedBias` (the mask is not expanded to every image), or None."""
    viewed, base = sym.viewed, sym.shape
    if viewed is None or len(viewed) != 5 or len(base) != 4 or len(sym.viewed_biases) != 1 or len(sym.biases) != 1:
        return None
    batch, windows, heads, n, n2 = viewed
    if (batch * windows, heads, n, n2) != tuple(base) or n != n2:
        return None
    mask, bias = sym.viewed_biases[0], sym.biases[0]
    if not _is_plain_tensor(mask) or tuple((1,) * (5 - mask.dim()) + tuple(mask.shape)) != (1, windows, 1, n, n):
        return None
    if tuple((1,) * (4 - bias.dim()) + tuple(bias.shape)) != (1, heads, n, n):
        return None
    if _is_plain_tensor(bias):
        bias = bias.reshape(1, heads, n, n)
    elif not isinstance(bias, StructuredMask):
        return None
    return WindowedBias(bias, mask.reshape(windows, n, n), base[0], heads)


class Scores(Lazy):
    """``q @ kᵀ`` and what follows it, up to ``softmax``."""

    __slots__ = ()

    def float(self):
        """``scores.float()`` of float32 scores is the scores themselves (T5-style ``softmax(scores.float())``)."""
        sym: _ScoresSym | None = self.sym
        if sym is not None and self._value is None and sym.dtype == torch.float32:
            return self
        return self._fallback(_Tensor.float, (self,), None, "scores cast to float32")

    @property
    def shape(self) -> torch.Size:
        return self.settle().shape if self.sym is None else torch.Size(self.sym.current_shape)

    def _keeps_structure(self, op, other, reflected):
        # added as a whole to un-viewed scores: it reaches the router as the call's attn_mask
        sym: _ScoresSym | None = self.sym
        return (
            op is operator.add and sym is not None and self._value is None and sym.viewed is None
            and not sym.biases and other.dtype == sym.dtype and other.device == sym.device
            and _fits(sym.shape, other)
        )

    def _symbolic_binary(self, op, other, reflected):
        sym: _ScoresSym = self.sym
        shape = sym.current_shape
        if isinstance(other, StructuredMask):  # (_keeps_structure said yes)
            new = sym.copy()
            new.biases.append(other)
            return self._derive(op, (other, self) if reflected else (self, other), None, new)
        if op is operator.add or (op is operator.sub and not reflected):
            if not (isinstance(other, _Tensor) and _compatible(other, sym) and _fits(shape, other)):
                return NotImplemented
            new = sym.copy()
            term = other if op is operator.add else -other
            (new.viewed_biases if new.viewed is not None else new.biases).append(term)
            return self._derive(op, (other, self) if reflected else (self, other), None, new)
        if op is operator.mul or (op is operator.truediv and not reflected):
            if sym.viewed is not None:
                return NotImplemented
            new = sym.copy()
            if _is_number(other):
                factor = other if op is operator.mul else 1.0 / other
                new.scale = new.scale * factor
                new.biases = [b * other if op is operator.mul else b / other for b in new.biases]
            elif (
                isinstance(other, _Tensor) and _compatible(other, sym) and _fits(shape, other)
                and (other.dim() == 0 or other.shape[-1] == 1)
            ):
                # a per-row factor (Swin v2's per-head logit scale): scores[..., i, j]·c[..., i] = (q·c)[..., i]·k[..., j]
                if op is operator.truediv:
                    return NotImplemented
                new.q_mul = other if new.q_mul is None else new.q_mul * other
                new.biases = [b * other for b in new.biases]
            else:
                return NotImplemented
            return self._derive(op, (other, self) if reflected else (self, other), None, new)
        return NotImplemented

    def _reshaped(self, method: str, shape: tuple) -> Lazy | None:
        sym: _ScoresSym = self.sym
        target = _infer_shape(sym.current_shape, shape)
        if target is None:
            return None
        new = sym.copy()
        if target == sym.shape:
            # a compiled graph holds the tensor, as it does for every structure
            windowed = None if torch.compiler.is_compiling() else _windowed(new)
            if windowed is not None:
                new.biases, new.viewed, new.viewed_biases = [windowed], None, []
            elif new.viewed is not None:
                for b in new.viewed_biases:
                    unviewed = _unview_bias(b, new.viewed, new.shape)
                    if unviewed is None:
                        return None
                    new.biases.append(unviewed)
                new.viewed, new.viewed_biases = None, []
        elif new.viewed is None:
            new.viewed = target
        else:
            return None
        return self._derive(getattr(_Tensor, method), (self, *shape), None, new)

    def view(self, *shape):
        if self.sym is not None and self._value is None:
            out = self._reshaped("view", shape)
            if out is not None:
                return out
        return self._fallback(_Tensor.view, (self, *shape), None, "scores viewed in a shape we do not follow")

    def reshape(self, *shape):
        if self.sym is not None and self._value is None:
            out = self._reshaped("reshape", shape)
            if out is not None:
                return out
        return self._fallback(_Tensor.reshape, (self, *shape), None, "scores reshaped in a shape we do not follow")

    def softmax(self, dim=None, dtype=None):
        return self._softmax(_Tensor.softmax, (self,), {"dim": dim, "dtype": dtype}, dim, dtype)

    def _softmax(self, func, args, kwargs, dim, dtype):
        sym: _ScoresSym | None = self.sym
        if sym is not None and self._value is None and sym.viewed is None and isinstance(dim, int):
            last = dim in (-1, len(sym.shape) - 1)
            if last and (dtype is None or dtype == sym.dtype):
                return self._derive(func, args, kwargs, _ProbsSym(sym, 0.0, False), Probs)
            if last and dtype == torch.float32 and sym.dtype in _UPCAST_FROM:
                # transformers' eager: softmax in float32, cast back to the scores' dtype before ``@ v``
                # (the precision every attention kernel keeps its softmax in); routed only once cast back
                return self._derive(func, args, kwargs, _ProbsSym(sym, 0.0, False, dtype), Probs)
        return self._fallback(func, args, kwargs, "softmax over another dim or dtype")

    def _torch_function(self, func, args, kwargs):
        if func in _SOFTMAX_FUNCS and args and args[0] is self:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            # F.softmax(input, dim, _stacklevel, dtype); torch.softmax / Tensor.softmax(input, dim, dtype)
            dtype_at = 3 if func is F.softmax else 2
            dtype = kwargs.get("dtype", args[dtype_at] if len(args) > dtype_at else None)
            return self._softmax(func, args, kwargs, dim, dtype)
        return NotImplemented


#: score dtypes whose softmax may be taken in float32 (then cast back) and still be routed
_UPCAST_FROM = frozenset({torch.float16, torch.bfloat16})


class _ProbsSym:
    __slots__ = ("scores", "dropout_p", "transposed", "shape", "dtype", "device")

    def __init__(self, scores: _ScoresSym, dropout_p: float, transposed: bool, dtype: torch.dtype | None = None) -> None:
        self.scores, self.dropout_p, self.transposed = scores, dropout_p, transposed
        shape = scores.shape
        self.shape = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape
        #: the scores' dtype, or float32 while a softmax taken in float32 is not cast back yet
        self.dtype, self.device = dtype or scores.dtype, scores.device

    @property
    def upcast(self) -> bool:
        return self.dtype != self.scores.dtype


def _route_probs(router, probs: _ProbsSym, v: _Tensor) -> _Tensor | None:
    """``probs @ v`` through the router, or None when ``v`` does not fit."""
    s = probs.scores
    if probs.upcast:
        return None
    check_unwritten(router, s.q, s.k, s.versions)
    return route_scores(router, s.q, s.k, s.q_mul, s.scale, s.biases, s.shape, probs.dropout_p, v, s.dtype, s.device)


def route_scores(
    router, q: _Tensor, k: _Tensor, q_mul: _Tensor | None, scale: float, biases: list, shape: tuple, dropout_p: float,
    v: Any, dtype: torch.dtype, device: torch.device,
) -> _Tensor | None:
    """``softmax((q · q_mul) @ kᵀ · scale + Σ biases) @ v`` (scores shaped ``shape``, of ``dtype``
    on ``device``, dropout ``dropout_p``) as one router call; None when ``v`` does not fit."""
    kind = type(v)
    if not ((kind is _Tensor or kind is torch.nn.Parameter) and v.dtype == dtype and v.device == device):
        return None
    v_shape = v.shape
    lead = shape[:-2]
    if len(v_shape) < 2 or v_shape[-2] != shape[-1] or len(v_shape) - 2 > len(lead):
        return None
    v_lead = v_shape[:-2]
    if v_lead != lead and any(b != 1 and b != a for a, b in zip(reversed(lead), reversed(v_lead))):
        return None  # v would enlarge the batch dims: the product broadcasts, attention does not
    if q_mul is not None:
        q = q * q_mul
    q_shape = q.shape
    if q_shape[:-2] != lead:
        q = q.expand(*lead, *q_shape[-2:])
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    out = router.route(q, k, v, bias, dropout_p, False, scale)
    if not out.is_contiguous():  # what a matmul returns, and what module code may .view()
        out = out.contiguous()
    out_shape = out.shape
    if out_shape[:-2] != lead or out_shape[-2] != shape[-2] or out_shape[-1] != v_shape[-1]:
        raise wrong_output_shape(router, out_shape, (*lead, shape[-2], v_shape[-1]))
    return out


def wrong_output_shape(router: Any, got: tuple[int, ...], expected: tuple[int, ...]) -> Exception:
    """The error for a routed hand-written attention whose output is not shaped as the module's product."""
    from ..errors import AttnSwapError

    return AttnSwapError(
        f"attnswap routed a hand-written attention at site {router.site or '<root>'} and got shape "
        f"{tuple(got)}, expected {tuple(expected)}; please report this with the model name"
    )


class Probs(Lazy):
    """``softmax(scores)``, maybe with dropout or transposed: becomes the router call at ``@ v``."""

    __slots__ = ()
    _noun = "probabilities"

    def transpose(self, dim0, dim1):
        sym: _ProbsSym | None = self.sym
        if sym is not None and self._value is None:
            nd = len(sym.shape)
            if {dim0 % nd, dim1 % nd} == {nd - 2, nd - 1}:
                return self._derive(
                    _Tensor.transpose, (self, dim0, dim1), None,
                    _ProbsSym(sym.scores, sym.dropout_p, not sym.transposed, sym.dtype),
                )
        return self._fallback(_Tensor.transpose, (self, dim0, dim1), None, "probabilities transposed across batch dims")

    @property
    def mT(self):
        return self.transpose(-2, -1)

    def to(self, *args, **kwargs):
        """A cast to a dtype only: the float32 softmax cast back to the scores' dtype, or to its own."""
        sym: _ProbsSym | None = self.sym
        dtype = args[0] if len(args) == 1 and not kwargs else kwargs.get("dtype") if not args and kwargs.keys() == {"dtype"} else None
        if sym is not None and self._value is None and isinstance(dtype, torch.dtype):
            if dtype == sym.dtype:
                return self  # what Tensor.to returns for its own dtype
            if dtype == sym.scores.dtype:
                return self._derive(
                    _Tensor.to, (self, dtype), None, _ProbsSym(sym.scores, sym.dropout_p, sym.transposed, dtype)
                )
        return self._fallback(_Tensor.to, (self, *args), kwargs, "probabilities cast to another dtype or device")

    def type(self, dtype=None, **kwargs):
        if isinstance(dtype, torch.dtype) and not kwargs:
            return self.to(dtype)
        args = (self,) if dtype is None else (self, dtype)
        return self._fallback(_Tensor.type, args, kwargs, "probabilities cast to another dtype or device")

    def type_as(self, other):
        dtype = getattr(other, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return self.to(dtype)
        return self._fallback(_Tensor.type_as, (self, other), None, "probabilities cast to another dtype or device")

    def _dropout(self, func, args, kwargs, p, training):
        sym: _ProbsSym = self.sym
        if not training or p == 0:
            return self  # what F.dropout computes (in place or not): the same values
        if sym.dropout_p == 0.0 and not sym.transposed:
            return self._derive(func, args, kwargs, _ProbsSym(sym.scores, float(p), False, sym.dtype))
        return NotImplemented

    def _torch_function(self, func, args, kwargs):
        if func is F.dropout and args and args[0] is self:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return self._dropout(func, args, kwargs, p, training)
        if func in _MATMUL_FUNCS and len(args) == 2:
            return self._symbolic_binary(operator.matmul, args[1] if args[0] is self else args[0], args[1] is self)
        if func is torch.einsum and not kwargs:
            operands = args[1:] if len(args) != 2 or not isinstance(args[1], (list, tuple)) else tuple(args[1])
            if len(operands) == 2 and operands[0] is self:
                out = _einsum_probs_v(self.router, self.sym, args[0], self, operands[1])
                return NotImplemented if out is None else out
        if func in (_Tensor.transpose, torch.transpose) and args and args[0] is self:
            return self.transpose(*args[1:3])
        return NotImplemented

    def _symbolic_binary(self, op, other, reflected):
        sym: _ProbsSym = self.sym
        if op is operator.matmul and isinstance(other, _Tensor):
            if not reflected and not sym.transposed:
                out = _route_probs(self.router, sym, other)
                return NotImplemented if out is None else out
            if reflected and sym.transposed:  # v @ Pᵀ = (P @ vᵀ)ᵀ (LeViT conv mode, EfficientViT, SHViT)
                out = _route_probs(self.router, _ProbsSym(sym.scores, sym.dropout_p, False), other.transpose(-2, -1))
                return NotImplemented if out is None else out.transpose(-2, -1).contiguous()
            return NotImplemented
        if sym.transposed or sym.dropout_p or sym.upcast:
            return NotImplemented
        if op is operator.mul or (op is operator.truediv and not reflected):
            coef = _coefficient(other, sym.shape, sym, op)
            if coef is None:
                return NotImplemented
            return self._derive(op, (other, self) if reflected else (self, other), None, _MixSym([(coef, sym)], sym), Mix)
        if op is operator.add:
            if isinstance(other, _Tensor) and _compatible(other, sym.scores) and _fits(sym.shape, other):
                return self._derive(op, (other, self) if reflected else (self, other), None, _MixSym([(1.0, sym), (1.0, other)], sym), Mix)
        return NotImplemented



def _coefficient(other: Any, shape: tuple, ref: Any, op: Callable) -> Any:
    """``other`` as a per-row coefficient (a number, or a tensor with last dim 1), or None."""
    if _is_number(other):
        return other if op is operator.mul else 1.0 / other
    if (
        isinstance(other, _Tensor) and _is_plain_tensor(other) and other.dtype == ref.dtype and other.device == ref.device
        and _fits(shape, other) and (other.dim() == 0 or other.shape[-1] == 1)
    ):
        return other if op is operator.mul else 1.0 / other
    return None


class _MixSym:
    """``Σ cᵢ · termᵢ``: each term a softmax (``_ProbsSym``, no dropout) or a plain tensor;
    each coefficient per row, so ``(Σ cᵢ·Pᵢ) @ v = Σ cᵢ·(Pᵢ @ v)`` (ConViT's GPSA)."""

    __slots__ = ("terms", "shape", "dtype", "device", "ref")

    def __init__(self, terms: list, ref: Any) -> None:
        self.terms = terms
        self.ref = ref
        self.shape, self.dtype, self.device = ref.shape, ref.dtype, ref.device


class Mix(Lazy):
    """A linear combination of attention probabilities and tensors."""

    __slots__ = ()
    _noun = "mixed probabilities"

    def _symbolic_binary(self, op, other, reflected):
        sym: _MixSym = self.sym
        args = (other, self) if reflected else (self, other)
        if op is operator.matmul and not reflected and isinstance(other, _Tensor):
            total = None
            for coef, term in sym.terms:
                part = _route_probs(self.router, term, other) if isinstance(term, _ProbsSym) else term @ other
                if part is None:
                    return NotImplemented
                part = part * coef if not (_is_number(coef) and coef == 1.0) else part
                total = part if total is None else total + part
            return total
        if op is operator.mul or (op is operator.truediv and not reflected):
            coef = _coefficient(other, sym.shape, sym, op)
            if coef is None:
                return NotImplemented
            terms = [(c * coef, t) for c, t in sym.terms]
            return self._derive(op, args, None, _MixSym(terms, sym.ref))
        if op is operator.add:
            if isinstance(other, Mix) and other.sym is not None and other._value is None:
                return self._derive(op, args, None, _MixSym(sym.terms + other.sym.terms, sym.ref))
            if isinstance(other, Probs) and other.sym is not None and other._value is None and not other.sym.transposed and not other.sym.dropout_p:
                return self._derive(op, args, None, _MixSym(sym.terms + [(1.0, other.sym)], sym.ref))
            if isinstance(other, _Tensor) and _compatible(other, sym) and _fits(sym.shape, other):
                return self._derive(op, args, None, _MixSym(sym.terms + [(1.0, other)], sym.ref))
        return NotImplemented

    def sum(self, dim=None, keepdim=False, dtype=None):
        """Row sums (``dim=-1``) without the probabilities: a softmax row sums to one."""
        sym: _MixSym | None = self.sym
        if sym is not None and self._value is None and isinstance(dim, int) and dim in (-1, len(sym.shape) - 1) and dtype is None:
            rows = sym.shape[:-1]
            total = None
            for coef, term in sym.terms:
                part = term.sum(dim=-1) if isinstance(term, _Tensor) else torch.ones(rows, dtype=sym.dtype, device=sym.device)
                if not _is_number(coef) or coef != 1.0:
                    part = part * (coef.squeeze(-1) if isinstance(coef, _Tensor) and coef.dim() else coef)
                total = part if total is None else total + part
            total = total.expand(rows) if tuple(total.shape) != tuple(rows) else total
            return total.unsqueeze(-1) if keepdim else total
        return self._fallback(_Tensor.sum, (self,), {"dim": dim, "keepdim": keepdim, "dtype": dtype}, "mixed probabilities summed")

    def _torch_function(self, func, args, kwargs):
        if func is F.dropout and args and args[0] is self:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if not training or p == 0:
                return self
        if func in _MATMUL_FUNCS and len(args) == 2 and args[0] is self:
            return self._symbolic_binary(operator.matmul, args[1], False)
        return NotImplemented



def product_facts(a: Any, b: Any, bmm: bool) -> tuple[tuple[int, ...], torch.dtype, torch.device] | None:
    """The shape, dtype and device of ``a @ b`` (``torch.bmm`` when ``bmm``) when it may be
    attention scores ``q @ kᵀ``: plain floating tensors of one dtype and device that multiply;
    else None."""
    if not (_is_plain_tensor(a) and _is_plain_tensor(b)):
        return None
    a_shape, b_shape = a.shape, b.shape  # each .shape builds a torch.Size: read once
    dtype, device = a.dtype, a.device
    if (
        len(a_shape) < 2 or len(b_shape) < 2
        or dtype != b.dtype or not dtype.is_floating_point or device != b.device
        or a_shape[-1] != b_shape[-2]
    ):
        return None
    lead = broadcast(a_shape[:-2], b_shape[:-2])
    if lead is None:
        return None
    if bmm and (len(a_shape) != 3 or len(b_shape) != 3 or a_shape[0] != b_shape[0]):
        return None
    return (*lead, a_shape[-2], b_shape[-1]), dtype, device


def scores_or_product(router: Any, a: Any, b: Any, op: Callable = operator.matmul) -> Any:
    """``a @ b`` as the module wrote it, or a :class:`Scores` when it may be ``q @ kᵀ``."""
    facts = None if router is None else product_facts(a, b, op is torch.bmm)
    if facts is None:
        return op(a, b)
    return Scores(router, (op, (a, b), {}), _ScoresSym(a, b.transpose(-2, -1), facts[0]))


def _einsum_specs(equation: Any, operands: tuple) -> tuple[list[str], str] | None:
    """``equation``'s operand and output subscripts, ``...`` spelled out as letters the equation
    does not use and spaces dropped; None for an implicit output, repeated letters in one
    operand or anything else attention is not written with."""
    if not isinstance(equation, str) or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    specs = lhs.split(",")
    if len(specs) != len(operands) or not all(isinstance(t, (_Tensor, Lazy)) for t in operands):
        return None
    spare = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if c not in equation]
    widest = max((t.dim() - (len(sp) - 3) for sp, t in zip(specs, operands) if "..." in sp), default=0)
    if widest > len(spare):
        return None
    dots = "".join(spare[:widest])
    expanded = []
    for sp, t in zip(specs, operands):
        if "..." in sp:
            n = t.dim() - (len(sp) - 3)
            sp = sp.replace("...", dots[widest - n:] if n else "")
        if len(sp) != t.dim() or len(set(sp)) != len(sp) or not sp.isalpha():
            return None
        expanded.append(sp)
    out = out.replace("...", dots)
    if len(set(out)) != len(out) or not out.isalpha():
        return None
    return expanded, out


def _arranged(t: _Tensor, spec: str, order: str) -> _Tensor:
    """``t`` (subscripts ``spec``) with its dims in ``order``, size 1 where ``spec`` lacks a letter (views)."""
    present = [c for c in order if c in spec]
    t = t.permute([spec.index(c) for c in present])
    for pos, c in enumerate(order):
        if c not in spec:
            t = t.unsqueeze(pos)
    return t


def einsum_scores(router: Any, equation: Any, *operands: Any) -> Any:
    """``torch.einsum(equation, a, b)`` as the module wrote it, or a :class:`Scores` when it is
    ``q·kᵀ``: one contracted letter (the head dim), the output ending in a letter of ``a`` only
    (query rows) and one of ``b`` only (keys), every other letter a batch dim of the output (in
    both operands, or broadcast from one: multi-query k/v). The scores replay the einsum itself."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    parsed = None
    if router is not None and len(operands) == 2:
        a, b = operands
        if _is_plain_tensor(a) and _is_plain_tensor(b) and a.dtype == b.dtype and a.dtype.is_floating_point and a.device == b.device:
            parsed = _einsum_specs(equation, operands)
    if parsed is None:
        return _plain_einsum(router, equation, operands)
    (sa, sb), out = parsed
    contracted = [c for c in sa if c in sb and c not in out]
    if len(contracted) != 1 or len(out) < 2:
        return _plain_einsum(router, equation, operands)
    d, batch, i, j = contracted[0], out[:-2], out[-2], out[-1]
    # rows are independent in attention: the output's last two letters are query and key, every
    # other output letter is a batch dim, in both operands or broadcast from one (multi-query)
    if i not in sa or i in sb or j not in sb or j in sa:
        return _plain_einsum(router, equation, operands)
    if any(c not in batch + i + d for c in sa) or any(c not in batch + j + d for c in sb):
        return _plain_einsum(router, equation, operands)  # a letter summed away that is not the head dim
    q = _arranged(a, sa, batch + i + d)
    k = _arranged(b, sb, batch + j + d)
    lead = broadcast(q.shape[:-2], k.shape[:-2])
    if lead is None:
        return _plain_einsum(router, equation, operands)
    shape = (*lead, q.shape[-2], k.shape[-2])
    return Scores(router, (torch.einsum, (equation, a, b), {}), _ScoresSym(q, k, shape))


def _plain_einsum(router: Any, equation: Any, operands: tuple) -> _Tensor:
    """The einsum as written, counted as unrouted when it feeds a softmax at a routed site."""
    if router is not None:
        router.note_settled(f"einsum {equation!r} is not q·kᵀ in a layout attention can take")
    return torch.einsum(equation, *operands)


def _einsum_probs_v(router: Any, probs: _ProbsSym, equation: Any, p_operand: Any, v: Any) -> _Tensor | None:
    """``torch.einsum(equation, P, v)`` for symbolic probabilities ``P``: the router call, its
    output in the equation's layout; None when the einsum is not ``P·v`` over the key letter."""
    if probs.transposed or not _is_plain_tensor(v):
        return None
    parsed = _einsum_specs(equation, (p_operand, v))
    if parsed is None:
        return None
    (sp, sv), out = parsed
    if len(sp) != len(probs.shape):
        return None
    batch, i, j = sp[:-2], sp[-2], sp[-1]
    free = [c for c in sv if c not in sp]
    if len(free) != 1 or j not in sv or j in out or any(c not in batch + j for c in sv if c != free[0]):
        return None
    canonical = batch + i + free[0]
    if sorted(out) != sorted(canonical):
        return None
    result = _route_probs(router, probs, _arranged(v, sv, batch + j + free[0]))
    if result is None or out == canonical:
        return result
    return result.permute([canonical.index(c) for c in out]).contiguous()


def additive(router: Any, fn: Callable, scores: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(scores, ...)`` for a function known to return ``scores + g(...)``: the bias ``g`` is
    found by applying ``fn`` to zeros, so the scores stay symbolic."""
    if isinstance(scores, Scores) and scores.sym is not None and scores._value is None and scores.sym.viewed is None:
        sym: _ScoresSym = scores.sym
        # the term as a structure (MViTv2's decomposed rel-pos); a compiled graph holds the tensor,
        # as it does for every structure
        bias_of = None if torch.compiler.is_compiling() else additive_bias_for(fn)
        bias = None if bias_of is None else bias_of(scores, *args, **kwargs)
        if bias is None or tuple(bias.shape) != tuple(sym.shape) or bias.dtype != sym.dtype:
            bias = fn(torch.zeros(sym.shape, dtype=sym.dtype, device=sym.device), *args, **kwargs)
        return scores + bias
    return fn(_settled(scores), *args, **kwargs)
