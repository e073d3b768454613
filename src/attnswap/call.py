"""The facts of one attention call, the only thing backends judge.

A call has ``scaled_dot_product_attention``'s signature: ``query`` is ``[..., Hq, L, E]``,
``key`` ``[..., Hkv, S, E]``, ``value`` ``[..., Hkv, S, Ev]``; leading dims are batch dims
that broadcast, ``attn_mask`` broadcasts to ``[..., Hq, L, S]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

MASK_NONE = "none"
MASK_BOOL = "bool"
MASK_ADDITIVE = "additive"


@dataclass(frozen=True)
class CallFacts:
    """Everything about one call that decides which backend may serve it."""

    device_type: str
    device_index: int | None
    dtype: torch.dtype
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    kv_dtypes_match: bool
    mask_kind: str = MASK_NONE
    mask_shape: tuple[int, ...] | None = None
    mask_dtype: torch.dtype | None = None
    mask_requires_grad: bool = False
    is_causal: bool = False
    dropout_p: float = 0.0
    scale: float | None = None
    enable_gqa: bool = False
    needs_grad: bool = False
    #: the call is being traced into a torch.compile graph (decided once, at trace time)
    in_graph: bool = False
    #: the additive mask is carried as its parts (``attnswap.structure``): its kind and constants
    structure: tuple | None = None

    @property
    def ndim(self) -> int:
        return len(self.q_shape)

    @property
    def q_len(self) -> int:
        return self.q_shape[-2]

    @property
    def kv_len(self) -> int:
        return self.k_shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q_shape[-1]

    @property
    def v_head_dim(self) -> int:
        return self.v_shape[-1]

    @property
    def q_heads(self) -> int:
        return self.q_shape[-3] if self.ndim >= 3 else 1

    @property
    def kv_heads(self) -> int:
        return self.k_shape[-3] if len(self.k_shape) >= 3 else 1

    @property
    def grouped_heads(self) -> bool:
        """k/v have fewer heads than q (GQA/MQA, or a size-1 head dim that broadcasts)."""
        return self.kv_heads != self.q_heads

    @property
    def kv_batch_broadcast(self) -> bool:
        """k/v batch dims (all but the last three) differ from q's, so they broadcast."""
        return self.q_shape[:-3] != self.k_shape[:-3] or self.q_shape[:-3] != self.v_shape[:-3]

    @property
    def has_mask(self) -> bool:
        return self.mask_kind != MASK_NONE

    @property
    def structure_kind(self) -> str | None:
        return None if self.structure is None else self.structure[0]

    def as_4d(self) -> CallFacts:
        """The facts of the same call after :func:`to_4d` reshaped it."""
        if self.ndim == 4 and (self.mask_shape is None or len(self.mask_shape) == 4):
            return self

        def four(shape: tuple[int, ...]) -> tuple[int, ...]:
            if len(shape) <= 4:
                return (1,) * (4 - len(shape)) + tuple(shape)
            lead = 1
            for s in shape[:-3]:
                lead *= s
            return (lead, *shape[-3:])

        mask_shape = None
        if self.mask_shape is not None:
            padded = (1,) * max(0, self.ndim - len(self.mask_shape)) + tuple(self.mask_shape)
            if len(padded) > 4:
                lead = padded[:-3]
                q_lead = self.q_shape[:-3]
                merged = 1 if all(s == 1 for s in lead) else _prod(q_lead)
                padded = (merged, *padded[-3:])
            mask_shape = (1,) * (4 - len(padded)) + padded
        return replace(
            self,
            q_shape=four(self.q_shape),
            k_shape=four(self.k_shape),
            v_shape=four(self.v_shape),
            mask_shape=mask_shape,
        )

    def cast_to(self, dtype: torch.dtype) -> CallFacts:
        """The facts of the same call with q/k/v (and an additive mask) cast to ``dtype``."""
        mask_dtype = dtype if self.mask_kind == MASK_ADDITIVE else self.mask_dtype
        return replace(self, dtype=dtype, mask_dtype=mask_dtype)

    def describe(self) -> str:
        def t(shape: tuple[int, ...]) -> str:
            return "(" + ", ".join(str(s) for s in shape) + ")"

        dev = self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"
        dtype = str(self.dtype).replace("torch.", "")
        parts = [f"query{t(self.q_shape)} key{t(self.k_shape)} value{t(self.v_shape)} {dtype} on {dev}"]
        if self.has_mask:
            mdt = str(self.mask_dtype).replace("torch.", "")
            grad = ", requires_grad" if self.mask_requires_grad else ""
            kind = self.mask_kind if self.structure is None else f"{self.structure[0]} (structured)"
            parts.append(f"{kind} attn_mask{t(self.mask_shape or ())} {mdt}{grad}")
        if self.is_causal:
            parts.append("is_causal")
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        if self.enable_gqa:
            parts.append("enable_gqa")
        if self.needs_grad:
            parts.append("needs grad")
        if self.in_graph:
            parts.append("inside torch.compile")
        return ", ".join(parts)


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def facts_of(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> CallFacts:
    """Collect the facts of one call (tensors are read, never copied)."""
    structure = None
    if attn_mask is None:
        kind, mshape, mdtype, mgrad = MASK_NONE, None, None, False
    else:
        kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_ADDITIVE
        mshape, mdtype, mgrad = tuple(attn_mask.shape), attn_mask.dtype, attn_mask.requires_grad
        if getattr(type(attn_mask), "attnswap_structure", False):  # an attnswap.structure.StructuredMask
            structure = attn_mask.layout()
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad or mgrad)
    device = query.device
    return CallFacts(
        device_type=device.type,
        device_index=device.index,
        dtype=query.dtype,
        q_shape=tuple(query.shape),
        k_shape=tuple(key.shape),
        v_shape=tuple(value.shape),
        kv_dtypes_match=key.dtype == query.dtype and value.dtype == query.dtype,
        mask_kind=kind,
        mask_shape=mshape,
        mask_dtype=mdtype,
        mask_requires_grad=mgrad,
        is_causal=bool(is_causal),
        dropout_p=float(dropout_p),
        scale=None if scale is None else float(scale),
        enable_gqa=bool(enable_gqa),
        needs_grad=bool(grad),
        structure=structure,
    )


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of shapes, or None if they do not broadcast. (``torch.broadcast_shapes``
    runs a Python reference implementation costing tens of µs; this runs on hot paths.)"""
    if len(shapes) == 2 and shapes[0] == shapes[1]:  # the common case, at a tenth of the cost
        return tuple(shapes[0])
    n = max(len(s) for s in shapes)
    out = [1] * n
    for shape in shapes:
        for i, size in enumerate(shape, n - len(shape)):
            if size != 1:
                if out[i] == 1:
                    out[i] = size
                elif out[i] != size:
                    return None
    return tuple(out)


def to_4d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]:
    """Reshape a 2-D, 3-D or ≥5-D call to ``[B, H, L, E]`` for kernels that only take 4-D.

    Leading batch dims are merged (a view when their strides allow, else a copy); the mask
    is left-padded to the query's rank, then merged the same way. Returns the 4-D tensors and
    a function that gives the output its original shape back. Semantics are unchanged: the
    merged dims are pure batch dims in SDPA.
    """
    ndim = query.dim()
    out_lead = query.shape[:-3] if ndim > 3 else ()

    def four(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t
        if t.dim() < 4:
            return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        return t.flatten(0, t.dim() - 4)

    q4, k4, v4 = four(query), four(key), four(value)
    m4 = None
    if attn_mask is not None:
        if getattr(type(attn_mask), "attnswap_structure", False):  # a structured mask reshapes its parts
            m4 = attn_mask.as_4d(query.shape)
        else:
            m4 = mask_to_4d(attn_mask, query.shape)

    if ndim == 4:
        return q4, k4, v4, m4, _identity
    if ndim < 4:
        def restore(out: torch.Tensor, _n: int = 4 - ndim) -> torch.Tensor:
            return out.reshape(out.shape[_n:])
    else:
        def restore(out: torch.Tensor, _lead: tuple[int, ...] = tuple(out_lead)) -> torch.Tensor:
            return out.reshape(*_lead, *out.shape[1:])
    return q4, k4, v4, m4, restore


def mask_to_4d(mask: torch.Tensor, q_shape: tuple[int, ...]) -> torch.Tensor:
    """``mask`` (or any tensor with a mask's leading dims and two trailing dims) as :func:`to_4d`
    reshapes the mask of a call whose query has shape ``q_shape``."""
    ndim = len(q_shape)
    m = mask
    if m.dim() < ndim:
        m = m.reshape((1,) * (ndim - m.dim()) + tuple(m.shape))
    if m.dim() > 4:
        lead = m.shape[:-3]
        if all(s == 1 for s in lead):
            m = m.reshape((1,) + tuple(m.shape[-3:]))
        else:
            m = m.expand(*q_shape[:-3], *m.shape[-3:]).flatten(0, m.dim() - 4)
    if m.dim() < 4:
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    return m


def _identity(out: torch.Tensor) -> torch.Tensor:
    return out


DTYPES = {
    str(d).replace("torch.", ""): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32, torch.int64)
}
DTYPE_NAMES = {d: n for n, d in DTYPES.items()}


def facts_key(f: CallFacts) -> tuple:
    """The facts of a call being traced, as plain constants dynamo can hand to an eagerly run function."""
    return (
        f.device_type, f.device_index, DTYPE_NAMES[f.dtype], f.q_shape, f.k_shape, f.v_shape, f.kv_dtypes_match,
        f.mask_kind, f.mask_shape, None if f.mask_dtype is None else DTYPE_NAMES[f.mask_dtype], f.mask_requires_grad,
        f.is_causal, f.dropout_p, f.scale, f.enable_gqa, f.needs_grad, f.structure, True,
    )


def facts_from_key(key: tuple) -> CallFacts:
    (dev, idx, dtype, qs, ks, vs, kvm, mk, ms, mdt, mrg, causal, p, scale, gqa, grad, structure, in_graph) = key
    return CallFacts(
        device_type=dev, device_index=idx, dtype=DTYPES[dtype], q_shape=tuple(qs), k_shape=tuple(ks),
        v_shape=tuple(vs), kv_dtypes_match=kvm, mask_kind=mk, mask_shape=None if ms is None else tuple(ms),
        mask_dtype=None if mdt is None else DTYPES[mdt], mask_requires_grad=mrg, is_causal=causal,
        dropout_p=p, scale=scale, enable_gqa=gqa, needs_grad=grad, in_graph=in_graph,
        structure=None if structure is None else tuple(structure),
    )
