"""What the CUDA-kernel backends from other packages share: a lazily imported package, CUDA-only
limits, and the layout change between SDPA's ``[B, H, L, E]`` and the ``[B, L, H, E]`` most of
those kernels take (a transposed view, never a copy)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..call import CallFacts
from .base import Backend, Limits, cuda_capability
from .optional import OptionalPackage

_CUDA_ONLY = Limits(devices=frozenset({"cuda"}))


class PackagedBackend(Backend):
    """A backend whose kernel lives in an optional package and runs on CUDA only.

    Subclasses set ``package``, ``cuda_limits`` and ``function`` (the attribute of the imported
    module that is the kernel), and implement ``__call__`` with SDPA's signature.
    """

    package: OptionalPackage
    cuda_limits: Limits
    function: str = ""
    #: the package's variable-length kernel (packed sequences), if it has one
    varlen_function: str = ""

    @property
    def install_hint(self) -> str:  # type: ignore[override]
        return self.package.install_hint

    def limits(self, device_type: str) -> Limits:
        return self.cuda_limits if device_type == "cuda" else _CUDA_ONLY

    def check_available(self) -> str | None:
        reason = self.package.reason()
        if reason is not None:
            return reason
        found = self.package_problem(self.package.load())
        if found:
            return found
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
        return None

    def package_problem(self, module: Any) -> str | None:
        """A reason the imported package cannot run although it imported (a broken extension)."""
        return None

    @functools.cached_property
    def kernel_function(self) -> Any:
        return getattr(self.package.load(), self.function)

    @functools.cached_property
    def varlen_kernel_function(self) -> Any:
        """The package's varlen kernel, or None (not declared, or not in this version)."""
        return getattr(self.package.load(), self.varlen_function, None) if self.varlen_function else None

    def varlen_reasons(self, facts: CallFacts) -> list[str]:
        if not self.varlen_function:
            return super().varlen_reasons(facts)
        if self.unavailable_reason is None and self.varlen_kernel_function is None:
            return [f"this {self.package.dist} has no {self.varlen_function}"]
        return []

    def forget(self) -> None:
        """Look for the package again on the next call (after installing it, or in tests)."""
        self.package.forget()
        self.__dict__.pop("kernel_function", None)
        self.__dict__.pop("varlen_kernel_function", None)
        self.__dict__.pop("unavailable_reason", None)

    @staticmethod
    def capability(facts: CallFacts) -> tuple[int, int]:
        return cuda_capability(facts.device_index)


def bshd(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, E]`` as ``[B, L, H, E]``: a view; the head dim keeps its stride."""
    return t.transpose(1, 2)


def from_bshd(t: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[B, L, H, Ev]`` output back in SDPA's ``[B, H, L, Ev]`` (a view)."""
    return t.transpose(1, 2)


def first(result: Any) -> torch.Tensor:
    """The output of a kernel that returns ``out`` or ``(out, lse, ...)`` depending on its version."""
    return result[0] if isinstance(result, (tuple, list)) else result


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()
