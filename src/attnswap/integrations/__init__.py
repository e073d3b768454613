"""Model libraries that dispatch attention themselves, reached through their own extension points.

A library such as transformers picks the attention function from a registry by a name kept in
its config; patching through that registry keeps the library's own mask building, GQA handling
and argument conventions, instead of rewriting its model code. Each library's knowledge lives in
its own module here, imported only when a model of that library is patched (``import attnswap``
imports none of them). The generic surgery asks :func:`site_for` about each module and calls
:func:`attach` / :func:`detach` when it installs or removes a router.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import torch

from ..backends.optional import OptionalPackage, PackageUnavailable
from ..surgery.reroute import ClassRewrite
from ..surgery.source import NotRewritable

#: top-level package of a module's class -> the integration module that knows it
_BY_PACKAGE: dict[str, str] = {"transformers": "hf_transformers", "diffusers": "hf_diffusers"}


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def site_for(module: torch.nn.Module, cls: type) -> ClassRewrite | None:
    """How ``module`` is reached through its library's extension point (a rewrite whose
    ``integration`` is set, maybe with a ``problem``), or None when no integration claims it."""
    name = _BY_PACKAGE.get(cls.__module__.partition(".")[0])
    if name is None:
        return None
    return _load(name).site_for(module, cls)


def attach(name: str, module: torch.nn.Module) -> None:
    """``module`` now has a router: make its library call it."""
    _load(name).attach(module)


def detach(name: str, module: torch.nn.Module) -> None:
    """``module``'s router is gone: restore what :func:`attach` changed once no patched module needs it."""
    _load(name).detach(module)


def reattach(name: str) -> None:
    """A router of this integration was copied or unpickled: make sure its library knows attnswap."""
    _load(name).ensure_registered()


def why_unreachable(package: OptionalPackage, prepare: Callable[[], object], library: str) -> str | None:
    """Why an integration cannot reach its library here (not installed, a version outside its
    range, code it cannot rewrite), or None."""
    try:
        package.load()
        prepare()
    except (PackageUnavailable, NotRewritable) as exc:
        return f"{library} cannot be reached: {exc}"
    return None
