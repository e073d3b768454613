"""A bias gathered from a small table: ``bias[h, q, kv] = table[index[q · Nk + kv], h]``.

BEiT, Swin, MaxViT, LeViT and others learn one value per relative offset and head (``table
[T, H]``, a few KB; for Swin v2 and ``RelPosMlp`` an MLP computes it from coordinates) and
gather it into an ``[H, Nq, Nk]`` bias through a fixed ``index``. The table has full rank (no
exact factorization), so a kernel that reads it (flex) gathers per score.

Some models put prefix tokens (a class token) before the grid with a zero bias in their rows
and columns (``RelPosMlp(prefix_tokens=1)``): ``prefix`` says how many; the index covers the
grid only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .base import StructuredMask

KIND = "table_gather"


class TableGather(StructuredMask):
    """``table [T, H]`` and ``index [(Nq - prefix) · (Nk - prefix)]`` standing for ``build()``:
    ``[1, H, Nq, Nk]`` (``[H, Nq, Nk]`` when ``batched`` is False, as LeViT's biases are)."""

    kind = KIND

    def __init__(
        self,
        table: torch.Tensor,
        index: torch.Tensor,
        q_len: int,
        kv_len: int,
        build: Callable[[], torch.Tensor],
        prefix: int = 0,
        batched: bool = True,
    ) -> None:
        self.table = table
        self.index = index
        self.prefix = prefix
        self.batched = batched
        self._builder = build
        heads = table.shape[1]
        shape = (1, heads, q_len, kv_len) if batched else (heads, q_len, kv_len)
        # as the gathered tensor would: a parameter's gather under no_grad does not require grad
        grad = table.requires_grad and torch.is_grad_enabled()
        super().__init__(shape, table.dtype, table.device, grad)

    def _build(self) -> torch.Tensor:
        return self._builder()

    def gather(self) -> torch.Tensor:
        """The bias by the rule a kernel reads it with (``table[index]``, prefix rows and columns
        zero): the same values as :meth:`materialize`, computed from the parts held here."""
        q_len, kv_len, p = self.shape[-2], self.shape[-1], self.prefix
        bias = self.table[self.index].view(q_len - p, kv_len - p, -1).permute(2, 0, 1)
        if p:
            bias = F.pad(bias, [p, 0, p, 0])
        bias = bias.contiguous()
        return bias.unsqueeze(0) if self.batched else bias

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.materialize()[..., start:stop, :]

    def layout(self) -> tuple:
        return (KIND, self.prefix)

    def detached(self) -> TableGather:
        table = self.table.detach().requires_grad_(self.table.requires_grad)
        parts = TableGather(table, self.index, self.shape[-2], self.shape[-1], lambda: None, self.prefix, self.batched)
        parts._builder = parts.gather
        return parts

    def as_4d(self, q_shape: tuple[int, ...]) -> TableGather:
        if len(q_shape) != 4:
            raise ValueError(f"a table-gather bias is [1, H, Nq, Nk]: it reaches 4-D calls only (query {tuple(q_shape)})")
        return self
