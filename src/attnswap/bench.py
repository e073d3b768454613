"""``attnswap bench``: one model, each backend against the unpatched model, side by side.

Eagerly, rounds interleave the variants (unpatched, then each backend, patched in turn on the
same model), so every variant sees the same machine noise; medians with the spread. Under
``compile=True`` each variant is compiled once and timed in its own block (recompiling every
round would time the compiler). ``train=True`` times forward + backward in train mode; the
error is always measured in eval mode against the unpatched model's features.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import api
from .auto import AUTO
from .backends import registry
from .models import (
    Inputs, check_runs, example_input, features, first_tensor, input_dtype, input_shape, relative_error, run_model,
)

UNPATCHED = "unpatched"


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """The most memory torch held at once while ``fn()`` ran, above what it held before (CPU
    allocator events as ``torch.profiler`` records them; on CUDA use ``torch.cuda.max_memory_allocated``)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return peak


@dataclass
class Variant:
    """One row: the unpatched model or one backend."""

    backend: str
    times_ms: list[float] = field(default_factory=list)
    rel_err: float | None = None
    sites: int = 0
    calls: int = 0
    fallbacks: int = 0
    served: dict[str, int] = field(default_factory=dict)
    fallback_reasons: list[str] = field(default_factory=list)
    tuning_s: float = 0.0
    error: str = ""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def spread_ms(self) -> tuple[float, float] | None:
        return (min(self.times_ms), max(self.times_ms)) if self.times_ms else None


