"""Pinned kernels from several threads: do they slow each other down beyond the cores they share?

Each thread runs calls pinned to a kernel (threads alternate ``sdpa_flash`` and ``sdpa_math``)
through attnswap's routers, and, for comparison, through the ``sdpa_kernel`` path attnswap
used before (a process-global switch, so a lock around each pinned call). torch runs one
intra-op thread per call, so T threads on C cores can at best take max(1, T / C) times as long
per call as one thread alone. The table gives, per thread count, the median time per call
relative to that bound (1.00 = no slowdown beyond the shared cores), medians over rounds.

    python benchmarks/pinned_threads.py [--threads 1,2,4] [--rounds 7] [--seconds 0.5] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

import torch

from _results import write_json


def _workers(kind: str, q):
    from attnswap.backends.sdpa import _pinned
    from attnswap.routing import Policy, Router

    routers = {name: Router(Policy(name, (), strict=True)) for name in ("sdpa_flash", "sdpa_math")}
    kernels = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_math": "MATH"}

    def call(name):
        if kind == "attnswap":
            return lambda: routers[name].route(q, q, q)
        return lambda: _pinned(kernels[name], q, q, q, None, 0.0, False, None, False)

    return call


def run(kind: str, threads: int, seconds: float, q, first: str = "sdpa_flash") -> dict[str, float]:
    """Per-call seconds of each kernel's threads when ``threads`` threads run at once."""
    call = _workers(kind, q)
    other = "sdpa_math" if first == "sdpa_flash" else "sdpa_flash"
    names = [first if i % 2 == 0 else other for i in range(threads)]
    fns = [call(n) for n in names]
    for fn in fns:
        fn()
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def body(i):
        fn = fns[i]
        start.wait()
        n = 0
        while not stop.is_set():
            fn()
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    out: dict[str, list[float]] = {}
    for name, n in zip(names, counts):
        out.setdefault(name, []).append(elapsed / max(n, 1))
    return {name: statistics.median(v) for name, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    q = torch.randn(1, 4, 64, 32)
    counts = [int(t) for t in args.threads.split(",")]
    kinds = ("attnswap", "sdpa_kernel + lock")
    samples: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                for t in counts:
                    for first in ("sdpa_flash", "sdpa_math") if t == 1 else ("sdpa_flash",):
                        for name, per_call in run(kind, t, args.seconds, q, first).items():
                            samples.setdefault((kind, t, name), []).append(per_call)
    med = {key: statistics.median(v) for key, v in samples.items()}
    rows, result = [], {}
    for kind in kinds:
        for t in counts:
            for name in ("sdpa_flash", "sdpa_math"):
                if (kind, t, name) not in med:
                    continue
                alone = med[("attnswap", 1, name)]  # the kernel alone, with no switch around it
                bound = alone * max(1.0, t / cores)
                ratio = med[(kind, t, name)] / bound
                result[f"{kind}, {t} threads, {name}"] = {"us_per_call": med[(kind, t, name)] * 1e6, "vs_bound": ratio}
                rows.append((kind, t, name, f"{med[(kind, t, name)] * 1e6:.1f}", f"{ratio:.2f}"))
    from attnswap.reporting import render_table

    print(render_table(
        "pinned kernels from several threads (per call, median over rounds)",
        ("path", "threads", "kernel", "us per call", "vs one thread alone x max(1, threads/cores)"),
        rows,
        f"torch {torch.__version__}, {platform.machine()}, {cores} cores, 1 intra-op thread, "
        f"q/k/v [1, 4, 64, 32] float32, {args.rounds} rounds x {args.seconds} s; threads alternate sdpa_flash/sdpa_math",
    ))
    return write_json(args.json, {"torch": torch.__version__, "cores": cores, "results": result})


if __name__ == "__main__":
    main(sys.argv[1:])
