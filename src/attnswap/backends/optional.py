"""Optional kernel packages (flash-attn, xformers, SageAttention), imported on first use only.

``import attnswap`` never imports them: a backend asks :meth:`OptionalPackage.load` the first
time someone wants to know whether it can run. A missing package, a compiled extension that
does not load (``ImportError``, ``OSError`` from a wheel built for another torch or CUDA), or
an installed version outside the range the adapter was written for, all become a one-line
reason with an install hint instead of an exception.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType

from packaging.version import InvalidVersion, Version


class PackageUnavailable(Exception):
    """Why an optional package cannot be used (the message is the reason users see)."""


@dataclass
class OptionalPackage:
    """One optional package: where to import it from and which versions the adapter supports.

    ``modules`` are tried in order (FlashAttention-3 installs under two names); the first that
    imports wins. ``minimum`` is inclusive, ``below`` exclusive; either may be None.
    """

    modules: tuple[str, ...]
    dist: str
    minimum: str | None = None
    below: str | None = None
    pip: str = ""
    #: False when the module's ``__version__`` is wrong (flash_attn.cute reports 0.0.0) and only
    #: the installed distribution's metadata tells the version
    version_attribute: bool = True
    _module: ModuleType | None = field(default=None, init=False, repr=False)
    _failure: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def install_hint(self) -> str:
        return f"Install it with {self.pip or '`pip install ' + self.dist + '`'}"

    @property
    def supported_range(self) -> str:
        parts = [f">={self.minimum}" if self.minimum else "", f"<{self.below}" if self.below else ""]
        return ",".join(p for p in parts if p) or "any"

    def load(self) -> ModuleType:
        """The imported module; raises :class:`PackageUnavailable` with the reason (cached)."""
        if self._module is not None:
            return self._module
        with self._lock:
            if self._module is None and self._failure is None:
                try:
                    self._module = self._import()
                except PackageUnavailable as exc:
                    self._failure = str(exc)
        if self._failure is not None:
            raise PackageUnavailable(self._failure)
        assert self._module is not None
        return self._module

    def reason(self) -> str | None:
        """Why the package cannot be used, or None."""
        try:
            self.load()
        except PackageUnavailable as exc:
            return str(exc)
        return None

    def forget(self) -> None:
        """Drop the cached import result (tests install fakes; users may pip install mid-session)."""
        with self._lock:
            self._module = None
            self._failure = None

    def version(self, module: ModuleType) -> Version | None:
        text = None
        if self.version_attribute:
            # xformers.ops has no __version__ of its own; its top-level package does
            top = sys.modules.get(module.__name__.split(".")[0])
            text = getattr(module, "__version__", None) or getattr(top, "__version__", None)
        if not isinstance(text, str):
            try:
                text = importlib.metadata.version(self.dist)
            except importlib.metadata.PackageNotFoundError:
                return None
        try:
            return Version(text)
        except InvalidVersion:
            return None

    def _import(self) -> ModuleType:
        errors: list[str] = []
        module = None
        for name in self.modules:
            try:
                module = importlib.import_module(name)
                break
            except ModuleNotFoundError as exc:
                if not _is_absent(name, exc.name):
                    # the package is there but one of *its* imports is missing
                    errors.append(f"importing {name} failed: {exc}")
                continue
            except (ImportError, OSError) as exc:
                # typically a compiled extension built for another torch/CUDA ("undefined symbol")
                errors.append(f"importing {name} failed: {type(exc).__name__}: {_first_line(exc)}")
            except Exception as exc:  # a broken install must become a reason, never a crash
                errors.append(f"importing {name} raised {type(exc).__name__}: {_first_line(exc)}")
        if module is None:
            if errors:
                raise PackageUnavailable("; ".join(errors) + f" (reinstall {self.dist} for this torch and CUDA)")
            raise PackageUnavailable(f"{self.dist} is not installed")
        found = self.version(module)
        if found is None:
            raise PackageUnavailable(f"cannot tell which {self.dist} version is installed (supported: {self.supported_range})")
        if (self.minimum and found < Version(self.minimum)) or (self.below and found >= Version(self.below)):
            raise PackageUnavailable(f"{self.dist} {found} is installed; attnswap supports {self.supported_range}")
        return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_absent(wanted: str, missing: str | None) -> bool:
    """``import wanted`` failed because ``wanted`` itself (or a parent package) does not exist."""
    return missing is None or missing == wanted or wanted.startswith(missing + ".")
