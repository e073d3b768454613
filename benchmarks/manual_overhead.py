"""What routing hand-written attention costs: timm models whose attention is written out by hand
(q @ kᵀ, softmax, @ v), unpatched vs patched with ``sdpa``, side by side in one process.

A patched hand-written site defers the products into symbolic objects that intercept torch
functions (``surgery/scores.py``), then makes one router call; the cost is Python work per
call, so it shows most on small inputs. Rounds interleave the variants; medians.

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
    rows, result = [], {"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(), "models": []}
    for name, kwargs in models:
        size = timm.get_pretrained_cfg(name).input_size if timm.get_pretrained_cfg(name) else (3, 224, 224)
        plain = timm.create_model(name, pretrained=False, **kwargs).eval()
        routed = timm.create_model(name, pretrained=False, **kwargs).eval()
        routed.load_state_dict(plain.state_dict())
        report = attnswap.patch(routed, backend="sdpa")
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, *size)
            with torch.no_grad():
                err = float((routed(x) - plain(x)).abs().max() / plain(x).abs().max())
            attnswap.stats(routed, reset=True)
            forward_ms(routed, x, 1)
            per_call = attnswap.stats(routed).total_calls
            times: dict[str, list[float]] = {"unpatched": [], "patched": []}
            for _ in range(args.rounds):
                times["unpatched"].append(forward_ms(plain, x, args.calls))
                times["patched"].append(forward_ms(routed, x, args.calls))
            a, b = statistics.median(times["unpatched"]), statistics.median(times["patched"])
            overhead_us = (b - a) * 1e3 / max(per_call, 1)
            rows.append((name, batch, len(report.patched), per_call, f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}",
                         f"{overhead_us:+.0f}", f"{err:.1e}"))
            result["models"].append(dict(model=name, batch=batch, sites=len(report.patched), calls=per_call,
                                         unpatched_ms=a, patched_ms=b, ratio=b / a, per_call_us=overhead_us, rel_err=err))
    print(render_table(
        "hand-written attention: unpatched vs patched (sdpa), forward, CPU",
        ("model", "batch", "sites", "router calls", "unpatched ms", "patched ms", "ratio", "µs per call", "rel err"),
        rows,
        f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds x {args.calls} forwards",
    ))
    return write_json(args.json, result)


if __name__ == "__main__":
    main(sys.argv[1:])
