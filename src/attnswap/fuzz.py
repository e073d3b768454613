"""Fuzzing a backend against float64 reference math: is it ever wrong?

A kernel is trusted until a fuzz says otherwise (``DESIGN.md``, "Trust is measured"). This
module draws random attention calls with the variety real models produce (ranks 3 to 5,
masks of every kind and broadcast shape, rows with no key left, causal, custom scale,
grouped heads, unequal lengths and head dims, strided layouts such as timm's fused qkv,
gradients) and checks that a backend, through a router exactly as a patched model would
call it, either returns what float64 ``eager`` computes or refuses with reasons. A refusal
is fine; a wrong answer (or an exception other than a refusal) is a defect.

    >>> from attnswap.fuzz import fuzz
    >>> report = fuzz("sdpa_flash", calls=1000)
    >>> report.wrong                      # every wrong answer, with the call that gave it
    []

``specs`` bounds how many distinct call signatures the calls draw from (each then gets
fresh values): for a backend that compiles per signature (``flex``) that bounds the
compiles, while every call still runs on new data. ``attnswap fuzz`` is the command.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .backends.eager import eager_attention
from .errors import UnsupportedCall

#: largest error allowed, relative to the reference's scale (max |ref|, at least 1), per dtype
OUTPUT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
GRAD_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}

_MASKS = ("none", "none", "bool", "additive", "causal")
_LAYOUTS = ("contiguous", "contiguous", "heads_last", "fused_qkv", "strided_head_dim")


@dataclass(frozen=True)
class CallSpec:
    """A random call's shape, options and layout: everything but the values."""

    lead: tuple[int, ...]
    kv_lead: tuple[int, ...]
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    mask: str = "none"
    mask_shape: tuple[int, ...] | None = None
    #: fraction of mask entries that drop a key (bool False / -inf)
    mask_drop: float = 0.0
    #: query rows whose every key is masked
    masked_rows: tuple[int, ...] = ()
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    grad: bool = False
    layout: str = "contiguous"

    def describe(self) -> str:
        q = (*self.lead, self.q_heads, self.q_len, self.head_dim)
        k = (*self.kv_lead, self.kv_heads, self.kv_len, self.head_dim)
        v = (*self.kv_lead, self.kv_heads, self.kv_len, self.v_head_dim)
        parts = [f"q{q} k{k} v{v} {str(self.dtype)[6:]} {self.layout}"]
        if self.mask in ("bool", "additive"):
            parts.append(f"{self.mask} mask {self.mask_shape} drop {self.mask_drop:g}")
            if self.masked_rows:
                parts.append(f"rows {list(self.masked_rows)} fully masked")
        if self.is_causal:
            parts.append("causal")
        if self.scale is not None:
            parts.append(f"scale {self.scale:.3g}")
        if self.enable_gqa:
            parts.append("enable_gqa")
        if self.grad:
            parts.append("with backward")
        return ", ".join(parts)


def _length(rng: random.Random, max_len: int) -> int:
    """A sequence length: uniform, or (half the time) at the edge of a 4-, 8- or 16-wide tile."""
    if rng.random() < 0.5:
        return rng.randint(1, max_len)
    edges = [n for n in range(1, max_len + 1) if n % 16 in (0, 1, 4, 8, 12, 15)]
    return rng.choice(edges)


