"""Decomposed relative position: ``bias[..., q, (kh, kw)] = rel_h[..., q, kh] + rel_w[..., q, kw]``.

The bias of SAM ViT, MViTv2 and others: per query, one term for the key's row and one for its
column of a ``kh × kw`` key grid. The factors are ``[..., Nq, kh]`` and ``[..., Nq, kw]``; the bias
``[..., Nq, kh·kw]`` is ``kh·kw / (kh + kw)`` times larger (32× for samvit at 1024: 805 MB per
global layer and image against 25 MB).

``prefix`` tokens (MViTv2's class token) come before the grid in queries and keys; their rows
and columns of the bias are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..call import mask_to_4d
from .base import StructuredMask

KIND = "decomposed_rel_pos"


class DecomposedRelPos(StructuredMask):
    """``rel_h [*lead, Nq, kh]`` and ``rel_w [*lead, Nq, kw]`` (same dtype and device) standing
    for the bias ``[*lead, Nq, kh·kw]`` whose key ``j`` is grid cell ``(j // kw, j % kw)``; with
    ``prefix`` tokens, ``[*lead, prefix + Nq, prefix + kh·kw]``, zero in their rows and columns."""

    kind = KIND

    def __init__(self, rel_h: torch.Tensor, rel_w: torch.Tensor, prefix: int = 0) -> None:
        if rel_h.shape[:-1] != rel_w.shape[:-1] or rel_h.dtype != rel_w.dtype or rel_h.device != rel_w.device:
            raise ValueError(
                f"decomposed rel-pos factors disagree: rel_h {tuple(rel_h.shape)} {rel_h.dtype} on {rel_h.device}, "
                f"rel_w {tuple(rel_w.shape)} {rel_w.dtype} on {rel_w.device}"
            )
        self.rel_h = rel_h
        self.rel_w = rel_w
        self.grid = (rel_h.shape[-1], rel_w.shape[-1])
        self.prefix = prefix
        super().__init__(
            (*rel_h.shape[:-2], prefix + rel_h.shape[-2], prefix + self.grid[0] * self.grid[1]),
            rel_h.dtype,
            rel_h.device,
            rel_h.requires_grad or rel_w.requires_grad,
        )

    def _sum(self, rel_h: torch.Tensor, rel_w: torch.Tensor, prefix_rows: int = 0) -> torch.Tensor:
        # one elementwise add of the two factors, as the builders compute it: the same values bit for bit
        out = rel_h[..., :, None] + rel_w[..., None, :]
        out = out.reshape(*out.shape[:-2], self.grid[0] * self.grid[1])
        if self.prefix:
            out = F.pad(out, [self.prefix, 0, prefix_rows, 0])
        return out

    def _build(self) -> torch.Tensor:
        return self._sum(self.rel_h, self.rel_w, self.prefix)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self._tensor is not None:
            return self._tensor[..., start:stop, :]
        p = self.prefix
        lo, hi = max(start - p, 0), max(stop - p, 0)
        return self._sum(self.rel_h[..., lo:hi, :], self.rel_w[..., lo:hi, :], max(min(stop, p) - start, 0))

    def layout(self) -> tuple:
        return (KIND, self.grid, self.prefix)

    def extend(self, q: torch.Tensor, k: torch.Tensor, scale: float, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``q' = [q·scale, rel_h, rel_w, 0…]`` and ``k' = [k, onehot(j // kw), onehot(j % kw), 0…]``
        with ``head_dim`` columns: ``q'·k'ᵀ = q·kᵀ·scale + bias`` exactly (each key's one-hots pick
        its row's and its column's factor), so a kernel without bias support computes the biased
        attention at scale 1."""
        kh, kw = self.grid
        n, p = kh * kw, self.prefix
        keys = torch.arange(n, device=k.device)
        onehot = torch.zeros(p + n, head_dim - k.shape[-1], dtype=k.dtype, device=k.device)
        onehot[p + keys, keys // kw] = 1
        onehot[p + keys, kh + keys % kw] = 1
        rel = torch.cat([self.rel_h, self.rel_w], dim=-1).to(q.dtype)
        if p:  # prefix queries: no bias
            rel = F.pad(rel, [0, 0, p, 0])
        lead = torch.broadcast_shapes(q.shape[:-2], rel.shape[:-2])
        pad = head_dim - q.shape[-1] - kh - kw
        parts = [(q * scale).expand(*lead, *q.shape[-2:]), rel.expand(*lead, *rel.shape[-2:])]
        if pad:
            parts.append(q.new_zeros(*lead, q.shape[-2], pad))
        q2 = torch.cat(parts, dim=-1)
        k2 = torch.cat([k, onehot.expand(*k.shape[:-2], p + n, onehot.shape[-1])], dim=-1)
        return q2, k2

    def detached(self) -> DecomposedRelPos:
        return DecomposedRelPos(*(f.detach().requires_grad_(f.requires_grad) for f in (self.rel_h, self.rel_w)), self.prefix)

    def as_4d(self, q_shape: tuple[int, ...]) -> DecomposedRelPos:
        """The same bias for the call :func:`attnswap.call.to_4d` makes of one whose query has
        shape ``q_shape``: the factors' leading dims reshaped as the bias's would be (views)."""
        return DecomposedRelPos(mask_to_4d(self.rel_h, q_shape), mask_to_4d(self.rel_w, q_shape), self.prefix)
