"""Key padding: which tokens of each sequence are real, standing for an additive padding mask.

NaFlexViT pads a batch of variable-length sequences and masks the padding with an additive
``[B, 1, L, L]`` mask (``symmetric``: query and key both valid) or ``[B, 1, Lq, L]`` (only the
key checked), ``finfo.min`` where masked. Held as ``valid [B, L]``, a call can instead run each
sequence on its own valid tokens (:meth:`KeyPadding.run_per_sequence`), or all of them at once
packed end to end for a variable-length kernel (:meth:`KeyPadding.run_packed`), skipping the
padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import StructuredMask

KIND = "key_padding"


class KeyPadding(StructuredMask):
    """``valid [B, L]`` (bool) standing for the mask ``build()`` returns: ``[B, 1, L, L]`` when
    ``symmetric`` (a pair is kept when query and key are both valid), else ``[B, 1, q_len, L]``
    (kept when the key is valid)."""

    kind = KIND

    def __init__(
        self,
        valid: torch.Tensor,
        symmetric: bool,
        q_len: int,
        dtype: torch.dtype,
        build: Callable[[], torch.Tensor],
    ) -> None:
        batch, length = valid.shape
        self.valid = valid
        self.symmetric = bool(symmetric)
        self._builder = build
        self._selections: list | None = None
        self._packing: Packing | None = None
        shape = (batch, 1, length, length) if self.symmetric else (batch, 1, q_len, length)
        super().__init__(shape, dtype, valid.device, False)

    def _build(self) -> torch.Tensor:
        return self._builder()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        whole = self.materialize()
        return whole if whole.shape[-2] == 1 else whole[..., start:stop, :]

    def layout(self) -> tuple:
        return (KIND, self.symmetric)

    def detached(self) -> KeyPadding:
        return self  # nothing in it has a gradient

    def as_4d(self, q_shape: tuple[int, ...]) -> KeyPadding:
        return self

    # -- per sequence ------------------------------------------------------------------------
    def selections(self) -> list[slice | torch.Tensor | None]:
        """Per sequence: ``slice(0, n)`` when its valid tokens are its first ``n``, else their
        indices; None when it has none. Read once (one host sync) for every layer of a forward."""
        if self._selections is None:
            valid = self.valid.detach().to("cpu", torch.bool)
            counts = valid.sum(1).tolist()
            out: list[slice | torch.Tensor | None] = []
            for b, n in enumerate(counts):
                if n == 0:
                    out.append(None)
                elif bool(valid[b, :n].all()):
                    out.append(slice(0, n))
                else:
                    out.append(valid[b].nonzero().squeeze(1).to(self.valid.device))
            self._selections = out
        return self._selections

    # -- packed (a variable-length kernel) --------------------------------------------------
    def packing(self) -> Packing | None:
        """The batch's valid tokens as packed sequences; None when a sequence has none (a
        variable-length kernel takes no empty sequence: that batch runs per sequence)."""
        if self._packing is None:
            selections = self.selections()
            if any(sel is None for sel in selections):
                return None
            valid = self.valid.to(torch.bool)
            self._packing = _packing(valid, [int(sel.stop) if isinstance(sel, slice) else sel.numel() for sel in selections])
        return self._packing

    def run_packed(self, varlen, per_sequence, q, k, v, *, scale=None, enable_gqa=False) -> torch.Tensor:
        """The masked call's output from one variable-length kernel call on the valid tokens,
        packed end to end (``varlen`` takes :meth:`~attnswap.backends.base.Backend.varlen`'s
        arguments). Rows whose keys are all masked get the mean of v, as in
        :meth:`run_per_sequence`, which (with ``per_sequence``) serves a batch that has a
        sequence without valid tokens."""
        packing = self.packing()
        if packing is None:
            return self.run_per_sequence(per_sequence, q, k, v, scale=scale, enable_gqa=enable_gqa)
        batch, heads, q_len = q.shape[0], q.shape[1], q.shape[2]
        ks, vs = _tokens(k).index_select(0, packing.index), _tokens(v).index_select(0, packing.index)
        if self.symmetric:
            qs, cu_q, lengths_q, max_q = _tokens(q).index_select(0, packing.index), packing.cu_seqlens, packing.lengths, packing.max_seqlen
        else:  # every query row attends to its sequence's valid keys
            qs, lengths_q, max_q = _tokens(q), [q_len] * batch, q_len
            cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
        out = varlen(qs, ks, vs, cu_q, packing.cu_seqlens, max_q, packing.max_seqlen, lengths_q, packing.lengths,
                     scale=scale, enable_gqa=enable_gqa)
        if not self.symmetric:
            return out.view(batch, q_len, heads, -1).transpose(1, 2)
        full = out.new_zeros(batch * q_len, heads, out.shape[-1]).index_copy(0, packing.index, out)
        full = full.view(batch, q_len, heads, -1).transpose(1, 2)
        if packing.valid_rows is None:
            return full
        uniform = _uniform_rows(q, k, v, scale)  # padded rows: every key masked, the mean of v
        return torch.where(packing.valid_rows[:, None, :, None], full, uniform)

    def run_per_sequence(self, inner, q, k, v, *, scale=None, enable_gqa=False) -> torch.Tensor:
        """The masked call's output, computed one sequence at a time on its valid tokens only.

        A valid query row attends to the valid keys alone, as with the mask (masked keys get
        ``exp(finfo.min - max) = 0`` weight there). A row whose keys are all masked (a padded
        query of a symmetric mask, or a sequence without valid tokens) gets what SDPA gives it
        with ``finfo.min``: every score equal, so the mean of v over all keys."""
        length = self.shape[-1]
        outs = []
        for b, sel in enumerate(self.selections()):
            qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
            if sel is None:
                outs.append(_uniform_rows(qb, kb, vb, scale))
                continue
            ks, vs = _take(kb, sel), _take(vb, sel)
            if not self.symmetric:
                outs.append(inner(qb, ks, vs, None, 0.0, False, scale=scale, enable_gqa=enable_gqa))
                continue
            out = inner(_take(qb, sel), ks, vs, None, 0.0, False, scale=scale, enable_gqa=enable_gqa)
            n = out.shape[-2]
            if n == length:
                outs.append(out)
                continue
            if isinstance(sel, slice):
                outs.append(torch.cat([out, _uniform_rows(qb[..., n:, :], kb, vb, scale)], dim=-2))
            else:
                padded = (~self.valid[b]).nonzero().squeeze(1)
                fill = _uniform_rows(qb.index_select(-2, padded), kb, vb, scale)
                rows = torch.cat([out, fill], dim=-2)
                outs.append(rows.index_select(-2, torch.cat([sel, padded]).argsort()))
        return torch.cat(outs, dim=0)


@dataclass(frozen=True)
class Packing:
    """Where each sequence's valid tokens sit in a batch flattened to ``[B·L]`` tokens, and the
    offsets a variable-length kernel takes (made once per mask, shared by every layer)."""

    #: flat positions ``b·L + l`` of the valid tokens, sequence after sequence
    index: torch.Tensor
    #: ``[B + 1]`` int32 offsets of each sequence's valid tokens in the packed tensor
    cu_seqlens: torch.Tensor
    lengths: list[int]
    max_seqlen: int
    #: ``[B, L]``: the rows that are valid (None when every row is)
    valid_rows: torch.Tensor | None


def _packing(valid: torch.Tensor, counts: list[int]) -> Packing:
    batch, length = valid.shape
    flat = valid.reshape(-1).nonzero().squeeze(1)  # row-major: sequence after sequence
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=valid.device)
    return Packing(flat, cu, counts, max(counts), None if all(n == length for n in counts) else valid)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, E]`` as ``[B·L, H, E]`` (a view for timm's projections, whose tokens lead)."""
    return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3])


