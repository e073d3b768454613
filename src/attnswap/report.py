"""What :func:`attnswap.patch` did, and what the routers saw since (:func:`attnswap.stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .reporting import build_table, render_table

if TYPE_CHECKING:
    import torch

PATCHED = "patched"
NOT_ROUTABLE = "not routable"
MANUAL = "not routed"
NOT_ATTENTION = "not attention"


@dataclass(frozen=True)
class SiteReport:
    """One attention site of a model and what patching did to it."""

    path: str
    cls: str
    status: str
    sdpa_calls: int = 0
    flags: tuple[str, ...] = ()
    reason: str = ""
    #: how the site is reached: "SDPA call", "hand-written", "nn.MultiheadAttention"
    how: str = ""
    #: hand-written ``q @ kᵀ`` products deferred to the router
    products: int = 0
    #: kinds of bias the site's calls carry as structure (``attnswap.structure``)
    structures: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path or "<root>"


@dataclass(frozen=True)
class PatchReport:
    """The result of :func:`attnswap.patch`; ``print(report)`` shows it as a table."""

    backend: str
    fallback: tuple[str, ...]
    strict: bool
    sites: tuple[SiteReport, ...] = ()
    backend_unavailable: str = ""
    #: float32 calls a half-precision backend would refuse run down-cast to this dtype (``patch(cast=)``)
    cast: torch.dtype | None = None
    #: modules that compute no attention but build a bias that now travels as structure: (path, kinds)
    bias_sources: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def patched(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == PATCHED]

    @property
    def not_routable(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status != PATCHED]

    def __len__(self) -> int:
        return len(self.patched)

    def _rows(self) -> list[tuple]:
        return [
            (
                s.name, s.cls.rsplit(".", 1)[-1], s.status,
                s.how + "".join(f"; {k} bias as structure" for k in s.structures),
                ", ".join(f"{f}=True" for f in s.flags), s.reason,
            )
            for s in self.sites
        ]

    def _title(self) -> str:
        chain = " -> ".join((self.backend, *self.fallback)) if not self.strict else f"{self.backend} (strict)"
        cast = f" (float32 cast to {str(self.cast).replace('torch.', '')} where needed)" if self.cast is not None else ""
        return f"attnswap: {len(self.patched)} attention sites routed to {chain}{cast}"

    def _caption(self) -> str:
        parts = []
        if self.not_routable:
            parts.append(f"{len(self.not_routable)} attention-like modules not routed")
        if self.backend_unavailable:
            parts.append(f"{self.backend!r} is unavailable here ({self.backend_unavailable}); calls use the fallback")
        if not self.sites:
            parts.append("no attention sites found")
        for path, kinds in self.bias_sources:
            parts.append(f"{path or '<root>'} builds its {', '.join(kinds)} bias as structure")
        return "; ".join(parts)

    def __str__(self) -> str:
        return render_table(
            self._title(), ("site", "class", "status", "reached by", "flags set", "note"), self._rows(), self._caption()
        )

    def __rich__(self):
        return build_table(self._title(), ("site", "class", "status", "reached by", "flags set", "note"), self._rows(), self._caption())

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "fallback": list(self.fallback),
            "strict": self.strict,
            "backend_unavailable": self.backend_unavailable,
            "sites": [dict(s.__dict__, flags=list(s.flags), structures=list(s.structures)) for s in self.sites],
            "bias_sources": [{"path": p, "structures": list(k)} for p, k in self.bias_sources],
        }


@dataclass(frozen=True)
class Fallback:
    """Calls a site served with ``used`` because the backends in ``refused`` could not."""

    used: str
    refused: dict[str, tuple[str, ...]]
    calls: int
    #: times this fallback was chosen while tracing a torch.compile graph
    traced: int = 0


@dataclass(frozen=True)
class SiteStats:
    path: str
    cls: str
    backend: str
    calls: dict[str, int] = field(default_factory=dict)
    fallbacks: tuple[Fallback, ...] = ()
    traced: dict[str, int] = field(default_factory=dict)
    #: hand-written attention the module computed with its own code instead, by why
    unrouted: dict[str, int] = field(default_factory=dict)
    #: seconds ``auto`` spent tuning the signatures this site met first
    tuning_seconds: float = 0.0
    #: calls whose bias was carried as structure: (kind, backend, form it reached the kernel in) -> calls
    structures: dict[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def fallback_calls(self) -> int:
        return sum(f.calls for f in self.fallbacks)


class ModelStats(list):
    """Per-site call counts (:class:`SiteStats`); prints as a table."""

    def by_backend(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for site in self:
            for name, n in site.calls.items():
                out[name] = out.get(name, 0) + n
        return out

    @property
    def total_calls(self) -> int:
        return sum(s.total_calls for s in self)

    @property
    def fallback_calls(self) -> int:
        return sum(s.fallback_calls for s in self)

    @property
    def tuning_seconds(self) -> float:
        """Seconds ``auto`` spent choosing backends (counted once, at the site that met a signature first)."""
        return sum(s.tuning_seconds for s in self)

    def structures(self) -> dict[tuple[str, str, str], int]:
        """Calls whose bias was carried as structure, over all sites: (kind, backend, form) -> calls."""
        out: dict[tuple[str, str, str], int] = {}
        for site in self:
            for key, n in site.structures.items():
                out[key] = out.get(key, 0) + n
        return out

    @property
    def unrouted_calls(self) -> int:
        """Hand-written attentions that the module's own code computed (not routed)."""
        return sum(sum(s.unrouted.values()) for s in self)

    def _rows(self) -> list[tuple]:
        rows = []
        for s in self:
            calls = ", ".join(f"{name}: {n}" for name, n in s.calls.items()) or "-"
            if s.traced:
                calls += " | compiled: " + ", ".join(f"{name} (traced {n}x)" for name, n in s.traced.items())
            why = "; ".join(
                (f"{f.calls} to {f.used}" if f.calls else f"compiled to {f.used}")
                + ": " + "; ".join(f"{b}: {', '.join(r)}" for b, r in f.refused.items())
                for f in s.fallbacks
            )
            if s.unrouted:
                why = "; ".join(filter(None, [why, *(f"{n} computed by the module itself: {r}" for r, n in s.unrouted.items())]))
            if s.structures:
                calls += " | bias: " + ", ".join(f"{kind} {form} ({n})" for (kind, _, form), n in s.structures.items())
            rows.append((s.path or "<root>", s.cls.rsplit(".", 1)[-1], s.backend, calls, why))
        return rows

    def _caption(self) -> str:
        caption = f"{self.total_calls} calls, {self.fallback_calls} fell back" if self else "no patched sites"
        if self.tuning_seconds:
            caption += f"; auto tuning took {self.tuning_seconds:.2f} s"
        return caption

    def __str__(self) -> str:
        return render_table(
            "attnswap: attention calls per site", ("site", "class", "asked", "calls served by", "fallbacks and why"),
            self._rows(), self._caption(),
        )

    def __rich__(self):
        return build_table(
            "attnswap: attention calls per site", ("site", "class", "asked", "calls served by", "fallbacks and why"),
            self._rows(), self._caption(),
        )
