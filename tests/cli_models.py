"""Models the CLI tests name as ``cli_models:attribute`` (a user's own, not timm)."""

from torch import nn


def small_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
