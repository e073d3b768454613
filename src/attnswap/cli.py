"""The ``attnswap`` command line.

    attnswap backends [--json]
    attnswap bench [MODEL] [--backends sdpa,flex,auto,...] [--batch N] [--img-size S] [--dtype D] [--device D]
                   [--compile] [--train] [--threads T] [--repeats R] [--plot FILE.png] [--json FILE]
    (``attnswap demo`` is the same command)
    attnswap inspect MODEL [--backend X] [--batch N] [--img-size S] [--input-shape ...] [--json]
    attnswap verify MODEL --backend X [--tolerance T] [--dtype D] [--json]
    attnswap coverage [GLOB ...] [--out COVERAGE.md] [--json FILE] [--no-numerics] [--max-params 100]
    attnswap fuzz [BACKEND ...] [--calls 1000] [--specs K] [--dtypes float32,float64] [--seed S] [--json FILE]
    attnswap run [--backend B] [--fallback B,...] [--strict] [--exclude GLOB ...] [-m] SCRIPT|MODULE [ARGS ...]

``bench`` is the main job: it builds a timm model locally (no weights are downloaded),
patches it with each backend in turn, and shows which backend served every call (fallbacks
with reasons), how far each output is from the unpatched model's, and forward times measured
side by side (rounds interleaved, medians with min-max).
"""

from __future__ import annotations

import argparse
import json
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


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    shape = tuple(int(n) for n in args.input_shape.split(",")) if args.input_shape else None
    console = _console()
    steps = (len(backends) + 1) * (args.repeats + 1)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"{args.model}: building", total=steps)

        def advance(what: str) -> None:
            bar.update(task, advance=1, description=f"{args.model}: {what}")

        result = bench.run_named(
            args.model, backends, batch=args.batch, img_size=args.img_size, input_shape=shape, dtype=args.dtype,
            device=args.device, repeats=args.repeats, train=args.train, compile=args.compile, progress=advance,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=1, default=str)
    if args.plot:
        result.plot(args.plot)
    console.print(result.table())
    return 1 if any(v.error for v in result.variants) else 0


def _model_and_input(args: argparse.Namespace):
    import torch

    from .models import example_input, load_model

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = load_model(args.model).to(device=args.device, dtype=dtype).eval()
    shape = tuple(int(n) for n in args.input_shape.split(",")) if args.input_shape else None
    return model, example_input(model, args.batch, args.img_size, shape, dtype, args.device)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    model, x = _model_and_input(args)
    result = inspect(model, x, backend=args.backend, name=args.model)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1, default=str))
    else:
        _console().print(result.table())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    model, x = _model_and_input(args)
    result = verify(model, x, args.backend, name=args.model, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1, default=str))
    else:
        _console().print(result.table())
    return 1 if result.flagged else 0


