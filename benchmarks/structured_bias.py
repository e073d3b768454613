"""Structured biases: a model's forward unpatched vs patched, time and peak memory growth.

Default: samvit_base_patch16 at 1024x1024 (its global layers' decomposed relative-position
bias is (12, 4096, 4096) float32, 805 MB per image), batch 1, float32, ``forward_features``
under ``torch.no_grad``, random weights with non-zero rel-pos tables. Variants:

- ``unpatched``: timm's own code (builds the whole bias, SDPA);
- ``sdpa``: the bias held as its factors; SDPA gets it a slice of query rows at a time;
- ``sdpa_whole``: the same, but materialized whole (``MATERIALIZE_BUDGET`` unbounded);
- ``flex``: flex computes the bias from its factors in the kernel (``score_mod``, full BlockMask).

Peak memory growth: the most memory torch had allocated at once during one forward, above
what was allocated before it (CPU allocator events recorded by the profiler, in a forward of
its own). Time: median over ``--repeats`` forwards, variants interleaved round by round.
Error: max |out - unpatched| / max |unpatched|.

Other structures: ``--model swin_tiny_patch4_window7_224 --size 224 --batch 32`` (shifted
windows: the [B·nW, H, 49, 49] mask and bias timm expands for every shifted block), or
``--model beit_large_patch16_512 --size 512`` (a [1, 16, 1025, 1025] table gather per layer).

    python benchmarks/structured_bias.py [--model samvit_base_patch16] [--size 1024] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import timm
import torch

import attnswap
from attnswap import forms, routing
from attnswap.bench import peak_allocated_bytes

from _results import write_json

VARIANTS = ("unpatched", "sdpa", "sdpa_whole", "flex")


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size, num_classes=0).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "rel_pos" in pname:  # timm initializes them to zeros: make the bias matter
                p.normal_(std=0.5)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="samvit_base_patch16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-mb", type=float, help="forms.MATERIALIZE_BUDGET for the sdpa variant (default: attnswap's)")
    ap.add_argument("--min-rows", type=int, help="forms.MIN_ROWS (default: attnswap's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.budget_mb:
        forms.MATERIALIZE_BUDGET = int(args.budget_mb * 2**20)
    if args.min_rows:
        forms.MIN_ROWS = args.min_rows
    variants = args.variants.split(",")

    model = build(args.model, args.size)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    budget = forms.MATERIALIZE_BUDGET

    def setup(variant: str) -> None:
        attnswap.unpatch(model) if attnswap.is_patched(model) else None
        forms.MATERIALIZE_BUDGET = budget
        if variant == "unpatched":
            return
        if variant == "sdpa_whole":
            forms.MATERIALIZE_BUDGET = 1 << 62
        attnswap.patch(model, backend="flex" if variant == "flex" else "sdpa", strict=True)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model.forward_features(x)

    results: dict[str, dict] = {}
    reference = None
    for variant in variants:  # warm-up (flex compiles), error and peak memory
        setup(variant)
        out = forward()
        if variant == "unpatched":
            reference = out
        err = None if reference is None else ((out - reference).abs().max() / reference.abs().max()).item()
        served_as = sorted({f"{t.backend}: {t.structure[1]}" for m in model.modules()
                        if (r := routing_of(m)) for t in r.tallies() if t.structure})
        results[variant] = {"error": err, "peak_mb": peak_allocated_bytes(forward) / 2**20, "times": [], "forms": served_as}
        del out
    for _ in range(args.repeats):
        for variant in variants:
            setup(variant)
            t0 = time.perf_counter()
            forward()
            results[variant]["times"].append(time.perf_counter() - t0)
    setup("unpatched")

    base = results.get("unpatched")
    print(f"{args.model} @ {args.size}, batch {args.batch}, float32, forward_features, torch {torch.__version__}, "
          f"timm {timm.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}")
    print("| variant | bias reached the kernel as | forward s (median) | vs unpatched | peak growth MB | vs unpatched | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        r["median_s"] = statistics.median(r["times"])
        t_ratio = r["median_s"] / base["median_s"] if base else float("nan")
        m_ratio = base["peak_mb"] / r["peak_mb"] if base else float("nan")
        err = "—" if r["error"] is None or variant == "unpatched" else f"{r['error']:.1e}"
        print(f"| {variant} | {'; '.join(r['forms']) or '—'} | {r['median_s']:.2f} | {t_ratio:.2f}x | "
              f"{r['peak_mb']:.0f} | {m_ratio:.1f}x less | {err} |")
    write_json(args.json, {"model": args.model, "size": args.size, "batch": args.batch, "torch": torch.__version__, "results": results})


def routing_of(module: torch.nn.Module):
    return module.__dict__.get(routing.ROUTER_ATTR)


if __name__ == "__main__":
    main()
