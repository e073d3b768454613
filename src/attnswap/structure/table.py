"""A bias gathered from a small table: ``bias[0, h, q, kv] = table[index[q · Nk + kv], h]``.

BEiT, Swin and others learn one value per relative offset and head (``table [T, H]``, a few KB)
and gather it into a ``[1, H, Nq, Nk]`` bias through a fixed ``index`` buffer. The table has
full rank (no exact factorization), so a kernel that reads it (flex) gathers per score.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import StructuredMask

KIND = "table_gather"


class TableGather(StructuredMask):
    """``table [T, H]`` and ``index [Nq · Nk]`` standing for ``build()``: ``[1, H, Nq, Nk]``."""

    kind = KIND

    def __init__(self, table: torch.Tensor, index: torch.Tensor, q_len: int, kv_len: int, build: Callable[[], torch.Tensor]) -> None:
        self.table = table
        self.index = index
        self._builder = build
        # as the gathered tensor would: a parameter's gather under no_grad does not require grad
        grad = table.requires_grad and torch.is_grad_enabled()
        super().__init__((1, table.shape[1], q_len, kv_len), table.dtype, table.device, grad)

    def _build(self) -> torch.Tensor:
        return self._builder()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.materialize()[..., start:stop, :]

    def layout(self) -> tuple:
        return (KIND,)

    def detached(self) -> TableGather:
        table = self.table.detach().requires_grad_(self.table.requires_grad)
        index, shape = self.index, self.shape
        return TableGather(
            table, index, shape[-2], shape[-1],
            lambda: table[index].view(shape[-2], shape[-1], -1).permute(2, 0, 1).contiguous().unsqueeze(0),
        )

    def as_4d(self, q_shape: tuple[int, ...]) -> TableGather:
        if len(q_shape) != 4:
            raise ValueError(f"a table-gather bias is [1, H, Nq, Nk]: it reaches 4-D calls only (query {tuple(q_shape)})")
        return self
