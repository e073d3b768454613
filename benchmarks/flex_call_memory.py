"""One attention call at N tokens: flex (through attnswap) against SDPA, peak memory and time.

Without a BlockMask inductor's CPU flex kernel sizes its scratch to the whole sequence
(2 x threads x N^2 floats); attnswap gives every flex call a BlockMask. Variants: SDPA, flex
as attnswap calls it, and flex_attention compiled with no block mask (what attnswap did
before), each plain and with a bias (a (1, 1, 1, N) key bias, so the bias itself is small).

    python benchmarks/flex_call_memory.py [--n 4096] [--heads 1] [--dim 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from torch.nn.attention.flex_attention import flex_attention

from attnswap.bench import peak_allocated_bytes
from attnswap.routing import Policy, Router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.n, args.dim, generator=g) for _ in range(3))
    bias = torch.randn(1, 1, 1, args.n, generator=g)
    router = Router(Policy("flex", (), True), site="bench")
    no_block_mask = torch.compile(lambda q, k, v: flex_attention(q, k, v), dynamic=False, fullgraph=True)

    def no_block_mask_bias(q, k, v, b=bias.expand(1, args.heads, args.n, args.n)):
        return flex_attention(q, k, v, score_mod=lambda s, bb, h, i, j: s + b[bb, h, i, j])

    no_block_mask_bias = torch.compile(no_block_mask_bias, dynamic=False, fullgraph=True)
    variants = {
        "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "flex via attnswap (full BlockMask)": lambda: router.route(q, k, v),
        "flex_attention, no block mask": lambda: no_block_mask(q, k, v),
        "SDPA + bias": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        "flex via attnswap + bias": lambda: router.route(q, k, v, attn_mask=bias),
        "flex_attention + bias, no block mask": lambda: no_block_mask_bias(q, k, v),
    }
    rows = []
    with torch.no_grad():
        for fn in variants.values():
            fn()  # compiles
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, fn in variants.items():
            rows.append((name, statistics.median(times[name]) * 1e3, peak_allocated_bytes(fn) / 2**20))
    print(f"one call, q/k/v (1, {args.heads}, {args.n}, {args.dim}) float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    print("| variant | ms (median) | peak MB |")
    print("|---|---|---|")
    for name, ms, mb in rows:
        print(f"| {name} | {ms:.1f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