def draw_spec(rng: random.Random, dtype: torch.dtype, *, max_len: int = 48, grad: bool | None = None) -> CallSpec:
    """One random call signature. Head dims and lengths favour small and odd sizes and the
    tails of 8- and 16-wide tiles, where vectorized kernels take their edge paths."""
    ndim = rng.choice((3, 4, 4, 4, 5))
    q_heads = rng.choice((1, 2, 3, 4, 6))
    gqa = ndim >= 4 and rng.random() < 0.25
    kv_heads = rng.choice([h for h in (1, 2, 3) if q_heads % h == 0]) if gqa else q_heads
    if ndim >= 4 and not gqa and rng.random() < 0.1:
        kv_heads = 1  # one key/value head broadcast without enable_gqa (MQA)
    lead = tuple(rng.randint(1, 3) for _ in range(ndim - 3))
    kv_lead = lead
    if lead and rng.random() < 0.08:
        kv_lead = (1, *lead[1:])  # key/value broadcast over the first batch dim
    q_len = _length(rng, max_len)
    kv_len = q_len if rng.random() < 0.5 else _length(rng, max_len)
    head_dim = rng.choice((1, 2, 3, 4, 5, 7, 8, 8, 12, 16, 16, 20, 24, 31, 32, 32, 40, 48, 64, 64, 80, 96, 128))
    v_head_dim = head_dim if rng.random() < 0.8 else rng.choice((4, 8, 16, 24, 32, 64))
    mask = rng.choice(_MASKS)
    mask_shape = None
    drop = 0.0
    masked_rows: tuple[int, ...] = ()
    if mask in ("bool", "additive"):
        full = (*lead, q_heads, q_len, kv_len)
        shape = [s if rng.random() < 0.5 else 1 for s in full[:-2]]
        shape += [q_len if rng.random() < 0.7 else 1, kv_len]
        mask_shape = tuple(shape[rng.randint(0, len(shape) - 2):])
        drop = rng.choice((0.0, 0.2, 0.5, 0.9)) if mask == "bool" else rng.choice((0.0, 0.0, 0.3))
        if mask_shape[-2] == q_len and rng.random() < 0.15:
            masked_rows = tuple(sorted(rng.sample(range(q_len), rng.randint(1, min(3, q_len)))))
    layout = rng.choice(_LAYOUTS)
    if layout == "fused_qkv" and not (q_len == kv_len and head_dim == v_head_dim and lead == kv_lead and q_heads == kv_heads):
        layout = "heads_last"
    if layout in ("heads_last", "fused_qkv") and ndim == 3:
        layout = "contiguous"
    return CallSpec(
        lead=lead, kv_lead=kv_lead, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
        head_dim=head_dim, v_head_dim=v_head_dim, dtype=dtype, mask=mask, mask_shape=mask_shape, mask_drop=drop,
        masked_rows=masked_rows, is_causal=mask == "causal", scale=rng.uniform(0.05, 1.5) if rng.random() < 0.3 else None,
        enable_gqa=gqa, grad=rng.random() < 0.2 if grad is None else grad, layout=layout,
    )


