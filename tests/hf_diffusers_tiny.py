"""Tiny diffusers models (random weights) and their inputs, for the integration tests: the
coverage sweep's own table (attnswap.zoos.diffusers_models.MODELS), by short name."""

from __future__ import annotations

from typing import Any

import torch

diffusers = __import__("pytest").importorskip("diffusers")

from attnswap.zoos import diffusers_models  # noqa: E402

_SHORT = {
    "unet2d_condition": "UNet2DConditionModel", "dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel",
    "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
}
MODELS = {short: diffusers_models.MODELS[name] for short, name in _SHORT.items()}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any], int]:
    """The model (random weights, eval mode, ``dtype``), its inputs and how many attention modules one forward calls."""
    torch.manual_seed(0)
    model = diffusers_models.build(_SHORT[name]).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    inputs = diffusers_models.example(model, _SHORT[name])
    x = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    return model, x, MODELS[name][2]
