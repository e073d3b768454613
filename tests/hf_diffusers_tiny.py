"""Tiny diffusers models (random weights) and their inputs, for the integration tests."""

from __future__ import annotations

from typing import Any, Callable

import torch

diffusers = __import__("pytest").importorskip("diffusers")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unet_inputs() -> dict[str, Any]:
    mask = torch.ones(2, 7)
    mask[0, -2:] = 0  # padded text: the mask has to reach the kernel
    return {"sample": torch.randn(2, 4, 8, 8, generator=_g(1)), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)), "encoder_attention_mask": mask}


D = diffusers
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, Any]], int]] = {
    # name: (model, inputs, attention modules)
    "unet2d_condition": (
        lambda: D.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        _unet_inputs,
        2 + 2 * 2 + 2,  # down: 1 transformer (self + cross), mid: 1, up: 2 (one per layer + 1)
    ),
    "dit": (
        lambda: D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=10),
        lambda: {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g(1)), "timestep": torch.tensor([3, 7]),
                 "class_labels": torch.tensor([1, 4])},
        2,
    ),
    "pixart": (
        lambda: D.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=32, norm_num_groups=8),
        lambda: {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g(1)), "timestep": torch.tensor([3, 7]),
                 "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)),
                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
        4,
    ),
    "sd3": (
        lambda: D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4),
        lambda: {"hidden_states": torch.randn(2, 4, 8, 8, generator=_g(1)),
                 "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)),
                 "pooled_projections": torch.randn(2, 16, generator=_g(3)), "timestep": torch.tensor([3, 7])},
        2,
    ),
    "flux": (
        lambda: D.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=(4, 4, 8)),
        lambda: {"hidden_states": torch.randn(2, 16, 8, generator=_g(1)),
                 "encoder_hidden_states": torch.randn(2, 7, 32, generator=_g(2)),
                 "pooled_projections": torch.randn(2, 16, generator=_g(3)), "timestep": torch.tensor([0.3, 0.7]),
                 "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3)},
        2,
    ),
}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any], int]:
    make, inputs, sites = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    x = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs().items()}
    return model, x, sites
