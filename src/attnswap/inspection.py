"""``attnswap inspect``: every attention site of a model, how it is reached, what its calls pass,
and which backend each call would get.

The model is patched with the backend asked for and run once (no grad) on an example input;
every site records the facts of each call signature it meets and the router's decision for
it (with the reasons of any fallback). Nothing is timed; the model is unpatched afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import api
from .call import MASK_NONE, CallFacts
from .errors import AttnSwapError
from .models import Inputs, check_runs, input_shape, run_model
from .report import PATCHED, PatchReport
from .surgery.swap import router_of


@dataclass
class CallRow:
    """One call signature at one site."""

    shapes: str
    dtype: str
    passes: list[str]
    backend: str
    fallback_reasons: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SiteRow:
    path: str
    cls: str
    status: str
    how: str
    note: str = ""
    calls: list[CallRow] = field(default_factory=list)


@dataclass
class Inspection:
    model: str
    backend: str
    input_shape: tuple[int, ...]
    sites: list[SiteRow]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self):
        from .reporting import build_table

        rows = []
        for s in self.sites:
            first = True
            for c in s.calls or [None]:
                head = (s.path or "<root>", s.cls.rsplit(".", 1)[-1], s.how or s.status) if first else ("", "", "")
                first = False
                if c is None:
                    rows.append((*head, "-", "-", "-", s.note or "not called by this input"))
                    continue
                why = "; ".join(f"{b}: {', '.join(r)}" for b, r in c.fallback_reasons.items())
                rows.append((*head, f"{c.shapes} {c.dtype}", ", ".join(c.passes) or "-", c.backend, why))
        routed = sum(1 for s in self.sites if s.status == PATCHED)
        caption = (
            f"{self.model}, input {tuple(self.input_shape)}: {routed} sites routed, "
            f"{len(self.sites) - routed} attention-like modules not routed"
        )
        return build_table(
            f"attnswap inspect: attention sites and what backend {self.backend!r} does with their calls",
            ("site", "class", "reached by / status", "q / k / v", "passes", "served by", "fallback or reason"),
            rows, caption,
        )


def passes(facts: CallFacts) -> list[str]:
    """What a call carries beyond plain attention, in words."""
    out = []
    if facts.mask_kind != MASK_NONE:
        grad = ", requires grad" if facts.mask_requires_grad else ""
        kind = facts.mask_kind if facts.structure is None else f"{facts.structure[0]} bias (as structure)"
        out.append(f"{kind} {tuple(facts.mask_shape or ())}{grad}" if facts.structure else f"{kind} mask {tuple(facts.mask_shape or ())}{grad}")
    if facts.is_causal:
        out.append("causal")
    if facts.q_len != facts.kv_len:
        out.append(f"q_len {facts.q_len} != kv_len {facts.kv_len}")
    if facts.grouped_heads:
        out.append(f"{facts.q_heads} q heads / {facts.kv_heads} kv heads" + (" (GQA)" if facts.enable_gqa else ""))
    if facts.v_head_dim != facts.head_dim:
        out.append(f"v head dim {facts.v_head_dim} != {facts.head_dim}")
    if facts.dropout_p:
        out.append(f"dropout {facts.dropout_p:g}")
    if facts.scale is not None:
        out.append(f"scale {facts.scale:.4g}")
    if facts.ndim != 4:
        out.append(f"{facts.ndim}-D")
    return out


def _shapes(f: CallFacts) -> str:
    def t(shape):
        return "(" + ", ".join(map(str, shape)) + ")"

    if f.q_shape == f.k_shape == f.v_shape:
        return f"{t(f.q_shape)} x3"
    return " / ".join(t(s) for s in (f.q_shape, f.k_shape, f.v_shape))


def inspect(model: torch.nn.Module, x: Inputs, backend: str = "sdpa", name: str = "model") -> Inspection:
    """Patch ``model`` with ``backend``, run ``x`` once (an input, a tuple of positional or a dict
    of keyword arguments), describe every site; unpatch."""
    if api.is_patched(model):
        raise AttnSwapError("inspect patches the model itself: pass an unpatched model")
    model.eval()
    check_runs(model, x, name)
    report: PatchReport = api.patch(model, backend=backend)
    try:
        for module in model.modules():
            router = router_of(module)
            if router is not None:
                router.keep_plans()
        model.eval()
        with torch.no_grad():
            run_model(model, x)
        by_path = {path: router_of(m) for path, m in model.named_modules() if router_of(m) is not None}
        sites = []
        for s in report.sites:
            how = s.how + "".join(f"; {k} bias as structure" for k in s.structures) if s.status == PATCHED else s.status
            row = SiteRow(s.path, s.cls, s.status, how, s.reason)
            router = by_path.get(s.path)
            if router is not None:
                for plan in router.plans():
                    f = plan.facts
                    if f is None:
                        continue
                    served = plan.tally.label
                    if plan.tally.structure is not None:
                        served += f" (bias {plan.tally.structure[1]})"
                    row.calls.append(CallRow(
                        _shapes(f), str(f.dtype).replace("torch.", ""), passes(f), served,
                        {b: list(r) for b, r in plan.tally.tried},
                    ))
            sites.append(row)
    finally:
        api.unpatch(model)
    return Inspection(name, backend, input_shape(x), sites)
