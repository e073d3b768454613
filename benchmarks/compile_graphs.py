"""What a compiled graph holds where timm's hand-written attention was: for each hand-written
family of the test sample, ``torch.compile(fullgraph=True)`` of the unpatched and the patched
model (dynamo's graphs, counted by node target), and the compile time of each.

    python benchmarks/compile_graphs.py [--backend sdpa] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.testing

import attnswap
from _results import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import MANUAL_FAMILIES, build, features  # noqa: E402


def _graph(model, x):
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(lambda t: features(model, t), fullgraph=True, backend=counter)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    seconds = time.perf_counter() - start
    targets = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    return targets, seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from attnswap.reporting import render_table

    rows, result = [], {"torch": torch.__version__, "backend": args.backend, "families": []}
    for family in MANUAL_FAMILIES:
        torch._dynamo.reset()
        model, x = build(family)
        before, t_before = _graph(model, x)
        torch._dynamo.reset()
        attnswap.patch(model, backend=args.backend)
        after, t_after = _graph(model, x)
        traced = sum(sum(s.traced.values()) for s in attnswap.stats(model))
        count = lambda ts, needle: sum(needle in t for t in ts)  # noqa: E731
        row = dict(
            family=family, softmax_unpatched=count(before, "softmax"), softmax_patched=count(after, "softmax"),
            sdpa_unpatched=count(before, "scaled_dot_product"), sdpa_patched=count(after, "scaled_dot_product"),
            routed_calls=traced, compile_s_unpatched=t_before, compile_s_patched=t_after,
        )
        result["families"].append(row)
        rows.append((family, row["softmax_unpatched"], row["softmax_patched"], row["sdpa_unpatched"], row["sdpa_patched"],
                     traced, f"{t_before:.1f}", f"{t_after:.1f}"))
        torch._dynamo.reset()
    print(render_table(
        f"hand-written attention in dynamo graphs, patched with {args.backend!r}",
        ("family", "softmax unpatched", "softmax patched", "SDPA unpatched", "SDPA patched", "routed calls traced",
         "compile s unpatched", "compile s patched"),
        rows,
        f"torch {torch.__version__}; fullgraph=True, dynamo graphs (backend 'eager')",
    ))
    return write_json(args.json, result)


if __name__ == "__main__":
    main(sys.argv[1:])
