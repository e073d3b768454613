"""What every backend is: SDPA's signature plus its declared limits.

A backend declares, as data (:class:`Limits`, per device type), what it can take; the
router asks :meth:`Backend.reasons` for every reason it cannot serve one call and never
calls it with anything outside those limits.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch

from ..call import MASK_ADDITIVE, MASK_BOOL, CallFacts

AttentionFn = Callable[..., torch.Tensor]
SupportsFn = Callable[[CallFacts], Sequence[str]]

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def dtype_name(dtype: torch.dtype | None) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")) if dtype is not None else "none"


@dataclass(frozen=True)
class Limits:
    """What a backend accepts on one device type. The defaults accept everything SDPA does.

    ``ndims`` are the input ranks the kernel takes natively; when 4 is among them the router
    reshapes other ranks to 4-D (a view where possible) instead of refusing.
    """

    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    ndims: frozenset[int] | None = None
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    v_head_dim_differs: bool = True
    additive_mask: bool = True
    bool_mask: bool = True
    mask_grad: bool = True
    mask_ndims: frozenset[int] | None = None
    mask_dtype_matches_query: bool = False
    causal: bool = True
    causal_unequal_lengths: bool = True
    unequal_lengths: bool = True
    gqa: bool = True
    kv_head_broadcast: bool = True
    kv_batch_broadcast: bool = True
    dropout: bool = True
    custom_scale: bool = True
    backward: bool = True
    #: False: dynamo cannot trace the kernel (no torch.library op); refused inside torch.compile
    compile: bool = True
    min_cuda_capability: tuple[int, int] | None = None
    max_cuda_capability: tuple[int, int] | None = None

    def summary(self) -> dict[str, Any]:
        """Only the fields that differ from "accepts everything", for tables and JSON."""
        default = Limits()
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                if isinstance(value, frozenset):
                    value = sorted(dtype_name(v) if isinstance(v, torch.dtype) else v for v in value)
                out[f.name] = value
        return out


def limit_reasons(limits: Limits, facts: CallFacts, capability: tuple[int, int] | None = None) -> list[str]:
    """Every reason ``facts`` falls outside ``limits`` (empty: the call is inside them)."""
    r: list[str] = []
    if limits.devices is not None and facts.device_type not in limits.devices:
        r.append(f"device {facts.device_type} (supported: {', '.join(sorted(limits.devices))})")
    if limits.dtypes is not None and facts.dtype not in limits.dtypes:
        r.append(f"dtype {dtype_name(facts.dtype)} (supported: {', '.join(sorted(dtype_name(d) for d in limits.dtypes))})")
    if capability is not None:
        if limits.min_cuda_capability is not None and capability < limits.min_cuda_capability:
            r.append(
                "requires a GPU with compute capability >= %d.%d, this one has %d.%d"
                % (*limits.min_cuda_capability, *capability)
            )
        if limits.max_cuda_capability is not None and capability > limits.max_cuda_capability:
            r.append(
                "requires a GPU with compute capability <= %d.%d, this one has %d.%d"
                % (*limits.max_cuda_capability, *capability)
            )
    if limits.ndims is not None and facts.ndim not in limits.ndims:
        r.append(f"{facts.ndim}-D inputs (supported: {', '.join(f'{n}-D' for n in sorted(limits.ndims))})")
    e, ev = facts.head_dim, facts.v_head_dim
    if limits.max_head_dim is not None:
        for label, d in (("head_dim", e), ("value head_dim", ev)):
            if d > limits.max_head_dim:
                r.append(f"{label} {d} > {limits.max_head_dim}")
    if limits.head_dim_multiple > 1:
        for label, d in (("head_dim", e), ("value head_dim", ev)):
            if d % limits.head_dim_multiple:
                r.append(f"{label} {d} is not a multiple of {limits.head_dim_multiple}")
    if not limits.v_head_dim_differs and ev != e:
        r.append(f"value head_dim {ev} differs from query/key head_dim {e}")
    if facts.mask_kind == MASK_ADDITIVE and not limits.additive_mask:
        r.append("additive attn_mask (bias) not supported")
    if facts.mask_kind == MASK_BOOL and not limits.bool_mask:
        r.append("boolean attn_mask not supported")
    if facts.has_mask:
        if facts.mask_requires_grad and facts.needs_grad and not limits.mask_grad:
            r.append("attn_mask requires grad (no gradient for the mask)")
        if limits.mask_ndims is not None and facts.mask_shape is not None and len(facts.mask_shape) not in limits.mask_ndims:
            r.append(
                f"{len(facts.mask_shape)}-D attn_mask (supported: {', '.join(f'{n}-D' for n in sorted(limits.mask_ndims))})"
            )
        if limits.mask_dtype_matches_query and facts.mask_kind == MASK_ADDITIVE and facts.mask_dtype != facts.dtype:
            r.append(
                f"additive attn_mask dtype {dtype_name(facts.mask_dtype)} differs from query dtype {dtype_name(facts.dtype)}"
            )
    if facts.is_causal:
        if not limits.causal:
            r.append("is_causal not supported")
        elif facts.q_len != facts.kv_len and not limits.causal_unequal_lengths:
            r.append(f"is_causal with q_len {facts.q_len} != kv_len {facts.kv_len} (top-left causal not supported)")
    if facts.q_len != facts.kv_len and not limits.unequal_lengths:
        r.append(f"q_len {facts.q_len} != kv_len {facts.kv_len}")
    if facts.grouped_heads:
        if facts.enable_gqa and not limits.gqa:
            r.append(f"grouped-query attention ({facts.q_heads} query heads, {facts.kv_heads} key/value heads)")
        elif not facts.enable_gqa and not limits.kv_head_broadcast:
            r.append(f"key/value head dim of size {facts.kv_heads} broadcast over {facts.q_heads} query heads")
    if facts.ndim >= 4 and facts.kv_batch_broadcast and not limits.kv_batch_broadcast:
        r.append("query and key/value batch dims differ (broadcasting)")
    if facts.dropout_p > 0 and not limits.dropout:
        r.append(f"dropout_p={facts.dropout_p} (no dropout support)")
    if facts.scale is not None and not limits.custom_scale:
        r.append(f"custom scale {facts.scale:g} not supported")
    if facts.needs_grad and not limits.backward:
        r.append("needs backward (this backend is forward-only here)")
    if facts.in_graph and not limits.compile:
        r.append("inside torch.compile (the kernel cannot be traced)")
    return r


def head_count_reasons(facts: CallFacts, *, same_kv_heads: bool) -> list[str]:
    """The fused kernels' head-count rule (PyTorch's ``check_batch_size_and_num_heads_dense``;
    flash-attn and SageAttention check the same): k/v heads equal q's, or 1 broadcast, or
    with ``enable_gqa`` a divisor of q's."""
    hq, hk, hv = facts.q_heads, facts.kv_heads, facts.v_shape[-3] if len(facts.v_shape) >= 3 else 1
    if hq == hk == hv:
        return []
    if not facts.enable_gqa:
        if hk == hv == 1:
            return []
        return [f"query heads {hq} vs key/value heads {hk}/{hv} without enable_gqa (only equal counts or 1 broadcast)"]
    out = []
    if same_kv_heads and hk != hv:
        out.append(f"key heads {hk} != value heads {hv}")
    if hq % hk or hq % hv:
        out.append(f"query heads {hq} not divisible by key/value heads {hk}/{hv}")
    return out



