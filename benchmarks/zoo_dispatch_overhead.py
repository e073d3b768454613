"""What routing through a model library's adapter costs per attention call, next to what the
library's own dispatch costs, side by side in one process (rounds interleaved, medians).

transformers: the library's ``sdpa`` implementation (``sdpa_attention_forward``, what
``ALL_ATTENTION_FUNCTIONS`` dispatches to) against a direct SDPA call: that difference is the
library's own dispatch. attnswap's registered implementation (the same function with its SDPA
call going to the module's router, backend ``sdpa``) against the library's: that difference is
attnswap's. transformers models configured for ``eager`` (``tf eager``): the model file's eager
function against attnswap's ``"attnswap_eager"`` (the same function, its scores deferred to the
router): there attnswap replaces the computation, so the row shows what a call costs either way,
at a small shape and at 1,024 tokens (64-dim heads), where the ``SDPA`` column is the call it becomes. diffusers: ``dispatch_attention_fn`` (native backend) against the SDPA call it makes
(with its permutes), and attnswap's ``routed_dispatch`` against ``dispatch_attention_fn``.
Small shapes, so that the per-call overheads are not hidden by the arithmetic.

    python benchmarks/zoo_dispatch_overhead.py [--rounds 31] [--calls 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import attnswap
from _results import write_json


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def _measure(variants: dict, rounds: int, calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # first calls make the router's plan
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_per_call_us(fn, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def transformers_case(rounds: int, calls: int) -> dict[str, float]:
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attnswap.integrations import hf_transformers

    model = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=37,
    )).eval()
    attention = model.layers[0].self_attn
    attnswap.patch(model, backend="sdpa")
    routed = hf_transformers.routed_forward()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8, generator=g) for _ in range(3))
    scale = attention.scaling
    with torch.no_grad():
        return _measure({
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
            "library": lambda: sdpa_attention_forward(attention, q, k, v, None, scaling=scale),
            "attnswap": lambda: routed(attention, q, k, v, None, scaling=scale),
        }, rounds, calls)


def transformers_eager_case(rounds: int, calls: int, length: int = 16, head_dim: int = 8) -> dict[str, float]:
    """A model configured for ``eager`` (Gemma 2, no soft-capping): the model file's eager function
    (what the library calls) against attnswap's ``"attnswap_eager"`` implementation (the same function,
    its scores deferred to the router, backend ``sdpa``); ``sdpa``: the one call it becomes."""
    import transformers
    from transformers.models.gemma2 import modeling_gemma2

    from attnswap.integrations import hf_transformers

    model = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=99, hidden_size=4 * head_dim, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        head_dim=head_dim, intermediate_size=37, attn_logit_softcapping=None, query_pre_attn_scalar=head_dim,
    )).eval()
    attention = model.layers[0].self_attn
    attnswap.patch(model, backend="sdpa")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, length, head_dim, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, length, length).masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min
    )  # what eager's mask function builds for a causal call
    scale = attention.scaling
    with torch.no_grad():
        return _measure({
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
            "library": lambda: modeling_gemma2.eager_attention_forward(attention, q, k, v, mask, scaling=scale),
            "attnswap": lambda: hf_transformers.eager_forward(attention, q, k, v, mask, scaling=scale),
        }, rounds, calls)


def diffusers_case(rounds: int, calls: int) -> dict[str, float]:
    import diffusers
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from attnswap.integrations.hf_diffusers import routed_dispatch

    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=0, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    attention = model.transformer_blocks[0].attn
    attnswap.patch(model, backend="sdpa")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 4, 8, generator=g) for _ in range(3))  # diffusers' [B, L, H, D]

    def sdpa():
        return F.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (q, k, v))).permute(0, 2, 1, 3)

    with torch.no_grad():
        return _measure({
            "sdpa": sdpa,
            "library": lambda: dispatch_attention_fn(q, k, v),
            "attnswap": lambda: routed_dispatch(attention, q, k, v),
        }, rounds, calls)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    cases = (
        ("transformers", transformers_case), ("diffusers", diffusers_case),
        ("tf eager", transformers_eager_case),
        ("tf eager 1k", lambda r, c: transformers_eager_case(r, max(1, c // 100), length=1024, head_dim=64)),
    )
    for library, case in cases:
        t = case(args.rounds, args.calls)
        rows.append({
            "library": library, "sdpa_us": t["sdpa"], "library_us": t["library"], "attnswap_us": t["attnswap"],
            "library_dispatch_us": t["library"] - t["sdpa"], "attnswap_adds_us": t["attnswap"] - t["library"],
        })
    print(f"{'library':13s} {'SDPA':>8s} {'library':>9s} {'attnswap':>9s} {'library dispatch':>17s} {'attnswap adds':>14s}")
    for r in rows:
        print(f"{r['library']:13s} {r['sdpa_us']:8.2f} {r['library_us']:9.2f} {r['attnswap_us']:9.2f} "
              f"{r['library_dispatch_us']:+17.2f} {r['attnswap_adds_us']:+14.2f}")
    print(f"µs per call, median of {args.rounds} interleaved rounds x {args.calls} calls, 1 thread; torch {torch.__version__}, "
          f"python {platform.python_version()}")
    result = {"rows": rows, "rounds": args.rounds, "calls": args.calls, "torch": torch.__version__}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
