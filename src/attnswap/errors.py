"""attnswap's exceptions: one base class, four specific kinds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .call import CallFacts


class AttnSwapError(RuntimeError):
    """Base class of every error attnswap raises on purpose."""


class BackendUnavailable(AttnSwapError):
    """A backend cannot run in this process at all (package missing, wrong version, no device)."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"attention backend {backend!r} is unavailable: {reason}")


class UnsupportedCall(AttnSwapError):
    """No backend allowed for a site could serve one attention call.

    ``reasons`` maps each backend that was tried to every reason it refused, in the
    order they were tried.
    """

    def __init__(self, site: str, facts: CallFacts | None, reasons: dict[str, list[str]], hint: str = "") -> None:
        self.site = site
        self.facts = facts
        self.reasons = {name: list(rs) for name, rs in reasons.items()}
        lines = [f"no attention backend could serve the call at {site or '<unnamed site>'}"]
        if facts is not None:
            lines.append(f"  call: {facts.describe()}")
        for name, rs in self.reasons.items():
            lines.append(f"  `{name}` refused because:")
            lines.extend(f"    - {r}" for r in rs)
        if hint:
            lines.append(f"  HINT: {hint}")
        super().__init__("\n".join(lines))


class PatchError(AttnSwapError):
    """The model could not be patched (or unpatched) as asked; the model is left unchanged."""


class NotScriptable(AttnSwapError):
    """``torch.jit.script`` was given a patched model.

    TorchScript compiles a module's class source, which for a patched module is the
    rerouted code calling a Python router it cannot compile; scripting the original class
    instead would silently drop the routing. Neither happens: scripting raises this.
    """


class BackendRefused(Exception):
    """Raised by a backend *while running* when it finds it cannot serve a call after all.

    The router turns it into a counted fallback with the reason (or an
    :class:`UnsupportedCall` under ``strict``). Users never see it.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def format_names(names: Sequence[str]) -> str:
    return ", ".join(sorted(names))
