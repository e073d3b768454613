"""diffusers, for the coverage sweep: every model class diffusers exports, built from small sizes
with random weights (nothing is downloaded).

Every class is built with the size arguments its ``__init__`` takes set small (layers, heads,
head dim, channels, ...), on the meta device, and patched: that is the discovery. diffusers
models take bespoke inputs (latents, timesteps, text states, rotary ids), so the numerical check
runs for the models listed in :data:`MODELS`, each with a small configuration and inputs of its
own; the others are reported as discovered, not checked.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, Sequence

import torch

from . import NoExample, Zoo

#: sizes set on every class whose ``__init__`` takes them (discovery)
SMALL: dict[str, Any] = {
    "num_layers": 2, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
    "cross_attention_dim": 32, "joint_attention_dim": 32, "pooled_projection_dim": 16, "caption_projection_dim": 16,
    "layers_per_block": 1, "block_out_channels": (32, 64), "norm_num_groups": 8, "sample_size": 8, "hidden_size": 32,
    "in_channels": 4, "out_channels": 4, "caption_channels": 32, "patch_size": 2, "axes_dims_rope": (2, 2, 4),
}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unet_inputs() -> dict[str, Any]:
    mask = torch.ones(2, 7)
    mask[0, -2:] = 0  # padded text: the mask has to reach the kernel
    return {"sample": torch.randn(2, 4, 8, 8, generator=_g(1)), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)), "encoder_attention_mask": mask}


def _latents_text_pooled() -> dict[str, Any]:
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g(1)),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)),
            "pooled_projections": torch.randn(2, 16, generator=_g(3)), "timestep": torch.tensor([3, 7])}


#: class name -> (small ``__init__`` arguments, inputs, attention modules one forward calls)
MODELS: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]], int]] = {
    "UNet2DConditionModel": (
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        _unet_inputs,
        8,  # self and cross attention: down 1 transformer, mid 1, up 2
    ),
    "DiTTransformer2DModel": (
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
             num_embeds_ada_norm=10),
        lambda: {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g(1)), "timestep": torch.tensor([3, 7]),
                 "class_labels": torch.tensor([1, 4])},
        2,
    ),
    "PixArtTransformer2DModel": (
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
             patch_size=2, cross_attention_dim=16, caption_channels=32, norm_num_groups=8),
        lambda: {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g(1)), "timestep": torch.tensor([3, 7]),
                 "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)),
                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
        4,
    ),
    "SD3Transformer2DModel": (
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4),
        _latents_text_pooled,
        2,
    ),
    "FluxTransformer2DModel": (
        dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8)),
        lambda: {"hidden_states": torch.randn(2, 16, 8, generator=_g(1)),
                 "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)),
                 "pooled_projections": torch.randn(2, 16, generator=_g(3)), "timestep": torch.tensor([0.3, 0.7]),
                 "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3)},
        2,
    ),
}


def _classes() -> dict[str, type]:
    import diffusers

    found = {}
    for name in dir(diffusers):
        obj = getattr(diffusers, name, None)
        if isinstance(obj, type) and issubclass(obj, diffusers.ModelMixin) and obj is not diffusers.ModelMixin:
            found[name] = obj
    return found


def model_names(patterns: Sequence[str] = ()) -> list[str]:
    names = sorted(_classes())
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def build(name: str, *, meta: bool = False) -> torch.nn.Module:
    cls = _classes()[name]
    if name in MODELS:
        kwargs = MODELS[name][0]
    else:
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in SMALL.items() if k in params}
    if not meta:
        return cls(**kwargs)
    with torch.device("meta"):
        try:
            return cls(**kwargs)
        except Exception:  # sizes that do not fit this class's checks: its defaults, without memory
            if name in MODELS or not kwargs:
                raise
            return cls()


def example(model: torch.nn.Module, name: str) -> dict[str, Any]:
    if name not in MODELS:
        raise NoExample(f"no example inputs for {name} (its forward takes model-specific arguments)")
    return MODELS[name][1]()


def outputs(model: torch.nn.Module, x: dict[str, Any]) -> object:
    return model(**x, return_dict=False)


def version() -> str:
    import diffusers

    return diffusers.__version__


ZOO = Zoo("diffusers", model_names, build, example, outputs, version)
