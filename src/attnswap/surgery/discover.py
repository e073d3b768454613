"""Walk a model and classify every module: SDPA site, not routable (and why), or neither."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

from .. import integrations
from ..errors import AttnSwapError
from .manual import class_label
from .mha import is_plain_mha
from .reroute import ClassRewrite, analyze, is_library_class, original_class

Selector = Union[str, type]


@dataclass
class Candidate:
    path: str
    module: torch.nn.Module
    cls: type
    #: None: a module that computes softmax, but not as an attention attnswap follows (reported, not routed)
    rewrite: ClassRewrite | None


def _normalize(selectors: Selector | Sequence[Selector] | None, what: str) -> list[Selector] | None:
    if selectors is None:
        return None
    if isinstance(selectors, (str, type)):
        selectors = [selectors]
    elif not isinstance(selectors, (list, tuple, set, frozenset)):
        selectors = [selectors]  # one wrong-typed selector: reported below
    out = list(selectors)
    for s in out:
        if isinstance(s, torch.nn.Module):
            raise AttnSwapError(
                f"`{what}` takes module-path globs or classes, got a {type(s).__name__} instance; "
                f"pass its class ({type(s).__name__}) or its path in the model (e.g. 'blocks.0.attn')"
            )
        if not isinstance(s, (str, type)):
            raise AttnSwapError(
                f"`{what}` takes module-path globs (e.g. 'blocks.*.attn') or classes, got {type(s).__name__}: {s!r}"
            )
    return out


def _matches(path: str, cls: type, selectors: list[Selector]) -> bool:
    for s in selectors:
        if isinstance(s, type):
            if issubclass(cls, s):
                return True
        elif fnmatch.fnmatchcase(path, s) or fnmatch.fnmatchcase(cls.__name__, s) or fnmatch.fnmatchcase(
            class_label(cls), s
        ):
            return True
    return False


def _computes_softmax(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None:
        return False
    stack = [code]
    while stack:
        c = stack.pop()
        if "softmax" in c.co_names:
            return True
        stack.extend(x for x in c.co_consts if hasattr(x, "co_names"))
    return False


def candidates(
    model: torch.nn.Module,
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
) -> Iterator[Candidate]:
    """Every selected module of ``model`` that calls SDPA, computes attention by hand, or has a softmax."""
    inc = _normalize(include, "include")
    exc = _normalize(exclude, "exclude")
    for path, module in model.named_modules():
        cls = original_class(module)
        if is_library_class(cls) and not is_plain_mha(cls):
            continue
        if inc is not None and not _matches(path, cls, inc):
            continue
        if exc is not None and _matches(path, cls, exc):
            continue
        rewrite = integrations.site_for(module, cls)
        if rewrite is None:
            rewrite = analyze(cls)
        if rewrite is not None:
            yield Candidate(path, module, cls, rewrite)
        elif _computes_softmax(cls):
            yield Candidate(path, module, cls, None)
