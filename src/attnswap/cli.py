"""The ``attnswap`` command line.

    attnswap backends [--json]
    attnswap demo [MODEL] [--backends sdpa,sdpa_math,...] [--batch N] [--img-size S] [--dtype float32] [--repeats R]
    attnswap coverage [GLOB ...] [--out COVERAGE.md] [--json FILE] [--no-numerics] [--max-params 100]

``demo`` is the main job: it builds a timm model locally (no weights are downloaded),
patches it with each backend in turn, and shows which sites were routed, which backend
served every call (fallbacks with reasons) and how far each output is from the unpatched
model's, with forward times measured side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Sequence

DEFAULT_MODEL = "swin_tiny_patch4_window7_224"
DEFAULT_BACKENDS = "sdpa,sdpa_math,sdpa_flash,flex,eager"


def _console():
    from rich.console import Console

    # piped output (logs, CI) gets a fixed width rather than rich's 80-column default
    return Console(width=None if sys.stdout.isatty() else 160)


def cmd_backends(args: argparse.Namespace) -> int:
    from .backends import list_backends

    infos = list_backends()
    if args.json:
        print(json.dumps([b.as_dict() for b in infos], indent=2, default=str))
        return 0
    from .reporting import build_table

    rows = []
    for b in infos:
        limits = "; ".join(
            f"{dev}: " + (", ".join(f"{k}={v}" for k, v in lim.items()) if lim else "no limits")
            for dev, lim in b.limits.items()
        )
        status = "yes" if b.available else f"no: {b.reason}" + (f" ({b.install_hint})" if b.install_hint else "")
        rows.append((b.name, status, b.description, limits))
    _console().print(build_table("attention backends", ("backend", "available", "what", "declared limits"), rows))
    return 0


def _time_forward(model, x, repeats: int) -> list[float]:
    import torch

    times = []
    with torch.no_grad():
        model(x)  # warm-up: decisions made, kernels compiled
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return times


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import api
    from .backends import registry
    from .reporting import build_table

    try:
        import timm
    except ImportError:
        print("attnswap demo needs timm: pip install timm", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    backends = [registry.resolve_name(b.strip()) for b in args.backends.split(",") if b.strip()]
    console = _console()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(dtype)
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(args.batch, 3, size, size, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    base = _time_forward(model, x, args.repeats)
    rows = [("unpatched", "-", "-", "-", f"{statistics.median(base) * 1e3:.1f}", "1.00", "-")]
    first_report = None
    with console.status("running") as status:
        for name in backends:
            status.update(f"{args.model}: {name}")
            report = api.patch(model, backend=name)
            first_report = first_report or report
            with torch.no_grad():
                out = model(x)
            times = _time_forward(model, x, args.repeats)
            stats = api.stats(model)
            err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
            served = ", ".join(f"{b}: {n}" for b, n in stats.by_backend().items())
            why = sorted({f"{b}: {'; '.join(r)}" for s in stats for fb in s.fallbacks for b, r in fb.refused.items()})
            rows.append((
                name, str(len(report)), served, f"{err:.1e}", f"{statistics.median(times) * 1e3:.1f}",
                f"{statistics.median(base) / statistics.median(times):.2f}", " | ".join(why) or "-",
            ))
            api.unpatch(model)
    if first_report is not None:
        if args.sites:
            console.print(first_report)
        else:
            flags = sorted({f for s in first_report.patched for f in s.flags})
            console.print(
                f"{args.model}: {len(first_report)} attention sites routed"
                + (f" (set {', '.join(f + '=True' for f in flags)} on them to take their SDPA path)" if flags else "")
                + (f"; {len(first_report.not_routable)} attention-like modules not routed" if first_report.not_routable else "")
                + " (--sites lists them)"
            )
    caption = (
        f"{args.model}, batch {args.batch}, {size}px, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} forwards after one warm-up"
    )
    console.print(build_table(
        "attnswap demo: every attention call routed, outputs compared with the unpatched model",
        ("backend", "sites", "calls served by", "max rel. error", "forward ms", "speed-up", "fallback reasons"),
        rows, caption,
    ))
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import coverage

    names = coverage.model_names(args.patterns)
    if not names:
        print(f"attnswap: no timm model matches {args.patterns}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def progress(r: coverage.ModelCoverage) -> None:
        if args.verbose or not r.ok:
            err = f"{r.rel_err:.1e}" if r.rel_err is not None else r.skipped
            print(
                f"{'ok ' if r.ok else 'BAD'} {r.name}: {r.routed}/{r.sites} routed, err {err}, "
                f"escaped {r.escaped}, unrouted {r.unrouted} {r.error}",
                flush=True,
            )

    results = coverage.sweep(names, numerics=not args.no_numerics, max_params_m=args.max_params, progress=progress)
    seconds = time.perf_counter() - start
    import timm

    command = "attnswap coverage " + " ".join(
        [*args.patterns, *(["--no-numerics"] if args.no_numerics else []), f"--max-params {args.max_params:g}"]
    )
    env = (
        f"timm {timm.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}"
    )
    if args.json:
        coverage.save_json(results, args.json)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(coverage.markdown(results, command=command, environment=env, seconds=seconds))
    totals = coverage.totals(results)
    print(json.dumps(totals, indent=1))
    bad = [r.name for r in results if not r.ok]
    if bad:
        print(f"attnswap coverage: {len(bad)} models with problems: {', '.join(bad[:20])}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnswap", description="Route the attention of PyTorch models to the backend you choose.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list every backend, available or not, with its limits")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser("demo", help="patch a locally built timm model with each backend and compare")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma-separated (default {DEFAULT_BACKENDS})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sites", action="store_true", help="print every attention site found")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("coverage", help="patch every timm model (or those matching GLOBs) and check every attention is routed")
    p.add_argument("patterns", nargs="*", help="model name globs (default: every timm model)")
    p.add_argument("--out", default=None, help="write the markdown report here (e.g. COVERAGE.md)")
    p.add_argument("--json", default=None, help="write per-model results as JSON here")
    p.add_argument("--no-numerics", action="store_true", help="discovery only (meta device), no forward")
    p.add_argument("--max-params", type=float, default=30.0, help="millions of parameters above which no forward runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per model, not only problems")
    p.set_defaults(func=cmd_coverage)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import AttnSwapError

    try:
        return args.func(args)
    except AttnSwapError as exc:
        print(f"attnswap: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
