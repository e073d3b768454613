"""torchvision, for the coverage sweep: every builder of ``torchvision.models`` (classification,
video, segmentation, detection, optical flow, quantized), built with random weights and no
pretrained backbone, so nothing is downloaded."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Sequence

import torch

from . import Zoo

#: input sizes the models take (batch 1); video models are (C, T, H, W)
_VIDEO_INPUT = {"mvit": (3, 16, 224, 224), "default": (3, 8, 112, 112)}


def model_names(patterns: Sequence[str] = ()) -> list[str]:
    import torchvision

    names = sorted(torchvision.models.list_models())
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def build(name: str, *, meta: bool = False) -> torch.nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # its default downloads an ImageNet backbone
    if meta:
        try:
            with torch.device("meta"):
                return builder(**kwargs)
        except (RuntimeError, NotImplementedError):  # its __init__ reads values (RegNet's widths): build it for real
            pass
    return builder(**kwargs)


def _is_video(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.video")


def example(model: torch.nn.Module, name: str) -> torch.Tensor:
    if _is_video(model):
        return torch.randn(1, *_VIDEO_INPUT["mvit" if name.startswith("mvit") else "default"])
    return torch.randn(1, 3, 224, 224)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> object:
    return model(x)


def version() -> str:
    import torchvision

    return torchvision.__version__


ZOO = Zoo("torchvision", model_names, build, example, outputs, version)
