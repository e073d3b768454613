"""What routing hand-written attention costs: timm models whose attention is written out by hand
(q @ kᵀ, softmax, @ v), unpatched vs patched, side by side in one process.

A patched hand-written site defers the products into symbolic objects that intercept torch
functions (``surgery/scores.py``), then makes one router call. Patched with ``own_math`` (a
backend registered here that computes ``softmax(q @ kᵀ · scale + bias) @ v`` as the modules
write it), the difference from unpatched is the deferral's and the router's own cost;
``sdpa`` adds the difference between PyTorch's kernel and the module's math for those
shapes. Rounds interleave the variants; medians.

    python benchmarks/manual_overhead.py [--rounds 9] [--batch 1,32] [--json FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

import attnswap
from _results import write_json
from attnswap.models import features, relative_error

MODELS = [
    # (timm name, kwargs): one per hand-written family with many sites or calls
    ("levit_128s", {}),
    ("efficientvit_m0", {}),
    ("swinv2_cr_tiny_ns_224", {}),
    ("mvitv2_tiny", {}),
]


def forward_ms(model: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(calls):
            model(x)
        return (time.perf_counter() - t0) / calls * 1e3


def own_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The hand-written modules' own computation, as a backend (no dropout, causal or GQA here).
    A module that scaled q itself (EfficientViT-MSRA) reaches it with ``scale=1.0``: multiplying
    by one is not part of its math."""
    scores = q @ k.transpose(-2, -1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale != 1.0:
        scores = scores * scale
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1) @ v


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--models", help="comma-separated timm names (default: one per family)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import timm

    from attnswap.reporting import render_table

    models = [(m, {}) for m in args.models.split(",")] if args.models else MODELS
    attnswap.register_backend("own_math", own_math)
    rows, result = [], {"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(), "models": []}
    for name, kwargs in models:
        size = timm.get_pretrained_cfg(name).input_size if timm.get_pretrained_cfg(name) else (3, 224, 224)
        plain = timm.create_model(name, pretrained=False, **kwargs).eval()
        variants = {"unpatched": plain}
        for backend in ("own_math", "sdpa"):
            variants[backend] = timm.create_model(name, pretrained=False, **kwargs).eval()
            variants[backend].load_state_dict(plain.state_dict())
            report = attnswap.patch(variants[backend], backend=backend)
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, *size)
            with torch.no_grad():
                ref = features(plain, x)
                err = max(relative_error(features(variants[b], x), ref) for b in ("own_math", "sdpa"))
            attnswap.stats(variants["sdpa"], reset=True)
            forward_ms(variants["sdpa"], x, 1)
            per_call = attnswap.stats(variants["sdpa"]).total_calls
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v, model in variants.items():
                    times[v].append(forward_ms(model, x, args.calls))
            med = {v: statistics.median(t) for v, t in times.items()}
            us = {v: (med[v] - med["unpatched"]) * 1e3 / max(per_call, 1) for v in ("own_math", "sdpa")}
            # each round's patched time over the unpatched time of the same round, then the median:
            # drift of the machine between rounds cancels
            ratio = {
                v: statistics.median(p / u for p, u in zip(times[v], times["unpatched"])) for v in ("own_math", "sdpa")
            }
            rows.append((name, batch, len(report.patched), per_call, f"{med['unpatched']:.2f}",
                         f"{med['own_math']:.2f} ({us['own_math']:+.0f})", f"{ratio['own_math']:.3f}",
                         f"{med['sdpa']:.2f} ({us['sdpa']:+.0f})", f"{ratio['sdpa']:.3f}", f"{err:.1e}"))
            result["models"].append(dict(model=name, batch=batch, sites=len(report.patched), calls=per_call,
                                         median_ms=med, per_call_us=us, paired_ratio=ratio, rel_err=err))
    print(render_table(
        "hand-written attention: unpatched vs patched, forward ms (µs added per router call), CPU",
        ("model", "batch", "sites", "router calls", "unpatched", "patched own_math", "own_math ×", "patched sdpa",
         "sdpa ×", "rel err (features)"),
        rows,
        f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds x {args.calls} forwards; "
        "×: median over rounds of patched / unpatched in the same round",
    ))
    return write_json(args.json, result)


if __name__ == "__main__":
    main(sys.argv[1:])
