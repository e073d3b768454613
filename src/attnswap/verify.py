"""``attnswap verify``: per attention site, how far the attention computed with a backend is
from a float64 reference, and whether that is more than the dtype's own rounding explains.

The same input runs three times through the model, each site's router output recorded (the
attention result itself, before any projection; timm zero-initializes some projections,
which would hide everything): a float64 copy patched with ``eager`` (the reference), the model
patched with ``sdpa_math`` in its own dtype (exact math at that precision: the baseline), and
the model patched with the backend. Errors compound through the layers in both runs alike. A
site is flagged when its error is above the tolerance *and* above the baseline's at that
site (times a margin): deep models amplify float32 rounding on their own.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import api
from .errors import AttnSwapError
from .models import Inputs, cast_inputs, check_runs, first_tensor, input_dtype, relative_error, run_model
from .surgery.swap import router_of

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: a site may be this many times worse than exact math in the same dtype
MARGIN = 4.0


@dataclass
class SiteError:
    path: str
    cls: str
    backend: str
    #: max |Δ| / max |ref| of the site's attention outputs against the float64 reference
    patched_err: float
    #: the same for sdpa_math in the model's dtype: the rounding the dtype alone explains
    baseline_err: float
    flagged: bool


@dataclass
class Verification:
    model: str
    backend: str
    dtype: str
    tolerance: float
    sites: list[SiteError]
    output_err: float

    @property
    def flagged(self) -> list[SiteError]:
        return [s for s in self.sites if s.flagged]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self):
        from .reporting import build_table

        rows = [
            (s.path or "<root>", s.cls.rsplit(".", 1)[-1], s.backend, f"{s.patched_err:.1e}", f"{s.baseline_err:.1e}",
             "ABOVE TOLERANCE" if s.flagged else "ok")
            for s in self.sites
        ]
        caption = (
            f"{self.model} in {self.dtype}, tolerance {self.tolerance:.0e} (and > {MARGIN:g}x exact math's error); "
            f"output error {self.output_err:.1e}; {len(self.flagged)} sites flagged"
        )
        return build_table(
            f"attnswap verify: {self.backend!r} against a float64 eager reference, per site",
            ("site", "class", "served by", "error", f"exact math in {self.dtype}", "verdict"), rows, caption,
        )


def _router_outputs(model: torch.nn.Module, x: Inputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every site's attention outputs for one forward (all calls of a site, flattened and
    concatenated), and the model's output."""
    seen: dict[str, list[torch.Tensor]] = {}
    routers = [(path, router_of(m)) for path, m in model.named_modules() if router_of(m) is not None]
    for path, router in routers:
        route = type(router).route.__get__(router)

        def recording(*args, _route=route, _path=path, **kwargs):
            out = _route(*args, **kwargs)
            seen.setdefault(_path, []).append(out.detach().double().flatten())
            return out

        router.route = recording  # rerouted code calls router.route(...)
    try:
        with torch.no_grad():
            out = first_tensor(run_model(model, x))
    finally:
        for _, router in routers:
            del router.route
    return {p: torch.cat(outs) for p, outs in seen.items()}, out.detach().double()


def verify(
    model: torch.nn.Module, x: Inputs, backend: str, *, name: str = "model", tolerance: float | None = None,
) -> Verification:
    """Compare ``model`` patched with ``backend`` to a float64 eager reference, site by site.
    ``x``: the input, positional arguments (a tuple) or keyword arguments (a dict)."""
    if api.is_patched(model):
        raise AttnSwapError("verify patches the model itself: pass an unpatched model")
    model.eval()
    check_runs(model, x, name)
    reference = copy.deepcopy(model).double()
    api.patch(reference, backend="eager")
    ref_sites, ref_out = _router_outputs(reference, cast_inputs(x, torch.float64))
    del reference
    try:
        api.patch(model, backend="sdpa_math")
        plain_sites, _ = _router_outputs(model, x)
        report = api.patch(model, backend=backend)
        api.stats(model, reset=True)
        patched_sites, out = _router_outputs(model, x)
        served = {s.path: ", ".join(s.calls) or "-" for s in api.stats(model)}
        classes = {s.path: s.cls for s in report.patched}
    finally:
        api.unpatch(model)
    dtype = input_dtype(x)
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-4)
    sites = []
    for path in classes:
        if path not in ref_sites or path not in patched_sites:
            continue  # not called by this input
        patched = relative_error(patched_sites[path], ref_sites[path])
        plain = relative_error(plain_sites[path], ref_sites[path])
        flagged = patched > tol and patched > MARGIN * plain
        sites.append(SiteError(path, classes[path], served.get(path, "-"), patched, plain, flagged))
    return Verification(name, backend, str(dtype).replace("torch.", ""), tol, sites, relative_error(out, ref_out))