def _laid_out(spec: CallSpec, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Random q, k, v: float64 ones for the reference, and the same values in the spec's dtype
    and memory layout (views, as a module's projections give them)."""
    s = spec

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if s.layout == "fused_qkv":
        # [..., L, 3, H, E] seen as three [..., H, L, E] views of one buffer: timm's fused qkv
        qkv64 = randn(*s.lead, s.q_len, 3, s.q_heads, s.head_dim)
        n = qkv64.dim()
        perm = (n - 3, *range(n - 4), n - 2, n - 4, n - 1)
        return tuple(qkv64.permute(*perm).unbind(0)), tuple(qkv64.to(s.dtype).permute(*perm).unbind(0))
    if s.layout == "heads_last":
        # [..., L, H, E] memory seen as [..., H, L, E]: a reshape + transpose
        bases = (
            randn(*s.lead, s.q_len, s.q_heads, s.head_dim),
            randn(*s.kv_lead, s.kv_len, s.kv_heads, s.head_dim),
            randn(*s.kv_lead, s.kv_len, s.kv_heads, s.v_head_dim),
        )
        return tuple(b.transpose(-3, -2) for b in bases), tuple(b.to(s.dtype).transpose(-3, -2) for b in bases)
    q = randn(*s.lead, s.q_heads, s.q_len, s.head_dim)
    k = randn(*s.kv_lead, s.kv_heads, s.kv_len, s.head_dim)
    v = randn(*s.kv_lead, s.kv_heads, s.kv_len, s.v_head_dim)
    if s.layout == "strided_head_dim":
        # the key's head dim not contiguous (XCiT's transposed attention passes such views)
        k_t = k.transpose(-2, -1).contiguous()
        return (q, k_t.transpose(-2, -1), v), (q.to(s.dtype), k_t.to(s.dtype).transpose(-2, -1), v.to(s.dtype))
    return (q, k, v), (q.to(s.dtype), k.to(s.dtype), v.to(s.dtype))


def make_call(spec: CallSpec, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], dict]:
    """Fresh values for ``spec``: float64 ``(q, k, v)`` for the reference, the same in the spec's
    dtype and layout, and the float64 keyword arguments in SDPA's terms."""
    ref_qkv, qkv = _laid_out(spec, gen)
    kwargs: dict = {}
    if spec.mask in ("bool", "additive"):
        shape = spec.mask_shape
        drop = torch.rand(*shape, generator=gen, dtype=torch.float64) < spec.mask_drop
        if spec.mask == "bool":
            mask = ~drop
        else:
            mask = torch.randn(*shape, generator=gen, dtype=torch.float64).masked_fill(drop, float("-inf"))
        if spec.masked_rows:
            mask = mask.clone()
            mask[..., list(spec.masked_rows), :] = False if spec.mask == "bool" else float("-inf")
        kwargs["attn_mask"] = mask
    if spec.is_causal:
        kwargs["is_causal"] = True
    if spec.scale is not None:
        kwargs["scale"] = spec.scale
    if spec.enable_gqa:
        kwargs["enable_gqa"] = True
    return ref_qkv, qkv, kwargs


@dataclass
class Wrong:
    """A call a backend answered wrongly (or failed on with an error that is not a refusal)."""

    backend: str
    strict: bool
    spec: CallSpec
    served_by: str
    error: float | None
    what: str

    def __str__(self) -> str:
        mode = "strict" if self.strict else "with fallback"
        err = f"relative error {self.error:.3g}" if self.error is not None else ""
        return f"{self.backend} ({mode}, served by {self.served_by}): {self.what} {err} on {self.spec.describe()}"


@dataclass
class FuzzReport:
    """What one backend did with the drawn calls."""

    backend: str
    calls: int = 0
    #: calls the backend itself served correctly
    served: int = 0
    #: strict calls it refused with reasons (UnsupportedCall)
    refused: int = 0
    #: non-strict calls it refused that the fallback served correctly
    fell_back: int = 0
    wrong: list[Wrong] = field(default_factory=list)
    #: worst error relative to the tolerance among correct answers the backend served, per dtype
    worst: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "backend": self.backend, "calls": self.calls, "served": self.served, "refused": self.refused,
            "fell_back": self.fell_back, "wrong": [str(w) for w in self.wrong], "worst_vs_tolerance": self.worst,
            "refusal_reasons": dict(sorted(self.reasons.items(), key=lambda kv: -kv[1])[:20]),
            "seconds": round(self.seconds, 1),
        }


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    diff = (out.double() - ref).abs()
    if diff.numel() == 0:
        return 0.0
    worst = diff.max().item()
    return math.inf if math.isnan(worst) else worst / scale


def _reference(args, kwargs, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(grad_out is not None) for t in args)
    kw = dict(kwargs)
    ref = eager_attention(q, k, v, **kw)
    if grad_out is None:
        return ref.detach(), None
    ref.backward(grad_out)
    return ref.detach(), tuple(t.grad for t in (q, k, v))


