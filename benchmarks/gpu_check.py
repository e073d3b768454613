"""GPU check: every available backend's numerics and speed, one script, one call.

1. Numerics: each backend (through its router, strict, so a refusal shows with its reasons)
   against a float32 math reference, in bf16 and fp16, forward and backward, for the attention
   shapes of ViT-B/16@224 (197 tokens), ViT-L/16@384 (577), EVA02-L@448 (1025), a head-dim-128
   case and a q_len != kv_len case, each with and without an additive bias.
2. Kernel speed: bf16 forward, CUDA events, median of repeats; TFLOP/s (4·B·H·Lq·Lk·D) and the
   fraction of this GPU's measured bf16 matmul rate.
3. Pinned kernels: each pinned SDPA backend (which calls its kernel's own operator) against
   SDPA under ``sdpa_kernel`` for the same kernel, bitwise, forward and backward, over masks,
   causal, GQA, padded head dims and dtypes: the direct recipes were read from PyTorch's source
   and checked on CPU; this is where the CUDA ones are checked.
4. Structured biases: each backend on a decomposed relative-position bias (SAM ViT's) and on a
   key-padding mask (NaFlexViT's), carried as structure: the form it took (from its parts, head
   dim extended, per sequence, packed for a varlen kernel, materialized), numerics against
   float64; for the SAM global layer shape time and peak memory against SDPA with timm's
   materialized bias; for a NaFlexViT batch (65% padding) time against masked SDPA.
5. End to end: timm models in bf16 (inference) patched with each backend, and with ``auto``,
   against the same model unpatched, in the same process: images/s, speedup, relative error,
   fallbacks.

Prints the tables (the summary last) and writes everything to a JSON file. Each section stops
early, saying so, when the time budget runs out.

    python benchmarks/gpu_check.py [--budget 480] [--out gpu_check.json] [--backends a,b] [--smoke]

``--smoke`` runs tiny shapes and one tiny model on whatever device there is (CPU included):
it checks the script itself, not any kernel. With the xformers wheel carried in ``.whl``:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:src python benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

import attnswap
from attnswap.errors import AttnSwapError
from attnswap.reporting import render_table
from attnswap.routing import Policy, Router


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    bias: bool

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim

    @property
    def label(self) -> str:
        return f"{self.name}{' +bias' if self.bias else ''}"


def cases(smoke: bool) -> list[Case]:
    if smoke:
        shapes = [("tiny", 2, 2, 17, 17, 16), ("tiny_cross", 2, 2, 9, 13, 16)]
    else:
        shapes = [
            ("vit_b16_224", 32, 12, 197, 197, 64),
            ("vit_l16_384", 8, 16, 577, 577, 64),
            ("eva02_l14_448", 4, 16, 1025, 1025, 64),
            ("d128_1024", 8, 16, 1024, 1024, 128),
            ("cross_197x50", 32, 12, 197, 50, 64),
        ]
    return [Case(*s, bias=b) for s in shapes for b in (False, True)]


MODELS = [  # (timm name, batch for an 80 GB card, bf16 inference)
    ("vit_base_patch16_224", 256),
    ("vit_large_patch16_384", 32),
    ("eva02_large_patch14_448", 16),
    ("swin_base_patch4_window7_224", 128),
]
SMOKE_MODELS = [("test_vit", 2)]
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q = r(case.batch, case.heads, case.q_len, case.head_dim)
    k = r(case.batch, case.heads, case.kv_len, case.head_dim)
    v = r(case.batch, case.heads, case.kv_len, case.head_dim)
    # a relative-position-like bias: one per head, shared over the batch
    bias = r(case.heads, case.q_len, case.kv_len, scale=2.0) if case.bias else None
    return q, k, v, bias


def router_for(name: str, site: str) -> Router:
    return Router(Policy(name, (), strict=True), site=site)


def refusal(exc: Exception) -> str:
    if isinstance(exc, attnswap.UnsupportedCall):
        reasons = [r for rs in exc.reasons.values() for r in rs]
        return "refused: " + "; ".join(reasons)
    return f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def check_numerics(backends, all_cases, device, clock) -> list[dict]:
    rows = []
    for case in all_cases:
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v, bias = inputs(case, dtype, device)
            qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
            bf = None if bias is None else bias.float()
            ref = router_for("sdpa_math", "reference")(qf, kf, vf, attn_mask=bf)
            grad_out = torch.randn_like(ref)
            ref.backward(grad_out)
            ref_grads = [t.grad for t in (qf, kf, vf)]
            for name in backends:
                if clock.left() < 0:
                    rows.append(dict(case=case.label, dtype=str(dtype)[6:], backend=name, status="skipped: time budget"))
                    continue
                row = dict(case=case.label, dtype=str(dtype)[6:], backend=name)
                try:
                    with torch.no_grad():
                        out = router_for(name, "fwd")(q, k, v, attn_mask=bias)
                    row["fwd_rel_err"] = rel(out, ref.detach())
                    row["status"] = "ok"
                except Exception as exc:  # noqa: BLE001 - every failure is a row, never a crash
                    row["status"] = refusal(exc)
                    rows.append(row)
                    continue
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                try:
                    out = router_for(name, "bwd")(qg, kg, vg, attn_mask=bias)
                    out.backward(grad_out.to(dtype))
                    row["bwd_rel_err"] = max(rel(t.grad, g) for t, g in zip((qg, kg, vg), ref_grads))
                except Exception as exc:  # noqa: BLE001
                    row["bwd"] = refusal(exc)
                exact = attnswap.get_backend(name).exact
                worst = max(row.get("fwd_rel_err", 0.0), row.get("bwd_rel_err", 0.0))
                row["within_tolerance"] = (not exact) or worst < TOLERANCE[dtype]
                rows.append(row)
    return rows


def matmul_tflops(device: torch.device, smoke: bool) -> float:
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, warmup=5, repeats=20)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def time_kernels(backends, all_cases, device, peak, clock, smoke) -> list[dict]:
    rows = []
    for case in all_cases:
        q, k, v, bias = inputs(case, torch.bfloat16, device)
        for name in backends:
            row = dict(case=case.label, backend=name)
            if clock.left() < 0:
                row["status"] = "skipped: time budget"
                rows.append(row)
                continue
            router = router_for(name, "timing")
            try:
                with torch.no_grad():
                    ms = median_ms(lambda: router(q, k, v, attn_mask=bias), device, repeats=5 if smoke else 20)
            except Exception as exc:  # noqa: BLE001
                row["status"] = refusal(exc)
                rows.append(row)
                continue
            tflops = case.flops / (ms * 1e-3) / 1e12
            row.update(status="ok", ms=ms, tflops=tflops, of_peak=tflops / peak if peak else None)
            rows.append(row)
    return rows


def end_to_end(backends, models, device, clock, smoke) -> list[dict]:
    import timm

    rows = []
    for model_name, batch in models:
        if clock.left() < (0 if smoke else 30):
            rows.append(dict(model=model_name, backend="*", status="skipped: time budget"))
            continue
        try:
            with torch.device(device):
                model = timm.create_model(model_name, pretrained=False).eval().to(torch.bfloat16)
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))
            x = torch.randn(batch, *size, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                ref = model.forward_features(x)
                base_ms = median_ms(lambda: model(x), device, warmup=2, repeats=3 if smoke else 10)
        except Exception as exc:  # noqa: BLE001 (out of memory, a model missing in this timm)
            rows.append(dict(model=model_name, backend="unpatched", status=refusal(exc)))
            continue
        rows.append(dict(model=model_name, backend="unpatched", status="ok", batch=batch, ms=base_ms,
                         images_per_s=batch / (base_ms * 1e-3), speedup=1.0))
        for name in backends:
            if clock.left() < (0 if smoke else 20):
                rows.append(dict(model=model_name, backend=name, status="skipped: time budget"))
                continue
            row = dict(model=model_name, backend=name, batch=batch)
            try:
                with attnswap.patched(model, backend=name), torch.no_grad():
                    out = model.forward_features(x)  # the first call also compiles (flex)
                    row["rel_err"] = rel(out, ref)
                    attnswap.stats(model, reset=True)
                    ms = median_ms(lambda: model(x), device, warmup=1, repeats=3 if smoke else 10)
                    stats = attnswap.stats(model)
                row.update(status="ok", ms=ms, images_per_s=batch / (ms * 1e-3), speedup=base_ms / ms,
                           calls=stats.total_calls, fallbacks=stats.fallback_calls, served=stats.by_backend())
            except Exception as exc:  # noqa: BLE001
                row["status"] = refusal(exc)
            rows.append(row)
        del model, x, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def environment(device: torch.device) -> dict:
    import timm

    env = dict(
        date=time.strftime("%Y-%m-%d"), python=platform.python_version(), torch=torch.__version__,
        timm=timm.__version__, attnswap=attnswap.__version__, device=str(device),
    )
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), capability=torch.cuda.get_device_capability(device),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for dist in ("xformers", "flash_attn", "flash_attn_3", "flash-attn-4", "sageattention", "triton"):
        try:
            import importlib.metadata

            env[dist] = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001
            pass
    return env


def xformers_own_verdict(device: torch.device) -> dict:
    """What xformers itself says of a plain bf16 ViT-B call, apart from attnswap's adapter.

    xformers' cutlass and flash operators call PyTorch's own kernels, but each operator's
    ``not_supported_reasons`` also refuses when xformers' extension did not load (a wheel built
    for another torch): this records each operator's reasons and one direct call."""
    try:
        import xformers
        import xformers.ops as xops
        from xformers.ops.fmha import cutlass, flash
        from xformers.ops.fmha.common import Inputs
    except Exception as exc:  # noqa: BLE001 - not carried, or broken: that is the finding
        return dict(importable=False, error=f"{type(exc).__name__}: {exc}")
    q, k, v = (torch.randn(2, 197, 12, 64, dtype=torch.bfloat16, device=device) for _ in range(3))
    verdict: dict = dict(importable=True, version=xformers.__version__, extension_loaded=getattr(xformers, "_has_cpp_library", None))
    for op in (cutlass.FwOp, flash.FwOp):
        try:
            verdict[op.NAME] = op.not_supported_reasons(Inputs(query=q, key=k, value=v)) or "supported"
        except Exception as exc:  # noqa: BLE001
            verdict[op.NAME] = f"{type(exc).__name__}: {exc}"
    try:
        out = xops.memory_efficient_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        verdict["direct_call"] = f"ran, rel err {rel(out.float(), ref):.2e}"
    except Exception as exc:  # noqa: BLE001
        verdict["direct_call"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return verdict


def pinned_vs_sdpa_kernel(device: torch.device, clock: Clock) -> list[dict]:
    """Each pinned backend's direct call vs SDPA under ``sdpa_kernel``: bitwise, or the difference."""
    from attnswap.backends.sdpa import _pinned, PinnedSdpaBackend

    def r(*shape, dtype, seed, grad=False):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    rows = []
    for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"):
        backend = attnswap.get_backend(name)
        if not isinstance(backend, PinnedSdpaBackend) or not backend.runs_directly(device.type):
            rows.append(dict(backend=name, case="-", status=f"no direct recipe on {device.type}"))
            continue
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for case, (lq, lk, hq, hk, e), kw in (
                ("plain", (197, 197, 12, 12, 64), {}),
                ("head dim 60 (padded)", (50, 50, 4, 4, 60), {}),
                ("causal", (128, 128, 4, 4, 64), dict(is_causal=True)),
                ("scale, q_len != kv_len", (77, 130, 4, 4, 64), dict(scale=0.3)),
                ("bias (1, H, L, S)", (197, 197, 4, 4, 64), dict(mask="additive")),
                ("bool mask (L, S)", (64, 96, 4, 4, 64), dict(mask="bool")),
                ("gqa", (64, 64, 8, 2, 64), dict(enable_gqa=True)),
            ):
                if clock.left() <= 0:
                    rows.append(dict(backend=name, case=case, status="skipped: time budget"))
                    continue
                q = r(2, hq, lq, e, dtype=dtype, seed=1, grad=True)
                k = r(2, hk, lk, e, dtype=dtype, seed=2, grad=True)
                v = r(2, hk, lk, e, dtype=dtype, seed=3, grad=True)
                kwargs = dict(kw)
                mask = kwargs.pop("mask", None)
                if mask == "additive":
                    kwargs["attn_mask"] = r(1, hq, lq, lk, dtype=dtype, seed=4)
                elif mask == "bool":
                    kwargs["attn_mask"] = r(lq, lk, dtype=torch.float32, seed=4) > -1
                row = dict(backend=name, case=case, dtype=str(dtype)[6:])
                try:
                    g = r(2, hq, lq, e, dtype=dtype, seed=5)
                    outs, grads = [], []
                    for direct in (True, False):
                        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                        if direct:
                            out = router_for(name, "pinned").route(*leaves, **kwargs)
                        else:
                            out = _pinned(backend.kernel_name, *leaves, kwargs.get("attn_mask"), 0.0,
                                          kwargs.get("is_causal", False), kwargs.get("scale"), kwargs.get("enable_gqa", False))
                        out.backward(g)
                        outs.append(out.detach())
                        grads.append([t.grad for t in leaves])
                    row["forward_bitwise"] = bool(torch.equal(*outs))
                    row["forward_max_diff"] = float((outs[0].float() - outs[1].float()).abs().max())
                    row["backward_bitwise"] = all(torch.equal(a, b) for a, b in zip(*grads))
                    row["backward_rel_err"] = max(rel(a.float(), b.float()) for a, b in zip(*grads))
                    row["status"] = "ok"
                except attnswap.UnsupportedCall as exc:
                    row["status"] = "refused: " + refusal(exc)
                except Exception as exc:  # noqa: BLE001 - sdpa_kernel's own refusal, or a failure: both are findings
                    row["status"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                rows.append(row)
    return rows


def structured(backends, device: torch.device, clock: Clock, smoke: bool) -> list[dict]:
    """Decomposed rel-pos and key padding, carried as structure, through each backend."""
    from attnswap.structure import DecomposedRelPos
    from attnswap.structure.padding import KeyPadding

    def r(*shape, dtype, seed, grad=False, scale=1.0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    grid = (8, 8) if smoke else (32, 32)
    n = grid[0] * grid[1]
    lengths = [n, n // 3, n // 8, 5]
    rows = []
    for name in backends:
        for kind in ("decomposed_rel_pos", "key_padding"):
            for dtype in (torch.bfloat16, torch.float32):
                if clock.left() <= 0:
                    rows.append(dict(backend=name, kind=kind, status="skipped: time budget"))
                    continue
                row = dict(backend=name, kind=kind, dtype=str(dtype)[6:])
                heads = 4
                q, k, v = (r(len(lengths), heads, n, 64, dtype=dtype, seed=i, grad=True) for i in range(3))
                if kind == "decomposed_rel_pos":
                    rel_h = r(len(lengths), heads, n, grid[0], dtype=dtype, seed=4, scale=2.0)
                    rel_w = r(len(lengths), heads, n, grid[1], dtype=dtype, seed=5, scale=2.0)
                    structure = DecomposedRelPos(rel_h, rel_w)
                    dense = (rel_h.double()[..., :, None] + rel_w.double()[..., None, :]).flatten(-2)
                else:
                    valid = torch.zeros(len(lengths), n, dtype=torch.bool, device=device)
                    for b, length in enumerate(lengths):
                        valid[b, :length] = True
                    keep = valid[:, None, :, None] & valid[:, None, None, :]
                    dense = torch.zeros(keep.shape, dtype=torch.float64, device=device).masked_fill(~keep, torch.finfo(dtype).min)
                    structure = KeyPadding(valid, True, n, dtype, lambda d=dense, t=dtype: d.to(t))
                try:
                    router = router_for(name, "structured")
                    out = router.route(q, k, v, attn_mask=structure)
                    grad = r(*out.shape, dtype=dtype, seed=6)
                    out.backward(grad)
                    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
                    # the math kernel: on padded (fully masked) rows PyTorch's CPU flash kernel returns L
                    # times softmax's gradient (tests/structure/test_padding.py); math gives the gradient
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    with sdpa_kernel([SDPBackend.MATH]):
                        ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=dense)
                    ref.backward(grad.double())
                    row["form"] = router.tallies()[0].structure[1]
                    row["fwd_rel_err"] = rel(out.detach(), ref.detach())
                    row["bwd_rel_err"] = max(rel(a.grad, b.grad) for a, b in zip((q, k, v), (qd, kd, vd)))
                    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
                    row["within_tolerance"] = row["fwd_rel_err"] <= tol and row["bwd_rel_err"] <= tol * 3
                    row["status"] = "ok"
                except attnswap.UnsupportedCall as exc:
                    row["status"] = refusal(exc)
                except Exception as exc:  # noqa: BLE001 - a failure is a finding
                    row["status"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                rows.append(row)
    # SAM global layer (12 heads, 64x64 grid, batch 1): time and peak memory, bf16 forward
    grid = (8, 8) if smoke else (64, 64)
    n = grid[0] * grid[1]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (r(12, n, 64, dtype=dtype, seed=i) for i in range(3))
    rel_h, rel_w = r(12, n, grid[0], dtype=dtype, seed=4), r(12, n, grid[1], dtype=dtype, seed=5)

    def timm_way():
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    variants = {"unpatched (timm builds the bias)": timm_way}
    for name in backends:
        router = router_for(name, "sam")
        variants[name] = lambda router=router: router.route(q, k, v, attn_mask=DecomposedRelPos(rel_h, rel_w))
    def sam_memory_and_time(name, fn, row):
        fn()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        row["ms"] = median_ms(fn, device, warmup=1, repeats=5)

    rows.extend(_measure_variants(variants, "SAM global layer", dtype, clock, sam_memory_and_time))
    # NaFlexViT batch (8 sequences padded to 577, 65% padding, 12 heads): time, bf16 forward
    n = 64 if smoke else 577
    lengths = [n, n * 4 // 9, n // 4, n // 9, n * 7 // 10, n // 6, n // 12, max(n // 36, 1)]
    valid = torch.zeros(len(lengths), n, dtype=torch.bool, device=device)
    for b, length in enumerate(lengths):
        valid[b, :length] = True
    keep = valid[:, None, :, None] & valid[:, None, None, :]
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
    q, k, v = (r(len(lengths), 12, n, 64, dtype=dtype, seed=i) for i in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    variants = {"unpatched (masked SDPA)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    routers = {name: router_for(name, "naflex") for name in backends}
    for name, router in routers.items():
        variants[name] = lambda router=router: router.route(
            q, k, v, attn_mask=KeyPadding(valid, True, n, dtype, lambda: mask))
    def naflex_error_and_time(name, fn, row):
        row["fwd_rel_err"] = rel(fn(), reference)
        row["ms"] = median_ms(fn, device, warmup=2, repeats=7)
        if name in routers and routers[name].tallies():
            row["form"] = routers[name].tallies()[0].structure[1]

    rows.extend(_measure_variants(variants, "NaFlexViT padded batch", dtype, clock, naflex_error_and_time))
    return rows


def _measure_variants(variants: dict, kind: str, dtype: torch.dtype, clock: Clock, measure: Callable) -> list[dict]:
    """One row per variant: ``measure(name, fn, row)`` under ``no_grad`` fills it; a refusal or a
    failure is the row's status (a finding, not a crash); variants past the time budget are skipped."""
    rows = []
    for name, fn in variants.items():
        if clock.left() <= 0:
            rows.append(dict(backend=name, kind=kind, status="skipped: time budget"))
            continue
        row = dict(backend=name, kind=kind, dtype=str(dtype)[6:])
        try:
            with torch.no_grad():
                measure(name, fn, row)
            row["status"] = "ok"
        except attnswap.UnsupportedCall as exc:
            row["status"] = refusal(exc)
        except Exception as exc:  # noqa: BLE001 - a failure is a finding
            row["status"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        rows.append(row)
    return rows


def fmt(x, spec=".2e") -> str:
    return "" if x is None else format(x, spec)


def print_tables(result: dict) -> None:
    env = result["environment"]
    caption = ", ".join(f"{k} {v}" for k, v in env.items())
    print(render_table("backends here", ("backend", "available", "why not"),
                       [(b["name"], "yes" if b["available"] else "no", b["reason"]) for b in result["backends"]], caption))
    print(render_table(
        "numerics vs float32 math (max |Δ| / max |ref|)", ("case", "dtype", "backend", "forward", "backward", "ok"),
        [(r["case"], r["dtype"], r["backend"], fmt(r.get("fwd_rel_err")) or r["status"],
          fmt(r.get("bwd_rel_err")) or r.get("bwd", ""), {True: "yes", False: "NO"}.get(r.get("within_tolerance"), ""))
         for r in result["numerics"]],
    ))
    print(render_table(
        f"kernel speed, bf16 forward (matmul peak measured: {result['matmul_tflops']:.0f} TFLOP/s)",
        ("case", "backend", "ms", "TFLOP/s", "of peak"),
        [(r["case"], r["backend"], fmt(r.get("ms"), ".3f") or r["status"], fmt(r.get("tflops"), ".1f"),
          fmt(r.get("of_peak"), ".0%")) for r in result["kernels"]],
    ))
    print(render_table(
        "end to end, bf16 inference (same process, unpatched first)",
        ("model", "backend", "batch", "ms", "img/s", "speedup", "rel err", "fallbacks"),
        [(r["model"], r["backend"], r.get("batch", ""), fmt(r.get("ms"), ".1f") or r["status"],
          fmt(r.get("images_per_s"), ".0f"), fmt(r.get("speedup"), ".2f"), fmt(r.get("rel_err")),
          r.get("fallbacks", "")) for r in result["models"]],
    ))
    print(render_table(
        "pinned kernels: direct operator call vs SDPA under sdpa_kernel", ("backend", "case", "dtype", "forward", "backward", "status"),
        [(r["backend"], r["case"], r.get("dtype", ""),
          "" if "forward_bitwise" not in r else ("bitwise" if r["forward_bitwise"] else f"DIFF {r['forward_max_diff']:.1e}"),
          "" if "backward_bitwise" not in r else ("bitwise" if r["backward_bitwise"] else f"rel {r['backward_rel_err']:.1e}"),
          r["status"]) for r in result.get("pinned", [])],
    ))
    print(render_table(
        "structured biases: form taken, numerics vs float64 (decomposed rel-pos, key padding); SAM global layer and NaFlexViT batch speed",
        ("backend", "kind", "dtype", "form", "forward", "backward", "ms", "peak MB", "status"),
        [(r["backend"], r["kind"], r.get("dtype", ""), r.get("form", ""), fmt(r.get("fwd_rel_err")), fmt(r.get("bwd_rel_err")),
          fmt(r.get("ms"), ".2f"), fmt(r.get("peak_mb"), ".0f"),
          r["status"] + ("" if r.get("within_tolerance") is not False else " OUTSIDE TOLERANCE"))
         for r in result.get("structured", [])],
    ))
    verdict = result["xformers_own_verdict"]
    print(render_table("xformers' own verdict (without attnswap)", ("what", "result"),
                       [(k, str(v)[:200]) for k, v in verdict.items()]))
    bad = [r for r in (*result["numerics"], *result.get("structured", [])) if r.get("within_tolerance") is False]
    best = {}
    for r in result["models"]:
        if r.get("status") == "ok" and r["backend"] != "unpatched" and not r.get("fallbacks"):
            if r["model"] not in best or r["speedup"] > best[r["model"]]["speedup"]:
                best[r["model"]] = r
    print(render_table(
        "summary", ("what", "result"),
        [("numerics outside tolerance", str(len(bad)) + (": " + ", ".join(f"{r['backend']}/{r.get('case', r.get('kind'))}/{r['dtype']}" for r in bad[:8]) if bad else "")),
         ("pinned direct calls not bitwise SDPA", ", ".join(
             f"{r['backend']}/{r['case']}/{r['dtype']}" for r in result.get("pinned", []) if r.get("forward_bitwise") is False
         ) or "none"),
         *[(f"fastest on {m}", f"{r['backend']} ({r['speedup']:.2f}x, {r['images_per_s']:.0f} img/s)") for m, r in best.items()],
         ("seconds", f"{result['seconds']:.0f}")],
        caption,
    ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    parser.add_argument("--backends", help="comma-separated (default: every available one)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and model: checks the script, not kernels")
    args = parser.parse_args(argv)

    started = time.monotonic()
    clock = Clock(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    infos = attnswap.list_backends()
    backends = [b.name for b in infos if b.available]
    if args.smoke:  # flex compiles for minutes on a CPU; name it with --backends to include it
        backends = [b for b in backends if b != "flex"]
    if args.backends:
        backends = [attnswap.backends.resolve_name(n) for n in args.backends.split(",")]
    result: dict = dict(environment=environment(device), backends=[b.as_dict() for b in infos], selected=backends)
    result["xformers_own_verdict"] = xformers_own_verdict(device)
    all_cases = cases(args.smoke)
    # numerics first (the check), speed next, whole models last; each gets part of the budget
    section = Clock(args.budget * 0.25)
    result["numerics"] = check_numerics(backends, all_cases, device, section)
    result["pinned"] = pinned_vs_sdpa_kernel(device, Clock(min(30.0, clock.left())))
    result["structured"] = structured(backends, device, Clock(min(45.0, clock.left())), args.smoke)
    result["matmul_tflops"] = matmul_tflops(device, args.smoke)
    section = Clock(min(args.budget * 0.25, clock.left()))
    timed = [b for b in backends if b != "eager"] if not args.smoke else backends
    result["kernels"] = time_kernels(timed, [c for c in all_cases], device, result["matmul_tflops"], section, args.smoke)
    models = SMOKE_MODELS if args.smoke else MODELS
    # auto last: every backend's compiled kernels (flex) are warm by then, so its tuning is short
    e2e = [b for b in timed if b != "sdpa_math"] if not args.smoke else list(timed)
    result["models"] = end_to_end([*e2e, "auto"], models, device, clock, args.smoke)
    result["seconds"] = time.monotonic() - started
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print_tables(result)
    print(f"full results: {args.out}")
    return 1 if any(r.get("within_tolerance") is False for r in (*result["numerics"], *result["structured"])) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except AttnSwapError:
        traceback.print_exc()
        sys.exit(2)
