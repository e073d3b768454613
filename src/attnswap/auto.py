"""``backend="auto"``: per call signature, the fastest backend that computes the right thing.

The first time any site meets a call signature (device, dtype, shapes, mask kind, causal,
dropout, scale, GQA, grad), every available exact backend that accepts it runs on that
call's own inputs: first checked against a float64 reference (a backend outside the dtype's
tolerance is never chosen), then timed, candidates interleaved round by round, medians. The
fastest is used from then on, by every site with the same signature, in this process.

Decisions can persist to a JSON file (never pickle) keyed by the environment that made them:
the device's name, torch's version and the versions of the optional kernel packages. A
second process with the same environment starts tuned; a file from another environment is
ignored (and kept).

Inside ``torch.compile`` nothing is timed: a signature tuned before (an eager warm-up call,
or the file) is looked up, otherwise the site uses ``sdpa`` and the stats say it was untuned.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from . import forms
from .backends import registry
from .backends.base import Backend
from .backends.eager import eager_attention
from .call import CallFacts, facts_key
from .errors import AttnSwapError, BackendRefused
from .models import relative_error

AUTO = "auto"
#: used when a signature is first seen inside a compiled graph (nothing can be timed there)
UNTUNED_DEFAULT = "sdpa"
#: max |out - ref| / max |ref| against a float64 reference, per dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CACHE_ENV = "ATTNSWAP_AUTO_CACHE"
_FORMAT = 1
_SAMPLE_S = 5e-4  # each timing sample runs the call enough times to last about this long


@dataclass(frozen=True)
class Trial:
    """One candidate for one signature: its time, its error, or why it was not eligible."""

    backend: str
    ms: float | None = None
    rel_err: float | None = None
    rejected: str = ""


@dataclass(frozen=True)
class Choice:
    """What ``auto`` chose for one signature, and the evidence."""

    backend: str
    trials: tuple[Trial, ...]
    seconds: float = 0.0
    from_file: bool = False
    description: str = ""

    def ranked(self) -> list[str]:
        """Eligible backends, fastest first (the chosen one first)."""
        ok = [t for t in self.trials if not t.rejected and t.ms is not None]
        return [t.backend for t in sorted(ok, key=lambda t: t.ms)]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"
    return device.type


def environment(device: torch.device) -> dict[str, Any]:
    """What a decision depends on besides the call: the same kernels on the same hardware."""
    packages = {}
    for backend in registry._backends.values():
        package = getattr(backend, "package", None)
        if package is not None and backend.unavailable_reason is None:
            found = package.version(package.load())
            packages[package.dist] = str(found)
    return {"device": device_label(device), "torch": torch.__version__, "packages": dict(sorted(packages.items()))}


def _reference(query, key, value, attn_mask, is_causal, scale, enable_gqa) -> torch.Tensor:
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    with torch.no_grad():
        return eager_attention(
            query.double(), key.double(), value.double(), mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Tuner:
    """The process-wide table of decisions (one per environment and signature)."""

    def __init__(self, warmup: int = 2, repeats: int = 5) -> None:
        self.warmup = warmup
        self.repeats = repeats
        self._choices: dict[tuple, Choice] = {}
        self._environments: dict[str, dict[str, Any]] = {}
        self._files: set[str] = set()
        self._lock = threading.RLock()

    # -- lookup ---------------------------------------------------------------------------
    def _env(self, facts: CallFacts) -> dict[str, Any]:
        device = torch.device(facts.device_type, facts.device_index)
        key = str(device)
        env = self._environments.get(key)
        if env is None:
            env = self._environments[key] = environment(device)
        return env

    def _key(self, facts: CallFacts, names: tuple[str, ...] | None) -> tuple:
        env = self._env(facts)
        signature = facts_key(facts)[:-1]  # without in_graph: the same call inside and outside a graph
        return (json.dumps(env, sort_keys=True), names, signature)

    def lookup(self, facts: CallFacts, names: tuple[str, ...] | None = None) -> Choice | None:
        """The decision for ``facts`` among ``names`` (None: every backend), if one was made."""
        return self._choices.get(self._key(facts, names))

    def choices(self) -> list[Choice]:
        with self._lock:
            return list(self._choices.values())

    def forget(self) -> None:
        with self._lock:
            self._choices.clear()
            self._environments.clear()
            self._files.clear()

    # -- tuning ---------------------------------------------------------------------------
    def choose(
        self, facts: CallFacts, args: tuple, run_for: Callable[[Backend, bool], Callable],
        names: tuple[str, ...] | None = None,
    ) -> Choice:
        """The choice for ``facts`` among ``names``, tuning on ``args`` (q, k, v, mask,
        dropout_p, is_causal, scale, enable_gqa) when it is new. ``run_for(backend, reshape_4d)``
        gives the callable the router would run, so what is timed is exactly what will run."""
        with self._lock:
            key = self._key(facts, names)
            found = self._choices.get(key)
            if found is None:
                found = self._choices[key] = self._tune(facts, args, run_for, names)
                for path in sorted(self._files):
                    self.save(path)
            return found

    def _candidates(
        self, facts: CallFacts, names: tuple[str, ...] | None
    ) -> tuple[list[tuple[Backend, bool]], list[Trial]]:
        usable, rejected = [], []
        if names is None:
            names = tuple(registry._builtin_names + sorted(set(registry._backends) - set(registry._builtin_names)))
        for name in names:
            backend = registry._backends.get(name)
            if backend is None:
                rejected.append(Trial(name, rejected="not registered"))
                continue
            if backend.unavailable_reason is not None:
                continue  # not a candidate anywhere here: not worth a row per signature
            if not backend.exact:
                rejected.append(Trial(name, rejected="approximate: never chosen automatically"))
                continue
            reasons, reshape_4d, _ = forms.choose(backend, facts, lambda b, f: b.reasons(f))
            if reasons:
                rejected.append(Trial(name, rejected="; ".join(reasons)))
                continue
            usable.append((backend, reshape_4d))
        return usable, rejected

    def _tune(self, facts: CallFacts, args: tuple, run_for, names: tuple[str, ...] | None) -> Choice:
        started = time.perf_counter()
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
        device = query.device
        usable, trials = self._candidates(facts, names)
        ref = _reference(query, key, value, attn_mask, is_causal, scale, enable_gqa)
        tolerance = TOLERANCE.get(facts.dtype, 1e-4)
        timed: dict[str, Callable[[], object]] = {}
        errors: dict[str, float] = {}
        for backend, reshape_4d in usable:
            run = run_for(backend, reshape_4d)
            try:
                with torch.no_grad():  # dropout off: the check needs a deterministic output
                    out = run(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
                err = relative_error(out, ref)
            except (BackendRefused, AttnSwapError, RuntimeError, NotImplementedError) as exc:
                trials.append(Trial(backend.name, rejected=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                continue
            if not err <= tolerance:
                trials.append(Trial(backend.name, rel_err=err, rejected=f"error {err:.1e} > tolerance {tolerance:.0e}"))
                continue
            errors[backend.name] = err
            timed[backend.name] = self._workload(run, args, facts)
        times = self._time(timed, device)
        for name, ms in times.items():
            trials.append(Trial(name, ms=ms, rel_err=errors[name]))
        if times:
            best = min(times, key=times.get)
        else:
            best = UNTUNED_DEFAULT
        return Choice(best, tuple(trials), time.perf_counter() - started, description=facts.describe())

    @staticmethod
    def _workload(run, args, facts: CallFacts) -> Callable[[], object]:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = args
        if not facts.needs_grad:
            def forward():
                with torch.no_grad():
                    return run(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
            return forward
        # training: forward and backward, on copies (the caller's tensors keep no .grad)
        q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (query, key, value))
        if attn_mask is None:
            m = None
        elif getattr(type(attn_mask), "attnswap_structure", False):
            m = attn_mask.detached()  # its parts, so no gradient reaches the module's parameters
        else:
            m = attn_mask.detach().requires_grad_(attn_mask.requires_grad)

        def train_step():
            with torch.enable_grad():
                out = run(q, k, v, m, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
                out.sum().backward()
        return train_step

    def _time(self, workloads: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
        inner: dict[str, int] = {}
        for name, fn in list(workloads.items()):
            try:
                for _ in range(self.warmup):  # the first call also compiles (flex)
                    fn()
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                once = time.perf_counter() - t0
            except (BackendRefused, AttnSwapError, RuntimeError, NotImplementedError):
                del workloads[name]
                continue
            inner[name] = max(1, min(50, int(_SAMPLE_S / max(once, 1e-9))))
        samples: dict[str, list[float]] = {name: [] for name in workloads}
        for _ in range(self.repeats):  # round-robin: every candidate sees the same noise
            for name, fn in workloads.items():
                n = inner[name]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                _sync(device)
                samples[name].append((time.perf_counter() - t0) / n * 1e3)
        return {name: statistics.median(s) for name, s in samples.items()}

    # -- the file -------------------------------------------------------------------------
    def use_file(self, path: str | os.PathLike) -> int:
        """Load decisions from ``path`` (if it exists) and save every new one to it; returns
        how many decisions were read (those of other environments are kept, never used)."""
        if not isinstance(path, (str, os.PathLike)):
            raise AttnSwapError(f"auto_cache must be a file path (str or os.PathLike), got {type(path).__name__}: {path!r}")
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise AttnSwapError(f"auto_cache {path}: its folder {folder} does not exist; create it or pass another path")
        loaded = 0
        with self._lock:
            if os.path.exists(path):
                loaded = self._load(path)
            self._files.add(path)
        return loaded

    def _load(self, path: str) -> int:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise AttnSwapError(f"cannot read the auto-tuning file {path}: {exc}; delete it or pass another path") from None
        if not isinstance(data, dict):
            raise AttnSwapError(
                f"the auto-tuning file {path} holds a JSON {type(data).__name__}, not attnswap's decisions; "
                "delete it or pass another path"
            )
        if data.get("format") != _FORMAT:
            return 0
        try:
            return self._load_entries(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AttnSwapError(
                f"the auto-tuning file {path} is malformed ({type(exc).__name__}: {exc}); delete it or pass another path"
            ) from None

    def _load_entries(self, data: dict) -> int:
        parsed = []  # all entries are read before any is used: a malformed file adds nothing
        for entry in data.get("entries", []):
            if entry.get("backend") not in registry._backends:
                continue  # a user backend not registered in this process
            env = json.dumps(entry["environment"], sort_keys=True)
            trials = tuple(Trial(**t) for t in entry["trials"])
            choice = Choice(entry["backend"], trials, entry.get("seconds", 0.0), True, entry.get("description", ""))
            # entries of other environments are kept (and saved back) but never match a lookup here
            names = entry.get("candidates")
            parsed.append(((env, None if names is None else tuple(names), _tuples(entry["facts"])), choice))
        loaded = 0
        for key, choice in parsed:
            if self._choices.setdefault(key, choice) is choice:
                loaded += 1
        return loaded

    def save(self, path: str) -> None:
        entries = []
        for (env, names, signature), choice in self._choices.items():
            entries.append({
                "environment": json.loads(env), "candidates": None if names is None else list(names),
                "facts": list(signature), "backend": choice.backend,
                "description": choice.description, "seconds": round(choice.seconds, 4),
                "trials": [asdict(t) for t in choice.trials],
            })
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"format": _FORMAT, "entries": entries}, f, indent=1)
        os.replace(tmp, path)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the signature keys are made of."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


TUNER = Tuner()


@dataclass
class AutoRow:
    """One decision, for tables."""

    call: str
    chosen: str
    times_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    from_file: bool = False


def decisions() -> list[AutoRow]:
    """Every decision ``auto`` made (or loaded) in this process, with the evidence."""
    rows = []
    for choice in TUNER.choices():
        rows.append(AutoRow(
            call=choice.description,
            chosen=choice.backend,
            times_ms={t.backend: t.ms for t in choice.trials if t.ms is not None},
            rejected={t.backend: t.rejected for t in choice.trials if t.rejected},
            seconds=choice.seconds,
            from_file=choice.from_file,
        ))
    return rows
