"""The coverage sweep: patch every model of a library (timm, torchvision: :mod:`.zoos`) and
check that every attention is routed.

For each model name: build it on the ``meta`` device and patch it (which sites were found,
routed, left alone and why, not routable and why); then, where affordable on a CPU, build it
for real, run one small forward unpatched and one patched with ``sdpa``, and check

- the relative error of every output (``max |patched - unpatched| / max |unpatched|``);
- that no attention escaped: a ``TorchFunctionMode`` attributes every softmax and SDPA call
  to the module running it, and a softmax inside a patched site, or an SDPA call outside
  one (and outside the sites the patch report names as not routable or left alone, whose
  calls it already accounts for), is counted as escaped;
- that no hand-written attention fell back to the module's own code (router counters).

``attnswap coverage`` runs it and writes ``COVERAGE.md``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import integrations
from .api import patch, stats
from .models import ungate
from .report import MANUAL, NOT_ATTENTION, NOT_ROUTABLE, PATCHED
from .routing import ROUTER_ATTR, Router
from .surgery.reroute import analyze, is_library_class, original_class
from .zoos import NoExample, Zoo, get_zoo

TOLERANCE = 1e-4
#: a float32 difference above TOLERANCE is rechecked in float64: random weights can amplify
#: rounding through deep stacks (visformer_tiny: 3.5e-4 in float32, 4.9e-13 in float64)
TOLERANCE_F64 = 1e-9
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


@dataclass
class ModelCoverage:
    """What the sweep found for one model."""

    name: str
    sites: int = 0
    routed: int = 0
    left_alone: dict[str, str] = field(default_factory=dict)  # class -> reason (attention no kernel takes)
    not_attention: dict[str, str] = field(default_factory=dict)  # class -> reason (a softmax, not attention)
    not_routable: dict[str, str] = field(default_factory=dict)  # class -> reason
    routed_classes: dict[str, str] = field(default_factory=dict)  # class -> how
    params_m: float = 0.0
    checked: bool = False  # a real forward ran
    skipped: str = ""  # why no real forward
    rel_err: float | None = None
    rel_err_f64: float | None = None  # only when the float32 error is above TOLERANCE
    calls: int = 0
    escaped: int = 0
    unrouted: int = 0
    error: str = ""
    seconds: float = 0.0
    #: kinds of bias the patched model carries as structure (attnswap.structure) -> calls that
    #: carried one in the checked forward (0 when only discovered)
    structures: dict[str, int] = field(default_factory=dict)

    @property
    def fully_routed(self) -> bool:
        return self.routed > 0 and not self.left_alone and not self.not_routable

    @property
    def ok(self) -> bool:
        return not self.error and not self.not_routable and (
            not self.checked or (self.matches and not self.escaped and not self.unrouted)
        )

    @property
    def matches(self) -> bool:
        if (self.rel_err or 0.0) < TOLERANCE:
            return True
        return self.rel_err_f64 is not None and self.rel_err_f64 < TOLERANCE_F64


_ROUTE_CODE = Router.route.__code__


class _Attribution(TorchFunctionMode):
    """Counts softmax/SDPA calls by whether the innermost running module is a patched site."""

    def __init__(self, reported: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.stack: list[torch.nn.Module] = []
        #: ids of the modules patch() reported as not routable or left alone: their calls are accounted for
        self.reported = reported
        self.escaped = 0
        #: SDPA calls made inside patched sites: one per routed call unless a call got past its router
        self.sdpa_in_sites = 0

    def _in_site(self) -> bool:
        return any(ROUTER_ATTR in m.__dict__ for m in self.stack)

    def _in_sdpa_site(self) -> bool:
        # A softmax in a site rerouted at its SDPA call means its hand-written path ran instead.
        # (In hand-written sites a softmax may be legitimate, like ConViT's positional one; a
        # deferred product that had to be computed is counted by the router as unrouted.)
        # Only the site's own code counts: the innermost module running, past PyTorch's own
        # (an nn.Softmax child), is the site; a child of its own (a mixture-of-experts gate) is not.
        for m in reversed(self.stack):
            if is_library_class(type(m)):
                continue
            if ROUTER_ATTR not in m.__dict__:
                return False
            # (hand-written scores in the class's own code, or deferred by its library's integration)
            cls = original_class(m)
            return not any(r is not None and r.products for r in (integrations.site_for(m, cls), analyze(cls)))
        return False

    @staticmethod
    def _inside_router() -> bool:
        """Whether the call is made by a router (its backend's kernel call: one per routed call, or
        one per row block when a structured bias is materialized in blocks)."""
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code is _ROUTE_CODE:
                return True
            frame = frame.f_back
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # (a softmax of deferred scores computes nothing; if they settle, the real one is counted)
        if func in _SOFTMAX and args and isinstance(args[0], torch.Tensor) and self._in_sdpa_site():
            self.escaped += 1
        elif func is F.scaled_dot_product_attention and not self._inside_router():
            if self._in_site():
                self.sdpa_in_sites += 1  # a site's SDPA call that got past its router
            elif not any(id(m) in self.reported for m in self.stack):
                self.escaped += 1
        return func(*args, **(kwargs or {}))


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def relative_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for o, r in zip(out, ref):
        if o.shape != r.shape:
            return float("inf")
        if not r.is_floating_point():
            worst = max(worst, float((o != r).any()))
            continue
        scale = r.double().abs().max().clamp_min(1e-30)
        worst = max(worst, ((o.double() - r.double()).abs().max() / scale).item())
    return worst


def _as_double(x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The example in float64 (a dict of keyword inputs: its floating tensors; token ids stay)."""
    if isinstance(x, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    return x.double()


def _outputs(zoo: Zoo, model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    # seeded before every forward: models that draw noise inside it (ViT-MAE's random masking,
    # VITS's durations) then draw the same noise unpatched and patched
    torch.manual_seed(seed)
    with torch.no_grad():
        return _flat(zoo.outputs(model, x))


class _Timeout(Exception):
    pass


def _alarm(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"took over {seconds} s")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, handler)
        signal.alarm(seconds)


def _discover(zoo: Zoo, name: str, result: ModelCoverage) -> None:
    model = zoo.build(name, meta=True)
    result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    report = patch(model, backend="sdpa")
    result.sites = sum(s.status != NOT_ATTENTION for s in report.sites)
    for site in report.sites:
        cls = site.cls
        if site.status == PATCHED:
            result.routed += 1
            result.routed_classes[cls] = site.how
        elif site.status == MANUAL:
            result.left_alone[cls] = site.reason
        elif site.status == NOT_ATTENTION:
            result.not_attention[cls] = site.reason
        elif site.status == NOT_ROUTABLE:
            result.not_routable[cls] = site.reason
        for kind in site.structures:
            result.structures.setdefault(kind, 0)
    for _, kinds in report.bias_sources:
        for kind in kinds:
            result.structures.setdefault(kind, 0)


def _check_f64(zoo: Zoo, name: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = ungate(zoo.build(name)).eval().double()
    x = _as_double(zoo.example(model, name))
    ref = _outputs(zoo, model, x)
    patch(model, backend="sdpa")
    return relative_error(_outputs(zoo, model, x), ref)


def _check(zoo: Zoo, name: str, result: ModelCoverage, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = ungate(zoo.build(name)).eval()
    x = zoo.example(model, name)
    ref = _outputs(zoo, model, x)
    report = patch(model, backend="sdpa")
    probe = _Attribution(frozenset(
        id(model.get_submodule(site.path)) for site in report.sites if site.status in (NOT_ROUTABLE, MANUAL)
    ))
    def enter(module, args):
        probe.stack.append(module)

    def leave(module, args, output):  # returns None: a forward hook's return value replaces the output
        probe.stack.pop()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        with probe:
            out = _outputs(zoo, model, x)
    finally:
        for h in hooks:
            h.remove()
    s = stats(model)
    result.rel_err = relative_error(out, ref)
    result.calls = s.total_calls
    # SDPA calls inside sites made outside a router got past it (a library that dispatched to its
    # own implementation after all)
    result.escaped = probe.escaped + probe.sdpa_in_sites
    result.unrouted = s.unrouted_calls
    for (kind, _, _), n in s.structures().items():
        result.structures[kind] = result.structures.get(kind, 0) + n
    result.checked = True
    if result.rel_err >= TOLERANCE:
        result.rel_err_f64 = _check_f64(zoo, name, seed)


def sweep_one(
    name: str, *, numerics: bool = True, max_params_m: float = 30.0, timeout_s: int = 120, zoo: str = "timm"
) -> ModelCoverage:
    """Discover, patch and (where affordable) check one model of ``zoo``."""
    library = get_zoo(zoo)
    result = ModelCoverage(name)
    start = time.perf_counter()
    try:
        _discover(library, name, result)
        if not numerics:
            result.skipped = "numerics not requested"
        elif not result.routed:
            result.skipped = "no routed site"
        elif result.params_m > max_params_m:
            result.skipped = f"{result.params_m:.0f}M parameters (> {max_params_m:.0f}M) on a CPU"
        else:
            _alarm(timeout_s)
            try:
                _check(library, name, result)
            except NoExample as exc:
                result.skipped = str(exc)
            finally:
                if hasattr(signal, "SIGALRM"):
                    signal.alarm(0)
    except _Timeout as exc:
        result.skipped = f"forward {exc}"
    except Exception as exc:  # one broken model must not stop the sweep
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        result.error += " @ " + traceback.extract_tb(exc.__traceback__)[-1].name
    result.seconds = time.perf_counter() - start
    return result


def model_names(patterns: Sequence[str] = (), zoo: str = "timm") -> list[str]:
    return get_zoo(zoo).names(patterns)


def sweep(
    names: Iterable[str],
    *,
    numerics: bool = True,
    max_params_m: float = 30.0,
    progress: Callable[[ModelCoverage], None] | None = None,
    zoo: str = "timm",
) -> list[ModelCoverage]:
    results = []
    for name in names:
        r = sweep_one(name, numerics=numerics, max_params_m=max_params_m, zoo=zoo)
        results.append(r)
        if progress is not None:
            progress(r)
    return results


# -- the report ------------------------------------------------------------------------------


def totals(results: Sequence[ModelCoverage]) -> dict[str, int]:
    with_attention = [r for r in results if r.routed or r.left_alone or r.not_routable]
    return {
        "models": len(results),
        "with attention": len(with_attention),
        "fully routed": sum(r.fully_routed for r in results),
        "partly routed (rest left alone)": sum(bool(r.routed and r.left_alone) for r in results),
        "not routed at all (left alone)": sum(bool(not r.routed and r.left_alone and not r.not_routable) for r in results),
        "with a not-routable site": sum(bool(r.not_routable) for r in results),
        "numerics checked": sum(r.checked for r in results),
        "mismatches": sum(r.checked and not r.matches for r in results),
        "float32 above tolerance, float64 agrees": sum(r.checked and r.matches and r.rel_err_f64 is not None for r in results),
        "escaped calls": sum(r.escaped for r in results),
        "unrouted calls": sum(r.unrouted for r in results),
        "errors": sum(bool(r.error) for r in results),
    }


def _short(cls: str) -> str:
    return cls.replace("timm.models.", "M.").replace("timm.layers.", "L.").replace("torchvision.models.", "tv.")


def markdown(
    results: Sequence[ModelCoverage], *, command: str, environment: str, seconds: float, zoo: str = "timm"
) -> str:
    t = totals(results)
    lines = [
        f"{SECTION_TITLE}{zoo}",
        "",
        "Generated by the sweep; do not edit by hand. Regenerate with:",
        "",
        f"    {command}",
        "",
        f"{environment}; the sweep took {seconds / 60:.1f} minutes.",
        "",
        "Every model is built on the meta device and patched (sites found, routed, left alone, not routable).",
        f"Where affordable (≤ the parameter cap, one 1-image forward at the default input size), the patched "
        f"model (backend `sdpa`) is run against the unpatched one, random weights with every constant-initialized "
        f"gate (zero-init norms, 1e-5 layer scales) set around 1 so each attention site shows in the output "
        f"(`attnswap.models.ungate`): relative error `max|Δ| / max|ref|` must be "
        f"< {TOLERANCE:g} (float32; above it, the model is rechecked in float64, which must agree to "
        f"{TOLERANCE_F64:g}); a softmax inside a routed site or an SDPA call outside one (and outside the sites "
        f"reported as not routable or left alone) is *escaped*; "
        f"a hand-written attention the module had to compute itself is *unrouted*.",
        "",
        "## Totals",
        "",
        "| | models |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in t.items()]
    by_class: dict[str, Counter] = {}
    reasons: dict[str, str] = {}
    for r in results:
        for cls, how in r.routed_classes.items():
            by_class.setdefault(cls, Counter())[f"routed ({how})"] += 1
        for cls, why in r.left_alone.items():
            by_class.setdefault(cls, Counter())["left alone"] += 1
            reasons[cls] = why
        for cls, why in r.not_routable.items():
            by_class.setdefault(cls, Counter())["not routable"] += 1
            reasons[cls] = why
        for cls, why in r.not_attention.items():
            by_class.setdefault(cls, Counter())["not attention (left alone)"] += 1
            reasons[cls] = why
    kinds: Counter = Counter(k for r in results for k in r.structures)
    if kinds:
        lines += ["", "## Biases carried as structure", "", "| kind | models | of them checked, calls that carried it |", "|---|---|---|"]
        for kind, n in kinds.most_common():
            carried = [r for r in results if kind in r.structures and r.checked]
            lines.append(f"| {kind} | {n} | {len(carried)} models, {sum(r.structures[kind] for r in carried)} calls |")
    lines += ["", "## By attention class", "", "| class | models | status | reason when not routed |", "|---|---|---|---|"]
    for cls in sorted(by_class, key=lambda c: (-sum(by_class[c].values()), c)):
        status = ", ".join(f"{k}" for k in by_class[cls])
        lines.append(f"| `{_short(cls)}` | {sum(by_class[cls].values())} | {status} | {reasons.get(cls, '')} |")
    partial = [r for r in results if r.left_alone or r.not_routable]
    lines += ["", "## Models not fully routed", "", "| model | routed sites | not routed: class (reason above) |", "|---|---|---|"]
    for r in partial:
        lines.append(
            f"| {r.name} | {r.routed} | " + ", ".join(f"`{_short(c)}`" for c in (*r.left_alone, *r.not_routable)) + " |"
        )
    problems = [r for r in results if not r.ok]
    lines += ["", "## Problems", ""]
    if not problems:
        lines.append("None: no errors, no mismatches, no escaped or unrouted calls.")
    else:
        lines += ["| model | error / rel. error / escaped / unrouted |", "|---|---|"]
        for r in problems:
            if r.error:
                text = r.error
            elif r.checked:
                text = f"{r.rel_err:.2e} / {r.escaped} / {r.unrouted}"
            else:  # a site that cannot be routed, and nothing else to check
                text = f"not checked ({r.skipped or 'no numerics'}); not routable: " + ", ".join(
                    f"`{_short(c)}`" for c in r.not_routable
                )
            lines.append(f"| {r.name} | {text} |")
    lines += [
        "", "## Every model with attention", "",
        "| model | params (M) | sites | routed | left alone | rel. error | routed calls | bias as structure | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not (r.routed or r.left_alone or r.not_routable):
            continue
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else (r.skipped or "-")
        if r.rel_err_f64 is not None:
            err += f" (float64: {r.rel_err_f64:.1e})"
        lines.append(
            f"| {r.name} | {r.params_m:.1f} | {r.sites} | {r.routed} | {len(r.left_alone)} | {err} | "
            f"{r.calls if r.checked else '-'} | {', '.join(r.structures) or '-'} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


SECTION_TITLE = "# attnswap coverage of "


def write_section(path: str | Path, text: str) -> None:
    """Write one library's sweep into ``path``, keeping the other libraries' sections there."""
    path = Path(path)
    title = text.splitlines()[0]
    sections: list[str] = []
    if path.exists():
        current: list[str] = []
        for line in path.read_text().splitlines(keepends=True):
            if line.startswith(SECTION_TITLE) and current:
                sections.append("".join(current))
                current = []
            current.append(line)
        if current:
            sections.append("".join(current))
    replaced = False
    for i, section in enumerate(sections):
        if section.splitlines()[0] == title:
            sections[i], replaced = text, True
    if not replaced:
        sections.append(text)
    path.write_text("\n".join(s.rstrip("\n") + "\n" for s in sections))


def save_json(results: Sequence[ModelCoverage], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in results], indent=1))


def load_json(path: str | Path) -> list[ModelCoverage]:
    return [ModelCoverage(**d) for d in json.loads(Path(path).read_text())]
