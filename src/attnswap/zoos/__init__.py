"""Model libraries the coverage sweep knows how to enumerate, build and feed.

Each library's knowledge lives in its own module, imported only when its sweep runs:
:mod:`.timm_models`, :mod:`.torchvision_models`, :mod:`.transformers_models`, :mod:`.diffusers_models`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


class NoExample(Exception):
    """The sweep has no example input for this model: discovered, not checked numerically."""


@dataclass(frozen=True)
class Zoo:
    """How the sweep lists, builds and runs the models of one library."""

    name: str
    #: model names matching any of the glob patterns (all when none)
    names: Callable[[Sequence[str]], list[str]]
    #: the model with random weights; ``meta=True``: without memory where the library allows it
    build: Callable[..., torch.nn.Module]
    #: one example input for the model (float32): a tensor, or a dict of keyword inputs
    example: Callable[[torch.nn.Module, str], "torch.Tensor | dict[str, torch.Tensor]"]
    #: what the sweep compares: features where the library has them (heads may be zero-initialized)
    outputs: Callable[[torch.nn.Module, torch.Tensor], object]
    version: Callable[[], str]


_MODULES = {
    "timm": "timm_models", "torchvision": "torchvision_models", "transformers": "transformers_models",
    "diffusers": "diffusers_models",
}


def names() -> list[str]:
    return list(_MODULES)


def get_zoo(name: str) -> Zoo:
    if name not in _MODULES:
        raise ValueError(f"attnswap knows no model library {name!r}; choose one of {', '.join(_MODULES)}")
    return importlib.import_module(f".{_MODULES[name]}", __name__).ZOO
