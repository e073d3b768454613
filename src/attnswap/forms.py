"""How a structured bias (``attnswap.structure``) reaches the backend that serves its call.

Three forms, decided once per call signature with the backend:

- **from its parts**: the backend lists the structure's kind in ``Backend.structures`` and
  computes it in its kernel (flex reads decomposed rel-pos factors in a ``score_mod``);
- **per sequence**: a key-padding mask is dropped and each sequence of the batch runs on its
  valid tokens only (no mask at all, so even kernels without mask support take it); padded
  query rows get what the masked call gives them;
- **packed**: the same, in one call of the backend's variable-length kernel
  (:meth:`~attnswap.backends.base.Backend.varlen`) on every sequence's valid tokens end to end;
- **head dim extended** (decomposed relative position, for kernels that take no bias):
  ``q' = [q·scale, rel_h, rel_w]``, ``k' = [k, onehot(key row), onehot(key column)]``, scale 1;
  ``q'·k'ᵀ`` is exactly the scaled scores plus the bias, so the plain kernel computes the biased
  attention (v zero-padded to the new head dim where the kernel needs equal head dims);
- **materialized**: the backend gets exactly the tensor the module would have built, whole,
  or a slice of query rows at a time when it is larger than :data:`MATERIALIZE_BUDGET`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from .backends.base import Backend
from .call import MASK_NONE, CallFacts
from .structure.decomposed import KIND as DECOMPOSED
from .structure.padding import KIND as KEY_PADDING

_Tensor = torch.Tensor

#: a structured bias bigger than this is handed to backends that take tensors a slice of query
#: rows at a time (each slice's bias is made, used and freed in turn)
MATERIALIZE_BUDGET = 32 * 2**20
#: the fewest query rows a slice has (kernels tile queries; tiny slices waste their tiles)
MIN_ROWS = 128

FORM_PARTS = "from its parts"
FORM_SEQUENCES = "per sequence, padding dropped"
FORM_PACKED = "packed sequences, padding dropped (varlen kernel)"
FORM_WHOLE = "materialized"
FORM_ROWS = "materialized by query rows"
FORM_EXTENDED = "head dim extended by its factors"
FORM_EXTENDED_PAD_V = "head dim extended by its factors, v padded"
#: extended head dims are rounded up to this (kernels want multiples of 8; zeros change no score)
HEAD_DIM_ALIGN = 8

#: how a backend's reasons are asked (the router's wraps a user's ``supports`` errors)
Reasons = Callable[[Backend, CallFacts], "tuple[list[str], bool]"]


def choose(backend: Backend, facts: CallFacts, reasons: Reasons) -> tuple[list[str], bool, str | None]:
    """Whether ``backend`` can serve ``facts`` (its reasons), the 4-D reshape, and the form a
    structured bias reaches it in (None for a call without one)."""
    kind = facts.structure_kind
    if kind is None:
        return (*reasons(backend, facts), None)
    if kind in backend.structures and not backend.structure_reasons(facts):
        return (*reasons(backend, facts), FORM_PARTS)
    if kind == DECOMPOSED:
        tensor_reasons, reshape = reasons(backend, facts)
        if not tensor_reasons:
            return tensor_reasons, reshape, _materialized(facts)
        for form in (FORM_EXTENDED, FORM_EXTENDED_PAD_V):  # only for kernels that cannot take the bias
            extended = kernel_facts(facts, form)
            if extended is not None and not reasons(backend, extended)[0]:
                return [], reasons(backend, extended)[1], form
        return tensor_reasons, reshape, _materialized(facts)
    sequence = per_sequence_facts(facts)
    if sequence is not None and not backend.compiles_per_shape:
        seq_reasons, _ = reasons(backend, sequence)
        if not seq_reasons and not backend.varlen_reasons(sequence):
            return [], False, FORM_PACKED  # one launch, no padding: wherever the backend has the kernel
        if not seq_reasons:
            tensor_reasons, reshape = reasons(backend, facts)
            # on CPU the padding's work is skipped; elsewhere a backend that takes the mask keeps
            # one call (a kernel launch per sequence can cost more than the padding)
            if facts.device_type == "cpu" or tensor_reasons:
                return [], False, FORM_SEQUENCES
            return tensor_reasons, reshape, _materialized(facts)
    return (*reasons(backend, facts), _materialized(facts))


def _materialized(facts: CallFacts) -> str:
    return FORM_WHOLE if row_slice(facts) is None else FORM_ROWS


def kernel_facts(facts: CallFacts, form: str | None) -> CallFacts | None:
    """The facts of the call the kernel itself receives when the bias reaches it in ``form``
    (None when the call cannot take that form)."""
    if form in (FORM_SEQUENCES, FORM_PACKED):
        return per_sequence_facts(facts)
    if form in (FORM_EXTENDED, FORM_EXTENDED_PAD_V):
        return extended_facts(facts, pad_v=form == FORM_EXTENDED_PAD_V)
    return facts


def extended_head_dim(facts: CallFacts) -> int:
    kh, kw = facts.structure[1]  # (KIND, grid, prefix)
    e = facts.head_dim + kh + kw
    return -(-e // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN


def extended_facts(facts: CallFacts, pad_v: bool) -> CallFacts | None:
    """The facts of a decomposed rel-pos call with its bias folded into the head dim."""
    if facts.structure_kind != DECOMPOSED or facts.is_causal:
        return None
    (kh, kw), prefix = facts.structure[1], facts.structure[2]
    if facts.kv_len != prefix + kh * kw:
        return None
    e = extended_head_dim(facts)
    if pad_v and facts.v_head_dim > e:
        return None
    return replace(
        facts,
        q_shape=(*facts.q_shape[:-1], e), k_shape=(*facts.k_shape[:-1], e),
        v_shape=(*facts.v_shape[:-1], e) if pad_v else facts.v_shape,
        mask_kind=MASK_NONE, mask_shape=None, mask_dtype=None, mask_requires_grad=False, structure=None, scale=1.0,
    )


def per_sequence_facts(facts: CallFacts) -> CallFacts | None:
    """The facts of one sequence's call without its key-padding mask (the longest it can be),
    or None when this call cannot be run per sequence."""
    if facts.structure_kind != KEY_PADDING or facts.ndim != 4 or facts.dropout_p or facts.is_causal:
        return None
    batch = facts.q_shape[0]
    if facts.k_shape[0] != batch or facts.v_shape[0] != batch or (facts.mask_shape or (0,))[0] != batch:
        return None
    one = lambda shape: (1, *shape[1:])  # noqa: E731
    return replace(
        facts,
        q_shape=one(facts.q_shape), k_shape=one(facts.k_shape), v_shape=one(facts.v_shape),
        mask_kind=MASK_NONE, mask_shape=None, mask_dtype=None, mask_requires_grad=False, structure=None,
    )


def row_slice(facts: CallFacts) -> int | None:
    """How many query rows a backend that takes tensors gets at once for this call's structured
    bias, or None to materialize it whole (small enough, or rows it cannot be sliced by)."""
    shape = facts.mask_shape
    if facts.structure is None or shape is None or len(shape) < 2 or shape[-2] != facts.q_len or facts.dropout_p:
        return None  # (dropout: rows drawn in slices would use the random stream differently)
    row_bytes = facts.mask_dtype.itemsize * shape[-1]
    for s in shape[:-2]:
        row_bytes *= s
    if row_bytes * facts.q_len <= MATERIALIZE_BUDGET:
        return None
    rows = max(MIN_ROWS, MATERIALIZE_BUDGET // row_bytes // MIN_ROWS * MIN_ROWS)
    return rows if rows < facts.q_len else None


def wrap(
    inner: Callable[..., torch.Tensor], facts: CallFacts, form: str | None, varlen: Callable[..., torch.Tensor] | None = None
) -> Callable[..., torch.Tensor]:
    """``inner`` (the backend's runner) made to take the call's structured bias in ``form``
    (``varlen``: the backend's variable-length kernel, for :data:`FORM_PACKED`)."""
    if form is None or form == FORM_PARTS:
        return inner
    if form == FORM_SEQUENCES:
        return _per_sequence(inner)
    if form == FORM_PACKED:
        return _packed(varlen, inner)
    if form in (FORM_EXTENDED, FORM_EXTENDED_PAD_V):
        return _extended(inner, extended_head_dim(facts), form == FORM_EXTENDED_PAD_V)
    return _materializing(inner, row_slice(facts))


def _materializing(inner: Callable[..., torch.Tensor], rows: int | None) -> Callable[..., torch.Tensor]:
    """Run ``inner`` on the tensor a structured bias stands for: whole, or ``rows`` query rows at
    a time (each output row depends only on its own query row and bias row, so the slices'
    outputs, stacked, are the call's output)."""
    if rows is None:
        def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
            if type(m) is not _Tensor and m is not None:
                m = m.materialize()
            return inner(q, k, v, m, d, c, scale=scale, enable_gqa=enable_gqa)

        return run

    def run_rows(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
        if type(m) is _Tensor or m is None:
            return inner(q, k, v, m, d, c, scale=scale, enable_gqa=enable_gqa)
        n = q.shape[-2]
        outs = [
            inner(q[..., i : i + rows, :], k, v, m.rows(i, min(i + rows, n)), d, c, scale=scale, enable_gqa=enable_gqa)
            for i in range(0, n, rows)
        ]
        return torch.cat(outs, dim=-2)

    return run_rows


def _per_sequence(inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
        if type(m) is _Tensor or m is None:
            return inner(q, k, v, m, d, c, scale=scale, enable_gqa=enable_gqa)
        return m.run_per_sequence(inner, q, k, v, scale=scale, enable_gqa=enable_gqa)

    return run


def _packed(varlen: Callable[..., torch.Tensor], inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
        if type(m) is _Tensor or m is None:
            return inner(q, k, v, m, d, c, scale=scale, enable_gqa=enable_gqa)
        return m.run_packed(varlen, inner, q, k, v, scale=scale, enable_gqa=enable_gqa)

    return run


def _extended(inner: Callable[..., torch.Tensor], head_dim: int, pad_v: bool) -> Callable[..., torch.Tensor]:
    def run(q, k, v, m=None, d=0.0, c=False, scale=None, enable_gqa=False):
        if type(m) is _Tensor or m is None:
            return inner(q, k, v, m, d, c, scale=scale, enable_gqa=enable_gqa)
        q2, k2 = m.extend(q, k, q.shape[-1] ** -0.5 if scale is None else scale, head_dim)
        ev = v.shape[-1]
        if pad_v and ev != head_dim:
            v = torch.nn.functional.pad(v, (0, head_dim - ev))
        out = inner(q2, k2, v, None, d, c, scale=1.0, enable_gqa=enable_gqa)
        return out[..., :ev] if out.shape[-1] != ev else out

    return run
