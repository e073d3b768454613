"""How long ``attnswap.patch()`` takes on a large timm model (built on the meta device: no weights).

- cold: the first patch in a fresh process, which also analyses and rewrites each attention
  class once (median over ``--cold`` subprocesses);
- warm: patch after unpatch in the same process (class analysis cached), median over ``--warm``;
- unpatch: median over the same repeats.

    python benchmarks/patch_time.py [--model vit_large_patch16_224] [--cold 5] [--warm 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from _results import write_json

_COLD = """
import time, timm, torch, attnswap
model = timm.create_model({model!r}, pretrained=False, device="meta")
t = time.perf_counter(); report = attnswap.patch(model, backend="sdpa"); dt = time.perf_counter() - t
print(dt, len(report))
"""


def cold_times(model: str, repeats: int) -> tuple[list[float], int]:
    out, sites = [], 0
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _COLD.format(model=model)], capture_output=True, text=True, check=True)
        dt, sites = done.stdout.split()[-2:]
        out.append(float(dt))
    return out, int(sites)


def warm_times(model_name: str, repeats: int) -> tuple[list[float], list[float]]:
    import timm

    import attnswap

    model = timm.create_model(model_name, pretrained=False, device="meta")
    attnswap.patch(model)
    attnswap.unpatch(model)
    patch, unpatch = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        attnswap.patch(model, backend="sdpa")
        patch.append(time.perf_counter() - t)
        t = time.perf_counter()
        attnswap.unpatch(model)
        unpatch.append(time.perf_counter() - t)
    return patch, unpatch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_large_patch16_224")
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch
    import timm

    cold, sites = cold_times(args.model, args.cold)
    warm, unpatch = warm_times(args.model, args.warm)
    ms = lambda xs: f"{statistics.median(xs) * 1e3:.2f} (min {min(xs) * 1e3:.2f}, max {max(xs) * 1e3:.2f})"  # noqa: E731
    from attnswap.reporting import render_table

    print(render_table(
        f"attnswap.patch() on {args.model} ({sites} attention sites, meta device)",
        ("what", "median ms"),
        [("patch, cold (first in a fresh process)", ms(cold)), ("patch, warm", ms(warm)), ("unpatch", ms(unpatch))],
        f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}, "
        f"{args.cold} cold processes, {args.warm} warm repeats",
    ))
    result = {
        "model": args.model, "sites": sites, "torch": torch.__version__, "timm": timm.__version__,
        "cold_ms": statistics.median(cold) * 1e3, "warm_ms": statistics.median(warm) * 1e3,
        "unpatch_ms": statistics.median(unpatch) * 1e3,
    }
    return write_json(args.json, result)


if __name__ == "__main__":
    main(sys.argv[1:])