def check_one(backend: str, spec: CallSpec, gen: torch.Generator, *, strict: bool, report: FuzzReport) -> None:
    """Draw values for ``spec``, run them through a router for ``backend``, compare with float64 eager."""
    from .routing import Policy, Router

    _, args, kwargs64 = make_call(spec, gen)
    grad_out = None
    if spec.grad:
        lead = torch.broadcast_shapes(spec.lead, spec.kv_lead) if spec.lead else ()
        grad_out = torch.randn(*lead, spec.q_heads, spec.q_len, spec.v_head_dim, generator=gen, dtype=torch.float64)
    dtype = spec.dtype
    kwargs = dict(kwargs64)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.to(dtype)
    # The reference sees exactly the values the backend sees (rounded to its dtype), in float64:
    # what is measured is the kernel's arithmetic, not the rounding of its inputs
    seen = {n: (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kwargs.items()}
    ref, ref_grads = _reference(tuple(t.double() for t in args), seen, grad_out)
    if spec.grad:
        args = [t.detach().requires_grad_() for t in args]  # detach keeps the strides
    router = Router(Policy(backend, () if strict else ("sdpa",), strict), site="fuzz")
    report.calls += 1
    try:
        with torch.enable_grad() if spec.grad else torch.no_grad():
            out = router.route(*args, **kwargs)
            if spec.grad:
                out.backward(grad_out.to(dtype))
    except UnsupportedCall as refusal:
        report.refused += 1
        for reason in refusal.reasons.get(backend, ()):
            kind = re.sub(r"\d+", "N", reason.split(": ")[0])[:100]
            report.reasons[kind] = report.reasons.get(kind, 0) + 1
        return
    except Exception as exc:  # anything but a refusal is a defect to report, not to crash the fuzz on
        report.wrong.append(Wrong(backend, strict, spec, "?", None, f"raised {type(exc).__name__}: {str(exc)[:200]}"))
        return
    served_by = next((t.backend for t in router.tallies() if t.calls), "?")
    tol = OUTPUT_TOLERANCE[dtype]
    err = _relative(out, ref)
    problems = []
    if tuple(out.shape) != tuple(ref.shape) or out.dtype != dtype:
        problems.append(f"shape/dtype {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}")
    elif not err < tol:
        problems.append("output")
    grad_err = 0.0
    if spec.grad and not problems:
        for name, t, g in zip("qkv", args, ref_grads):
            if t.grad is None:
                problems.append(f"no gradient for {name}")
                continue
            e = _relative(t.grad, g)
            grad_err = max(grad_err, e / GRAD_TOLERANCE[dtype])
            if not e < GRAD_TOLERANCE[dtype]:
                problems.append(f"gradient of {name} (relative error {e:.3g})")
    if problems:
        report.wrong.append(Wrong(backend, strict, spec, served_by, err, "wrong " + ", ".join(problems)))
        return
    if served_by == backend:
        report.served += 1
        key = str(dtype)[6:]
        report.worst[key] = max(report.worst.get(key, 0.0), err / tol, grad_err)
    else:
        report.fell_back += 1


def fuzz(
    backend: str,
    calls: int = 1000,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    strict: Sequence[bool] = (True, False),
    specs: int | None = None,
    seed: int = 0,
    max_len: int = 48,
) -> FuzzReport:
    """Run ``calls`` random calls through ``backend`` (split evenly over ``dtypes`` and
    ``strict`` modes) and compare each with float64 eager. ``specs`` distinct signatures are
    drawn per (dtype, mode) (default: one per call)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    report = FuzzReport(backend)
    modes = [(d, s) for d in dtypes for s in strict]
    per_mode = math.ceil(calls / len(modes))
    start = time.perf_counter()
    log = logging.getLogger("attnswap")
    level = log.level
    log.setLevel(logging.ERROR)  # each fallback would warn once per reason: the report counts them instead
    try:
        for dtype, is_strict in modes:
            pool = [draw_spec(rng, dtype, max_len=max_len) for _ in range(min(specs or per_mode, per_mode))]
            for i in range(per_mode):
                spec = pool[i] if i < len(pool) else rng.choice(pool)
                check_one(backend, spec, gen, strict=is_strict, report=report)
    finally:
        log.setLevel(level)
    report.seconds = time.perf_counter() - start
    return report