def _take(t: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return t[..., sel, :] if isinstance(sel, slice) else t.index_select(-2, sel)


def _uniform_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention rows whose scores are all masked with ``finfo.min``, as SDPA computes them: every
    weight ``1/L``, so each row is the mean of v over all keys; and SDPA's gradient for them
    (softmax's derivative at the uniform point is not zero, so q and k get gradients too)."""
    return _UniformRows.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], dim=-3)


def _fold(grad: torch.Tensor, heads: int) -> torch.Tensor:
    """The gradient of ``_heads(t)`` back to ``t``'s (fewer, grouped) heads."""
    if grad.shape[-3] == heads:
        return grad
    return grad.unflatten(-3, (heads, grad.shape[-3] // heads)).sum(-3)


class _UniformRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        mean = _heads(v, q.shape[-3]).mean(dim=-2, keepdim=True)
        return mean.expand(*q.shape[:-1], v.shape[-1]).clone()

    @staticmethod
    def backward(ctx, grad_out):
        # softmax's derivative at weights 1/L, d_scores = (g·v_j - g·mean(v)) / L, contracted
        # through [E, Ev] products: no [rows, L] tensor, so a packed batch's backward stays
        # O(L) in memory like the kernel's
        q, k, v = ctx.saved_tensors
        heads, length = q.shape[-3], k.shape[-2]
        kh, vh = _heads(k, heads), _heads(v, heads)
        g = grad_out
        v_mean = vh.mean(dim=-2, keepdim=True)
        factor = ctx.scale / length
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[0]:
            along = (g * v_mean).sum(dim=-1, keepdim=True)  # g·mean(v) per row
            grad_q = (g @ (vh.transpose(-2, -1) @ kh) - along * kh.sum(dim=-2, keepdim=True)) * factor
        if ctx.needs_input_grad[1]:
            grad_k = _fold(((vh - v_mean) @ (g.transpose(-2, -1) @ q)) * factor, k.shape[-3])
        if ctx.needs_input_grad[2]:
            grad_v = _fold(g.sum(dim=-2, keepdim=True).expand(*vh.shape[:-1], g.shape[-1]) / length, v.shape[-3])
        return grad_q, grad_k, grad_v, None