def _add_model_args(p: argparse.ArgumentParser, batch: int = 1) -> None:
    p.add_argument("model", help="timm model name (built without weights) or package.module:attribute")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--input-shape", default=None, help="full input shape, e.g. 8,3,224,224 (for non-timm models)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_coverage(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import coverage

    names = coverage.model_names(args.patterns, zoo=args.zoo)
    if not names:
        print(f"attnswap: no {args.zoo} model matches {args.patterns}", file=sys.stderr)
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

    results = coverage.sweep(
        names, numerics=not args.no_numerics, max_params_m=args.max_params, progress=progress, zoo=args.zoo
    )
    seconds = time.perf_counter() - start
    from .zoos import get_zoo

    command = "attnswap coverage " + " ".join(
        [*args.patterns, *([f"--zoo {args.zoo}"] if args.zoo != "timm" else []),
         *(["--no-numerics"] if args.no_numerics else []), f"--max-params {args.max_params:g}"]
    )
    env = (
        f"{args.zoo} {get_zoo(args.zoo).version()}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}"
    )
    if args.json:
        coverage.save_json(results, args.json)
    if args.out:
        from pathlib import Path

        coverage.write_section(
            Path(args.out), coverage.markdown(results, command=command, environment=env, seconds=seconds, zoo=args.zoo)
        )
    totals = coverage.totals(results)
    print(json.dumps(totals, indent=1))
    bad = [r.name for r in results if not r.ok]
    if bad:
        print(f"attnswap coverage: {len(bad)} models with problems: {', '.join(bad[:20])}", file=sys.stderr)
        return 1
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    import platform

    import torch

    from .fuzz import fuzz
    from .reporting import build_table

    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    reports = []
    for name in args.backends or ["sdpa", "sdpa_math", "sdpa_flash", "eager"]:
        reports.append(fuzz(name, args.calls, dtypes=dtypes, specs=args.specs, seed=args.seed, max_len=args.max_len))
        r = reports[-1]
        print(f"{name}: {r.calls} calls, {len(r.wrong)} wrong ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
    rows = [
        (r.backend, r.calls, r.served, r.refused, r.fell_back, len(r.wrong),
         ", ".join(f"{d} {w:.2g}" for d, w in sorted(r.worst.items())), f"{r.seconds:.1f}")
        for r in reports
    ]
    title = (
        f"fuzz vs float64 eager: torch {torch.__version__}, {platform.machine()} "
        f"{torch.backends.cpu.get_cpu_capability()}, seed {args.seed}"
    )
    header = ("backend", "calls", "served", "refused (strict)", "fell back", "wrong", "worst / tolerance", "seconds")
    _console().print(build_table(title, header, rows))
    for r in reports:
        for w in r.wrong[:20]:
            print(f"WRONG {w}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in reports], f, indent=1)
    return 1 if any(r.wrong for r in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnswap", description="Route the attention of PyTorch models to the backend you choose.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list every backend, available or not, with its limits")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser(
        "bench", aliases=["demo"],
        help="time a model (timm name or module:attr) patched with each backend against the unpatched model",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"timm model name (built without weights) or package.module:attribute (default {DEFAULT_MODEL})")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma-separated, 'auto' allowed (default {DEFAULT_BACKENDS})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--input-shape", default=None, help="full input shape, e.g. 8,3,224,224 (for non-timm models)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each variant (timed after compiling)")
    p.add_argument("--train", action="store_true", help="time forward+backward in train mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG) here; needs matplotlib")
    p.add_argument("--json", default=None, help="write the full result as JSON here")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("inspect", help="each attention site: how it is reached, what its calls pass, which backend serves them")
    _add_model_args(p)
    p.add_argument("--backend", default="sdpa", help="the backend to show decisions for (default sdpa)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="per-site error of a backend against a float64 eager reference")
    _add_model_args(p)
    p.add_argument("--backend", required=True)
    p.add_argument("--tolerance", type=float, default=None, help="relative error allowed (default: by dtype)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("coverage", help="patch every model of a library (or those matching GLOBs) and check every attention is routed")
    p.add_argument("patterns", nargs="*", help="model name globs (default: every model of the library)")
    p.add_argument("--zoo", default="timm", choices=["timm", "torchvision", "transformers", "diffusers"], help="the model library to sweep")
    p.add_argument("--out", default=None, help="write the markdown report here (e.g. COVERAGE.md; the other libraries' sections are kept)")
    p.add_argument("--json", default=None, help="write per-model results as JSON here")
    p.add_argument("--no-numerics", action="store_true", help="discovery only (meta device), no forward")
    p.add_argument("--max-params", type=float, default=30.0, help="millions of parameters above which no forward runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per model, not only problems")
    p.set_defaults(func=cmd_coverage)
    p = sub.add_parser("fuzz", help="random calls through each backend vs float64 eager: any wrong answer exits 1")
    p.add_argument("backends", nargs="*", help="backend names (default: sdpa sdpa_math sdpa_flash eager)")
    p.add_argument("--calls", type=int, default=1000, help="calls per backend, split over dtypes and strict/fallback")
    p.add_argument("--specs", type=int, default=None, help="distinct call signatures per dtype and mode (bounds flex compiles)")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--max-len", type=int, default=48, help="longest query/key sequence drawn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the reports as JSON here")
    p.set_defaults(func=cmd_fuzz)
    p = sub.add_parser(
        "run", help="run a script unmodified, every model it calls patched with a backend; per-site counts at the end",
        description="Run SCRIPT (or -m MODULE) as __main__ with ARGS, the way python -m cProfile does; every model "
        "it calls is patched before its first forward, and the per-site statistics are printed to stderr when it ends. "
        "Example: attnswap run --backend flex -- train.py --model vit_base_patch16_224",
    )
    p.add_argument("--backend", default="sdpa", help="the backend every model is patched with (default sdpa)")
    p.add_argument("--fallback", default=None, help="comma-separated fallback backends (default: sdpa)")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back or leaving a site unrouted")
    p.add_argument("--exclude", action="append", default=None, help="module path or class glob to leave alone (repeatable)")
    p.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, run like python -m")
    p.add_argument("target", help="the script (or, with -m, the module) to run")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=cmd_run)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_script

    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    kwargs = {}
    if args.fallback:
        kwargs["fallback"] = [b for b in args.fallback.split(",") if b]
    if args.exclude:
        kwargs["exclude"] = args.exclude
    return run_script(
        args.target, script_args, module=args.module, backend=args.backend, strict=args.strict, **kwargs
    )


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
