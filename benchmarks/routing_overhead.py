"""Routing overhead: what attnswap adds per attention call at steady state.

Measured side by side in one process, interleaved rounds, medians (this machine is noisy):

- a tiny timm ``Attention`` module unpatched vs patched with ``sdpa`` (the shortcut path
  for backends without limits) and with a backend that has limits (the per-signature
  decision path), each against the same unpatched module;
- the router called directly vs ``F.scaled_dot_product_attention``;
- if diffusers is installed: its ``dispatch_attention_fn`` vs raw SDPA, in the same run.

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
from attnswap.backends.base import Limits
from attnswap.backends.registry import _add
from attnswap.backends.sdpa import SdpaBackend
from attnswap.routing import Policy, Router

from _results import write_json


class KeyedSdpa(SdpaBackend):
    """Plain SDPA but declaring limits, so the router takes its per-signature decision path."""

    name = "bench_sdpa_with_limits"
    accepts_everything = False

    def limits(self, device_type: str) -> Limits:
        return Limits()


def per_call_ns(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls


def measure(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up: plans decided, caches filled
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


def summarize(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=4)
    return statistics.median(samples), q[0], q[2]


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

    _add(KeyedSdpa())
    dim, heads, tokens = 32, 2, 8
    x = torch.randn(1, tokens, dim)
    plain = Attention(dim, num_heads=heads).eval()
    fast = Attention(dim, num_heads=heads).eval()
    keyed = Attention(dim, num_heads=heads).eval()
    tuned = Attention(dim, num_heads=heads).eval()
    for m in (fast, keyed, tuned):
        m.load_state_dict(plain.state_dict())
    attnswap.patch(fast, backend="sdpa")
    attnswap.patch(keyed, backend=KeyedSdpa.name)
    # auto among sdpa alone: once tuned, what auto adds per call is its lookup, not a kernel choice
    attnswap.patch(tuned, backend="auto", candidates=("sdpa",))

    q = torch.randn(1, heads, tokens, dim // heads)
    router_fast = Router(Policy("sdpa"))
    router_keyed = Router(Policy(KeyedSdpa.name))
    router_auto = Router(Policy("auto", candidates=("sdpa",)))

    variants: dict[str, Callable[[], object]] = {
        "timm Attention, unpatched": lambda: plain(x),
        "timm Attention, patched sdpa (shortcut path)": lambda: fast(x),
        "timm Attention, patched backend with limits (decision path)": lambda: keyed(x),
        "timm Attention, patched auto (tuned; sdpa chosen)": lambda: tuned(x),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, q, q),
        "router.route(q, k, v), sdpa": lambda: router_fast.route(q, q, q),
        "router.route(q, k, v), backend with limits": lambda: router_keyed.route(q, q, q),
        "router.route(q, k, v), auto (tuned; sdpa chosen)": lambda: router_auto.route(q, q, q),
    }
    diffusers_version = None
    try:
        import diffusers
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        diffusers_version = diffusers.__version__
        q_bshd = q.transpose(1, 2).contiguous()  # diffusers takes [B, S, H, D]
        variants["F.sdpa on diffusers' BSHD layout (transposes inside)"] = lambda: F.scaled_dot_product_attention(
            q_bshd.transpose(1, 2), q_bshd.transpose(1, 2), q_bshd.transpose(1, 2)
        ).transpose(1, 2)
        variants["diffusers dispatch_attention_fn (native)"] = lambda: dispatch_attention_fn(q_bshd, q_bshd, q_bshd)
    except Exception:
        pass

    with torch.no_grad():
        samples = measure(variants, args.rounds, args.calls)
    stats = {name: summarize(s) for name, s in samples.items()}

    base_mod = stats["timm Attention, unpatched"][0]
    base_fn = stats["F.scaled_dot_product_attention"][0]
    rows = []
    for name, (med, lo, hi) in stats.items():
        if name.startswith("timm"):
            extra = med - base_mod
        elif name.startswith("diffusers"):
            extra = med - stats["F.sdpa on diffusers' BSHD layout (transposes inside)"][0]
        else:
            extra = med - base_fn
        rows.append((name, f"{med / 1e3:.2f}", f"{lo / 1e3:.2f}-{hi / 1e3:.2f}", f"{extra / 1e3:+.2f}"))

    from attnswap.reporting import render_table

    caption = (
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{args.threads} thread(s), {args.rounds} rounds x {args.calls} calls, "
        f"tensors [1, {heads}, {tokens}, {dim // heads}]"
        + (f", diffusers {diffusers_version}" if diffusers_version else ", diffusers not installed")
    )
    print(render_table(
        "routing overhead per attention call (median, microseconds)",
        ("variant", "median us", "IQR us", "added vs its baseline us"),
        rows, caption,
    ))
    result = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": args.threads,
        "diffusers": diffusers_version,
        "median_ns": {name: s[0] for name, s in stats.items()},
        "overhead_ns": {
            "patched_sdpa_shortcut": stats["timm Attention, patched sdpa (shortcut path)"][0] - base_mod,
            "patched_decision_path": stats["timm Attention, patched backend with limits (decision path)"][0] - base_mod,
        },
    }
    return write_json(args.json, result)


if __name__ == "__main__":
    main(sys.argv[1:])
