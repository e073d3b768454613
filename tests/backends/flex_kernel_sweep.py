"""Where does inductor's CPU flex kernel compute wrong values? A sweep, run as its own process.

    ATEN_CPU_CAPABILITY=avx2 python tests/backends/flex_kernel_sweep.py [--head-dims 8,16] [--full]

Prints one JSON object: the vector instruction set inductor compiled for, how many calls were
checked, every (head_dim, q_len, kv_len, variant) whose output differed from float64 SDPA, and,
for each of those, whether attnswap's flex backend refuses the call (it must).

``flex_attention`` is compiled with dynamic shapes, so one compile per head dim serves every
length: hundreds of shapes cost seconds, where attnswap's per-signature compiles would cost
minutes. Before each call a NaN-filled block is allocated and freed, so a kernel that reads
memory it does not own shows it. The instruction set is chosen by ``ATEN_CPU_CAPABILITY``
before torch is imported (hence a process of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

DEFAULT_HEAD_DIMS = (4, 8, 12, 16, 20, 24, 32, 64)
FULL_HEAD_DIMS = (*range(1, 41), 48, 56, 64)
KV_LENS = (*range(2, 41), 47, 48, 56, 63, 64, 65, 130)
Q_LENS = (5, 17)
#: head dims also swept with an additive bias (the score_mod path of the kernel)
BIAS_HEAD_DIMS = (8, 16)
TOLERANCE = 1e-4


def sweep(head_dims, bias_head_dims, q_lens=Q_LENS, kv_lens=KV_LENS, repeats=2):
    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.accumulated_recompile_limit = 100_000
    gen = torch.Generator().manual_seed(0)
    wrong, checked = [], 0
    for variant, dims in (("plain", head_dims), ("bias", bias_head_dims)):
        for e in dims:
            torch._dynamo.reset()  # one compile per head dim (it is specialized); lengths stay dynamic
            if variant == "plain":
                kernel = torch.compile(lambda q, k, v: flex_attention(q, k, v), dynamic=True)
            else:
                def with_bias(q, k, v, bias):
                    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[b, h, i, j])

                kernel = torch.compile(with_bias, dynamic=True)
            for lq in q_lens:
                for lk in kv_lens:
                    worst = 0.0
                    for _ in range(repeats):
                        junk = torch.full((1 << 16,), float("nan"))
                        del junk
                        q, k, v = (torch.randn(1, 2, n, e, generator=gen) for n in (lq, lk, lk))
                        if variant == "plain":
                            out = kernel(q, k, v)
                            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                        else:
                            bias = torch.randn(1, 2, lq, lk, generator=gen)
                            out = kernel(q, k, v, bias)
                            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
                        err = (out.double() - ref).abs().max().item()
                        worst = max(worst, math.inf if math.isnan(err) else err)
                        checked += 1
                    if worst > TOLERANCE:
                        wrong.append({"head_dim": e, "q_len": lq, "kv_len": lk, "variant": variant, "error": worst})
    return wrong, checked


def refused_by_attnswap(case) -> list[str]:
    from attnswap.backends import get_backend
    from attnswap.call import facts_of

    q = torch.zeros(1, 2, case["q_len"], case["head_dim"])
    k = torch.zeros(1, 2, case["kv_len"], case["head_dim"])
    mask = torch.zeros(1, 2, case["q_len"], case["kv_len"]) if case["variant"] == "bias" else None
    return get_backend("flex").reasons(facts_of(q, k, k, mask))[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", help="comma-separated (default: a CI-sized set)")
    parser.add_argument("--full", action="store_true", help="head dims 1..40, 48, 56, 64 (minutes)")
    args = parser.parse_args(argv)
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    dims = FULL_HEAD_DIMS if args.full else DEFAULT_HEAD_DIMS
    if args.head_dims:
        dims = tuple(int(d) for d in args.head_dims.split(","))
    wrong, checked = sweep(dims, [d for d in BIAS_HEAD_DIMS if d in dims])
    for case in wrong:
        case["attnswap_refuses"] = refused_by_attnswap(case)
    json.dump(
        {
            "torch": torch.__version__,
            "isa": str(isa) if isa else "none",
            "lanes": isa.nelements(torch.float32) if isa else 0,
            "head_dims": list(dims),
            "checked": checked,
            "wrong": wrong,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
