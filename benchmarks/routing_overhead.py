"""Routing overhead: what attnswap adds per attention call at steady state.

Measured side by side in one process, interleaved rounds; each figure is the median over
rounds of the difference to its baseline *in the same round* (this machine is noisy):

- a minimal module whose forward is only ``F.scaled_dot_product_attention``, unpatched vs
  patched with ``sdpa``, each pinned kernel and ``auto`` (tuned); a pinned kernel is also set
  against a module calling that kernel's own operator directly (what it costs beyond the
  kernel), and against ``sdpa_kernel`` + SDPA (what pinning cost before);
- a tiny timm ``Attention``, unpatched vs patched the same ways;
- the router called directly vs ``F.scaled_dot_product_attention``;
- if diffusers is installed: its ``dispatch_attention_fn`` (native, and its pinned
  ``_native_math``/``_native_flash``) vs raw SDPA on the same [B, S, H, D] tensors.

Tensors are tiny so the kernel's own time is small and the overhead is visible.

    python benchmarks/routing_overhead.py [--rounds 21] [--calls 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import attnswap

from _results import write_json

PINNED = ("sdpa_flash", "sdpa_math")


class SdpaOnly(torch.nn.Module):
    """The smallest attention site there is."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class KernelOp(torch.nn.Module):
    """Calls one kernel's own operator: the floor for a pinned backend."""

    def __init__(self, op: Callable) -> None:
        super().__init__()
        self.op = op

    def forward(self, q, k, v):
        return self.op(q, k, v)[0]


class SdpaKernelPinned(torch.nn.Module):
    """What pinning cost before: ``sdpa_kernel`` (process-global switch) around SDPA."""

    def __init__(self, backend) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([self.backend]):
            return F.scaled_dot_product_attention(q, k, v)


def per_call_ns(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls


def measure(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up: plans decided, auto tuned, caches filled
        for _ in range(200):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            samples[name].append(per_call_ns(fn, calls))
    return samples


def paired(samples: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of (name - base), each round's pair measured back to back."""
    return statistics.median(a - b for a, b in zip(samples[name], samples[base]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from timm.layers import Attention
    from torch.nn.attention import SDPBackend

    dim, heads, tokens = 32, 2, 8
    x = torch.randn(1, tokens, dim)
    q = torch.randn(1, heads, tokens, dim // heads)
    names = ("sdpa", *PINNED, "auto")

    def patched(make, backend):
        m = make()
        if backend == "auto":  # once tuned, what auto adds is its lookup, not a kernel choice
            attnswap.patch(m, backend="auto", candidates=("sdpa",))
        else:
            attnswap.patch(m, backend=backend, strict=True)
        return m

    plain_timm = Attention(dim, num_heads=heads).eval()

    def timm_copy():
        m = Attention(dim, num_heads=heads).eval()
        m.load_state_dict(plain_timm.state_dict())
        return m

    module = SdpaOnly()
    variants: dict[str, Callable[[], object]] = {"module, unpatched": lambda: module(q, q, q)}
    for b in names:
        m = patched(SdpaOnly, b)
        variants[f"module, {b}"] = lambda m=m: m(q, q, q)
    flash_op = KernelOp(torch._scaled_dot_product_flash_attention_for_cpu)
    math_op = KernelOp(torch._scaled_dot_product_attention_math)
    variants["module, CPU flash operator"] = lambda: flash_op(q, q, q)
    variants["module, math operator"] = lambda: math_op(q, q, q)
    pinned_flash = SdpaKernelPinned(SDPBackend.FLASH_ATTENTION)
    pinned_math = SdpaKernelPinned(SDPBackend.MATH)
    variants["module, sdpa_kernel(FLASH) + SDPA"] = lambda: pinned_flash(q, q, q)
    variants["module, sdpa_kernel(MATH) + SDPA"] = lambda: pinned_math(q, q, q)
    variants["timm Attention, unpatched"] = lambda: plain_timm(x)
    for b in names:
        m = patched(timm_copy, b)
        variants[f"timm Attention, {b}"] = lambda m=m: m(x)

    from attnswap.routing import Policy, Router

    variants["F.scaled_dot_product_attention"] = lambda: F.scaled_dot_product_attention(q, q, q)
    for b in names:
        router = Router(Policy(b, candidates=("sdpa",) if b == "auto" else None))
        variants[f"router, {b}"] = lambda r=router: r.route(q, q, q)

    diffusers_version = None
    diffusers_rows: list[tuple[str, str]] = []
    try:
        import diffusers
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        diffusers_version = diffusers.__version__
        q_bshd = q.transpose(1, 2).contiguous()  # diffusers takes [B, S, H, D]
        variants["diffusers layout, raw SDPA"] = lambda: F.scaled_dot_product_attention(
            q_bshd.transpose(1, 2), q_bshd.transpose(1, 2), q_bshd.transpose(1, 2)
        ).transpose(1, 2)
        for backend in ("native", "_native_math", "_native_flash"):
            try:
                dispatch_attention_fn(q_bshd, q_bshd, q_bshd, backend=backend)
            except Exception as exc:  # a backend diffusers refuses on this device
                diffusers_rows.append((backend, f"refused here: {type(exc).__name__}: {str(exc)[:80]}"))
                continue
            variants[f"diffusers dispatch_attention_fn, {backend}"] = (
                lambda b=backend: dispatch_attention_fn(q_bshd, q_bshd, q_bshd, backend=b)
            )
    except ImportError:
        pass

    with torch.no_grad():
        samples = measure(variants, args.rounds, args.calls)
    med = {name: statistics.median(s) for name, s in samples.items()}

    baselines = {
        "module, ": "module, unpatched",
        "timm Attention, ": "timm Attention, unpatched",
        "router, ": "F.scaled_dot_product_attention",
        "diffusers dispatch": "diffusers layout, raw SDPA",
    }
    rows = []
    overhead: dict[str, float] = {}
    for name in variants:
        base = next((b for prefix, b in baselines.items() if name.startswith(prefix)), None)
        extra = "" if base is None or base == name else f"{paired(samples, name, base) / 1e3:+.2f}"
        kernel_extra = ""
        for pin, op in (("sdpa_flash", "module, CPU flash operator"), ("sdpa_math", "module, math operator")):
            if name == f"module, {pin}":
                kernel_extra = f"{paired(samples, name, op) / 1e3:+.2f}"
                overhead[f"{pin} vs its operator"] = paired(samples, name, op)
        if extra:
            overhead[name] = paired(samples, name, base)
        rows.append((name, f"{med[name] / 1e3:.2f}", extra, kernel_extra))

    from attnswap.reporting import render_table

    caption = (
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{args.threads} thread(s), {args.rounds} rounds x {args.calls} calls, "
        f"tensors [1, {heads}, {tokens}, {dim // heads}]"
        + (f", diffusers {diffusers_version}" if diffusers_version else ", diffusers not installed")
    )
    print(render_table(
        "routing overhead per attention call (microseconds; differences are medians of per-round pairs)",
        ("variant", "median", "added vs unpatched / raw SDPA", "added vs the kernel's own operator"),
        rows, caption,
    ))
    for backend, why in diffusers_rows:
        print(f"diffusers {backend}: {why}")
    return write_json(args.json, {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "diffusers": diffusers_version,
        "median_ns": med,
        "overhead_ns": overhead,
    })


if __name__ == "__main__":
    main(sys.argv[1:])