@functools.lru_cache(maxsize=None)
def cuda_capability(index: int | None) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def _reshape_helps(limits: Limits, facts: CallFacts) -> bool:
    """The kernel takes 4-D but not this call's rank (or mask rank): the router can reshape."""
    if limits.ndims is not None and facts.ndim not in limits.ndims and 4 in limits.ndims:
        return True
    if limits.mask_ndims is not None and facts.mask_shape is not None and 4 in limits.mask_ndims:
        return len(facts.mask_shape) not in limits.mask_ndims
    return False


class Backend:
    """Base class of every backend. Subclasses set the class attributes and ``__call__``.

    ``__call__`` has exactly ``torch.nn.functional.scaled_dot_product_attention``'s signature
    and semantics (``is_causal`` is top-left aligned, like SDPA's).
    """

    name: str = ""
    description: str = ""
    install_hint: str = ""
    #: False for approximate kernels (8-bit); the router never falls back *to* them.
    exact: bool = True
    #: True when every call is accepted on every device (the router then skips the per-call checks).
    accepts_everything: bool = False
    #: kinds of structured bias (``attnswap.structure``) this backend computes from their parts;
    #: it gets every other bias as the tensor it stands for
    structures: frozenset[str] = frozenset()
    #: compiles a kernel per call shape (flex): never given one call per sequence of a padded
    #: batch, whose lengths change from batch to batch
    compiles_per_shape: bool = False

    def limits(self, device_type: str) -> Limits | None:
        """The limits on ``device_type``; ``None`` means no limits."""
        return None

    def check_available(self) -> str | None:
        """Why this backend cannot run in this process at all, or None. Called once, then cached."""
        return None

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        """Reasons that :class:`Limits` cannot express (versions, runtime switches, odd rules)."""
        return []

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        try:
            return self.check_available()
        except Exception as exc:  # a broken optional install must become a reason, not a crash
            return f"probe failed: {type(exc).__name__}: {exc}"

    def reasons(self, facts: CallFacts) -> tuple[list[str], bool]:
        """Every reason this backend cannot serve ``facts``, and whether it needs the 4-D reshape."""
        limits = self.limits(facts.device_type)
        to_4d = False
        if limits is not None and _reshape_helps(limits, facts):
            facts = facts.as_4d()
            to_4d = True
        out: list[str] = []
        if limits is not None:
            cap = None
            if facts.device_type == "cuda" and (limits.min_cuda_capability or limits.max_cuda_capability):
                cap = cuda_capability(facts.device_index)
            out.extend(limit_reasons(limits, facts, cap))
        out.extend(self.extra_reasons(facts))
        return out, to_4d

    def structure_reasons(self, facts: CallFacts) -> list[str]:
        """Why this backend cannot take this call's structured bias as parts (one of
        :attr:`structures`); the call then reaches it with the tensor."""
        return []

    def varlen_reasons(self, facts: CallFacts) -> list[str]:
        """Why this backend cannot run a padded batch as packed sequences (:meth:`varlen`).
        ``facts`` are those of one sequence's call without a mask (its limits apply as well)."""
        return ["no variable-length kernel (packed sequences)"]

    def varlen(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        lengths_q: list[int],
        lengths_k: list[int],
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """Attention within each of several sequences packed along dim 0: ``query [Tq, H, E]``,
        ``key``/``value [Tk, Hk, E]``, sequence ``i`` at rows ``cu_seqlens[i]:cu_seqlens[i + 1]``
        (int32, on the device; ``lengths_*`` are the same lengths as Python ints). No attention
        across sequences, no mask, no dropout. Returns ``[Tq, H, Ev]``. Only called where
        :meth:`varlen_reasons` gave none."""
        raise NotImplementedError

    @property
    def kernel(self) -> AttentionFn:
        """What the router calls: ``kernel(q, k, v, attn_mask, dropout_p, is_causal, scale=, enable_gqa=)``.

        ``__call__`` by default; a backend that *is* a builtin function returns it, saving a
        Python frame per call.
        """
        return self.__call__

    def kernel_for(self, facts: CallFacts) -> AttentionFn:
        """What the router calls for every call with these facts (a backend it can serve), in
        :attr:`kernel`'s convention. A backend whose work depends on facts that are fixed per
        call signature (a mask's kind, the head dim) decides it here once, not at every call."""
        return self.kernel

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attnswap backend {self.name!r}>"


_KERNEL_PARAMETERS = ("attn_mask", "dropout_p", "is_causal")


def _takes_kernel_convention(fn: Callable) -> bool:
    """``fn(q, k, v, attn_mask, dropout_p, is_causal, scale=, enable_gqa=)`` means what
    ``fn(q, k, v, attn_mask=, dropout_p=, is_causal=, scale=, enable_gqa=)`` means: its 4th to
    6th parameters are those names, passable by position, and it takes ``scale`` and
    ``enable_gqa`` by keyword."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) < 6 or any(p.kind not in positional for p in params[:6]):
        return False
    if tuple(p.name for p in params[3:6]) != _KERNEL_PARAMETERS or params[3].kind is inspect.Parameter.POSITIONAL_ONLY:
        return False
    names = {p.name: p for p in params[6:]}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return all(n in names and names[n].kind in keyword for n in ("scale", "enable_gqa"))


class FunctionBackend(Backend):
    """A user function registered with :func:`attnswap.register_backend`."""

    def __init__(
        self,
        name: str,
        fn: AttentionFn,
        *,
        supports: SupportsFn | None = None,
        limits: Limits | dict[str, Limits] | None = None,
        description: str = "",
        exact: bool = True,
        varlen: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.varlen_fn = varlen
        self.supports = supports
        self._limits = limits
        self.description = description or (fn.__doc__ or "").strip().split("\n")[0]
        self.exact = exact
        self.accepts_everything = supports is None and limits is None

    def limits(self, device_type: str) -> Limits | None:
        if isinstance(self._limits, dict):
            return self._limits.get(device_type, self._limits.get("*"))
        return self._limits

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        if self.supports is None:
            return []
        out = self.supports(facts)
        if isinstance(out, str):  # a lone string is one reason, not a list of characters
            return [out]
        return [str(r) for r in (out or [])]

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return self.fn(
            query, key, value,
            attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )

    @property
    def kernel(self) -> AttentionFn:
        # the function itself when it takes the kernel convention as it stands (SDPA's own
        # parameter order): one Python frame less per call
        return self.fn if _takes_kernel_convention(self.fn) else self.__call__

    def varlen_reasons(self, facts: CallFacts) -> list[str]:
        return super().varlen_reasons(facts) if self.varlen_fn is None else []

    def varlen(self, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lengths_q, lengths_k,
               scale=None, enable_gqa=False):
        return self.varlen_fn(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, enable_gqa=enable_gqa
        )