@dataclass
class BenchResult:
    model: str
    batch: int
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    compiled: bool
    train: bool
    repeats: int
    variants: list[Variant]
    environment: dict[str, Any]

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def speedup(self, v: Variant) -> float | None:
        base, mine = self.baseline.median_ms, v.median_ms
        return base / mine if base and mine else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, v in zip(out["variants"], self.variants):
            row.update(median_ms=v.median_ms, spread_ms=v.spread_ms, speedup=self.speedup(v))
        return out

    def rows(self) -> list[tuple]:
        rows = []
        for v in self.variants:
            if v.error:
                rows.append((v.backend, "-", "-", "-", "-", "-", "-", v.error))
                continue
            lo, hi = v.spread_ms
            served = ", ".join(f"{b}: {n}" for b, n in v.served.items()) or ("-" if v.backend == UNPATCHED else "")
            note = "; ".join(v.fallback_reasons)
            if v.tuning_s:
                note = "; ".join(filter(None, [f"tuning took {v.tuning_s:.2f} s (not timed)", note]))
            rows.append((
                v.backend, "-" if v.backend == UNPATCHED else str(v.sites), f"{v.median_ms:.2f}", f"{lo:.2f}-{hi:.2f}", f"{self.speedup(v):.2f}x",
                "-" if v.rel_err is None else f"{v.rel_err:.1e}", served, note,
            ))
        return rows

    def caption(self) -> str:
        mode = "forward+backward (train)" if self.train else "forward (eval, no grad)"
        env = ", ".join(f"{k} {v}" for k, v in self.environment.items())
        return (
            f"{self.model}, input {tuple(self.input_shape)} {self.dtype} on {self.device}, {mode}"
            f"{', torch.compile' if self.compiled else ''}; median of {self.repeats} (min-max); {env}"
        )

    def table(self):
        from .reporting import build_table

        return build_table(
            "attnswap bench: each backend against the unpatched model, side by side",
            ("backend", "sites", "ms", "min-max", "speed-up", "max rel. error", "calls per step served by", "notes"),
            self.rows(), self.caption(),
        )

    def plot(self, path: str) -> None:
        """A bar chart of median times with quartile whiskers, speed-ups on the bars."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            from .errors import AttnSwapError

            raise AttnSwapError("--plot needs matplotlib: pip install matplotlib (or attnswap[plot])") from None
        ok = [v for v in self.variants if not v.error]
        names = [v.backend for v in ok]
        medians = [v.median_ms for v in ok]
        quartiles = [statistics.quantiles(v.times_ms, n=4) if len(v.times_ms) > 1 else [v.median_ms] * 3 for v in ok]
        lows = [max(0.0, v.median_ms - q[0]) for v, q in zip(ok, quartiles)]
        highs = [max(0.0, q[2] - v.median_ms) for v, q in zip(ok, quartiles)]
        fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(ok) + 2), 3.4), dpi=110)
        colors = ["#8c8c8c"] + ["#3b75af"] * (len(ok) - 1)
        bars = ax.bar(names, medians, yerr=[lows, highs], capsize=3, color=colors)
        for bar, v in zip(bars, ok):
            ax.annotate(f"{self.speedup(v):.2f}x", (bar.get_x() + bar.get_width() / 2, 0),
                        ha="center", va="bottom", fontsize=8, color="white", xytext=(0, 3), textcoords="offset points")
        mode = "fwd+bwd" if self.train else "forward"
        ax.set_ylabel(f"{mode} ms (median, quartiles)")
        ax.set_title(f"{self.model}, batch {self.batch}, {self.dtype}, {self.device}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def environment(device: torch.device) -> dict[str, Any]:
    import platform

    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["threads"] = torch.get_num_threads()
    env["date"] = time.strftime("%Y-%m-%d")
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: torch.nn.Module, x: Inputs, train: bool) -> Callable[[], None]:
    if not train:
        def forward() -> None:
            with torch.no_grad():
                run_model(model, x)
        return forward

    def train_step() -> None:
        out = run_model(model, x)
        (out.float().sum() if isinstance(out, torch.Tensor) else first_tensor(out).float().sum()).backward()
        model.zero_grad(set_to_none=True)
    return train_step


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def run(
    model: torch.nn.Module,
    backends: Sequence[str],
    x: Inputs,
    *,
    name: str = "model",
    repeats: int = 5,
    train: bool = False,
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``model(x)`` unpatched and patched with each of ``backends``; see the module doc.
    ``x``: the input, positional arguments (a tuple) or keyword arguments (a dict)."""
    names = [b if b == AUTO else registry.resolve_name(b) for b in backends]
    lead = x if isinstance(x, torch.Tensor) else first_tensor(list(x.values()) if isinstance(x, dict) else list(x))
    device = lead.device
    model.eval()
    reference = check_runs(model, x, name)
    variants = [Variant(UNPATCHED)] + [Variant(b) for b in names]
    step = (lambda m: _step(m, x, train))

    def patch(v: Variant) -> Callable[[], None] | None:
        """Switch the model to ``v`` and return its step, or None if it could not run."""
        try:
            if v.backend == UNPATCHED:
                api.unpatch(model)
            else:
                report = api.patch(model, backend=v.backend)
                v.sites = len(report.patched)
            model.train(train)
            runner = torch.compile(model) if compile else model
            return step(runner)
        except Exception as exc:  # noqa: BLE001 - one failing variant is a row, not a crash
            v.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return None

    def first_use(v: Variant, fn: Callable[[], None]) -> bool:
        """Warm-up (decisions, tuning, compilation) and the error check, in eval mode."""
        try:
            if v.backend != UNPATCHED:
                model.eval()
                with torch.no_grad():
                    v.rel_err = relative_error(features(model, x), reference)
                model.train(train)
            fn()
            if v.backend != UNPATCHED:
                stats = api.stats(model, reset=True)
                v.tuning_s = stats.tuning_seconds
            return True
        except Exception as exc:  # noqa: BLE001
            v.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return False

    def collect(v: Variant) -> None:
        if v.backend == UNPATCHED:
            return
        # one timed step's calls (every step routes the same way)
        stats = api.stats(model, reset=True)
        v.served = stats.by_backend()
        v.calls = stats.total_calls
        v.fallbacks = stats.fallback_calls
        reasons = {f"{b}: {'; '.join(r)}" for s in stats for fb in s.fallbacks for b, r in fb.refused.items()}
        v.fallback_reasons = sorted(set(v.fallback_reasons) | reasons)

    try:
        if compile:
            for v in variants:
                if progress:
                    progress(v.backend)
                fn = patch(v)
                if fn is None or not first_use(v, fn):
                    continue
                for _ in range(repeats):
                    v.times_ms.append(_timed(fn, device))
                collect(v)
        else:
            live = []
            for v in variants:
                if progress:
                    progress(f"{v.backend} (warm-up)")
                fn = patch(v)
                if fn is not None and first_use(v, fn):
                    live.append(v)
            for r in range(repeats):
                for v in live:
                    if progress:
                        progress(f"{v.backend} (round {r + 1}/{repeats})")
                    fn = patch(v)
                    if fn is None:
                        continue
                    fn()  # a re-patched site decides again: not timed
                    if v.backend != UNPATCHED:
                        api.stats(model, reset=True)
                    v.times_ms.append(_timed(fn, device))
                    collect(v)
    finally:
        api.unpatch(model)
        model.eval()
    shape = input_shape(x)
    return BenchResult(name, lead.shape[0], shape, str(input_dtype(x)).replace("torch.", ""), str(device), compile,
                       train, repeats, variants, environment(device))


def run_named(
    spec: str, backends: Sequence[str], *, batch: int = 1, img_size: int | None = None,
    input_shape: Sequence[int] | None = None, dtype: str = "float32", device: str = "cpu", **options,
) -> BenchResult:
    """:func:`run` on a model named like the command line does (timm name or module:attr)."""
    from .models import load_model

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = load_model(spec).to(device=device, dtype=torch_dtype)
    x = example_input(model, batch, img_size, input_shape, torch_dtype, device)
    return run(model, backends, x, name=spec, **options)
