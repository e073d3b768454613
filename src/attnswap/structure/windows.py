"""Shifted-window attention's bias: a per-window mask on top of a relative-position bias.

Swin runs attention per window, the windows of every image stacked in the batch
(``B_ = B · nW``, window ``w`` of image ``b`` at ``b · nW + w``). A shifted block masks
scores between tokens that came from different regions of the image before the cyclic shift:
``mask [nW, N, N]`` holds 0 or −100 (timm's value, kept: not −inf). timm expands it to every
image and head and adds the window's relative-position bias, so the call gets a
``[B_, H, N, N]`` tensor, B times the mask's size. The structure keeps the parts: the bias of
one window (a :class:`~.table.TableGather`, another structure, or a ``[1, H, N, N]``
tensor) and the mask; score
``(b_, h, q, kv)`` is ``bias[h, q, kv] + mask[b_ % nW, q, kv]``.
"""

from __future__ import annotations

import torch

from .base import StructuredMask
from .table import TableGather

KIND = "window_segments"


class WindowedBias(StructuredMask):
    """``bias + mask.view(1, nW, 1, N, N).expand(B_ // nW, -1, H, -1, -1).reshape(-1, H, N, N)``:
    timm's Swin expression, held as ``bias`` (``[1, H, N, N]``, maybe a structure) and ``mask``."""

    kind = KIND

    def __init__(self, bias: torch.Tensor | StructuredMask, mask: torch.Tensor, batch: int, heads: int) -> None:
        windows, n = mask.shape[0], mask.shape[-1]
        if batch % windows:
            raise ValueError(f"{batch} windows in the batch is not a multiple of the mask's {windows}")
        self.bias = bias
        self.mask = mask
        self.heads = heads
        dtype = torch.promote_types(bias.dtype, mask.dtype)
        super().__init__((batch, heads, n, n), dtype, mask.device, bias.requires_grad)

    @property
    def windows(self) -> int:
        return self.mask.shape[0]

    def _bias_tensor(self) -> torch.Tensor:
        return self.bias if isinstance(self.bias, torch.Tensor) else self.bias.materialize()

    def _build(self) -> torch.Tensor:
        # timm: swin_transformer.WindowAttention.forward, its fused branch's attn_mask
        windows, n = self.windows, self.shape[-1]
        mask = self.mask.view(1, windows, 1, n, n).expand(self.shape[0] // windows, -1, self.heads, -1, -1)
        return self._bias_tensor() + mask.reshape(-1, self.heads, n, n)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.materialize()[..., start:stop, :]

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's bias as ``(table [T, H], index [N · N])`` for a kernel that gathers it:
        the table's own parts, or the tensor itself laid out as a table with the identity index."""
        if isinstance(self.bias, TableGather) and not self.bias.prefix:
            return self.bias.table, self.bias.index
        bias = self._bias_tensor()
        n = self.shape[-1]
        return bias.reshape(self.heads, n * n).t(), torch.arange(n * n, device=bias.device)

    def layout(self) -> tuple:
        inner = self.bias.layout() if isinstance(self.bias, StructuredMask) else ("tensor",)
        return (KIND, self.windows, inner)

    def detached(self) -> WindowedBias:
        bias = self.bias.detached() if isinstance(self.bias, StructuredMask) else self.bias.detach().requires_grad_(self.bias.requires_grad)
        return WindowedBias(bias, self.mask, self.shape[0], self.heads)

    def as_4d(self, q_shape: tuple[int, ...]) -> WindowedBias:
        if len(q_shape) != 4:
            raise ValueError(f"a windowed bias is [B_, H, N, N]: it reaches 4-D calls only (query {tuple(q_shape)})")
        return self
