"""One shifted-window attention call (Swin stage 1): the bias as timm builds it against the window
structure, peak memory and time.

timm's fused branch expands the ``[nW, N, N]`` shift mask to every image and head and adds the
window's ``[1, H, N, N]`` relative-position bias: a ``[B·nW, H, N, N]`` tensor per call. Variants:

- ``timm (mask expanded) + SDPA``: that expression, then SDPA (what unpatched fused timm runs);
- ``sdpa via attnswap``: a ``WindowedBias`` through the router to ``sdpa`` (materialized: the same);
- ``flex via attnswap``: the same structure to ``flex``, which reads bias and mask per score.

Shapes default to swin_tiny at 224 (56×56 tokens, 7×7 windows: nW = 64, N = 49, 3 heads of 32).

    python benchmarks/window_call.py [--batch 32] [--heads 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from attnswap.bench import peak_allocated_bytes
from attnswap.routing import Policy, Router
from attnswap.structure.windows import WindowedBias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--window", type=int, default=7)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n, windows, heads = args.window**2, args.windows, args.heads
    batch = args.batch * windows
    q, k, v = (torch.randn(batch, heads, n, args.dim, generator=g) for _ in range(3))
    bias = torch.randn(1, heads, n, n, generator=g)
    mask = torch.where(torch.rand(windows, n, n, generator=g) < 0.5, -100.0, 0.0)

    def timm_fused():
        expanded = mask.view(1, windows, 1, n, n).expand(batch // windows, -1, heads, -1, -1)
        attn_mask = bias + expanded.reshape(-1, heads, n, n)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    routers = {name: Router(Policy(name, (), True), site="bench") for name in ("sdpa", "flex")}
    variants = {
        "timm (mask expanded) + SDPA": timm_fused,
        "sdpa via attnswap (WindowedBias, materialized)": lambda: routers["sdpa"].route(
            q, k, v, attn_mask=WindowedBias(bias, mask, batch, heads)),
        "flex via attnswap (WindowedBias, from its parts)": lambda: routers["flex"].route(
            q, k, v, attn_mask=WindowedBias(bias, mask, batch, heads)),
    }
    rows = []
    with torch.no_grad():
        ref = timm_fused()
        errors = {name: ((fn() - ref).abs().max() / ref.abs().max()).item() for name, fn in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, fn in variants.items():
            rows.append((name, statistics.median(times[name]) * 1e3, peak_allocated_bytes(fn) / 2**20, errors[name]))
    print(f"one shifted-window call, q/k/v ({batch}, {heads}, {n}, {args.dim}) float32 (batch {args.batch} × "
          f"{windows} windows), torch {torch.__version__}, {torch.get_num_threads()} threads, {datetime.date.today()}")
    print("| variant | ms (median) | peak MB | rel. error |")
    print("|---|---|---|---|")
    for name, ms, mb, err in rows:
        print(f"| {name} | {ms:.1f} | {mb:.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
