"""timm, for the coverage sweep."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch

from . import Zoo


def model_names(patterns: Sequence[str] = ()) -> list[str]:
    import timm

    names = timm.list_models()
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def create_on_meta(timm, name: str) -> torch.nn.Module:
    """The model without memory where timm allows it: discovery needs only its modules."""
    try:
        return timm.create_model(name, pretrained=False, device="meta")
    except TypeError as exc:  # an older timm takes no `device` (1.0.15 does not)
        if "device" not in str(exc):
            raise
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)
    except RuntimeError:  # its __init__ reads values (`.item()` of a drop-path schedule): build it for real
        return timm.create_model(name, pretrained=False)


def build(name: str, *, meta: bool = False) -> torch.nn.Module:
    import timm

    return create_on_meta(timm, name) if meta else timm.create_model(name, pretrained=False)


def example(model: torch.nn.Module, name: str) -> torch.Tensor:
    return torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))


def outputs(model: torch.nn.Module, x: torch.Tensor) -> object:
    # features, not logits: timm zero-initializes many heads, which would hide any difference
    return model.forward_features(x) if hasattr(model, "forward_features") else model(x)


def version() -> str:
    import timm

    return timm.__version__


ZOO = Zoo("timm", model_names, build, example, outputs, version)
