"""A bias or mask carried as the small parts it is built from, standing in for its tensor.

A module builds an attention bias (a relative-position bias, say) and passes it to SDPA as
``attn_mask``. When patching swaps the module's bias builder for a structured one (see
:mod:`.builders`), the builder returns a :class:`StructuredMask` instead: it holds the parts
(factors, a table and its index rule, segment ids, lengths), computed at this call from the
module's live parameters, and reports the shape, dtype, device and ``requires_grad`` of the
tensor it stands for. The router hands it to a backend that computes the structure in its
kernel, and materializes it for every other backend: the same values, element for element, as
the tensor the module would have built (``materialize()``), or the same rows a slice at a time
(``rows()``) so a large bias never exists whole.

Anything else that touches it (the module's own non-fused branch, user code, a hook) gets the
tensor: torch functions materialize it through ``__torch_function__``, and any other attribute
is read from the materialized tensor. Nothing is cached across calls.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map


class StructuredMask:
    """Base class: an additive attention bias held as its parts. Subclasses set ``kind`` and
    implement :meth:`materialize`, :meth:`rows` and :meth:`signature`."""

    #: what kind of structure (a backend lists the kinds it computes from their parts)
    kind: str = "structured"
    #: marks structured masks for code that cannot import this class (``attnswap.call``)
    attnswap_structure = True

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, requires_grad: bool) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = device
        self.requires_grad = requires_grad
        self._tensor: torch.Tensor | None = None
        #: why the tensor was built (None while it has not been)
        self.materialized_by: str | None = None

    # -- what a backend that needs the tensor gets -------------------------------------------
    def materialize(self) -> torch.Tensor:
        """The whole bias, exactly as the module would have built it (built once per object)."""
        if self._tensor is None:
            self._tensor = self._build()
            self.materialized_by = self.materialized_by or "a backend that takes tensors"
        return self._tensor

    def _build(self) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Query rows ``start:stop`` of the bias (dim -2), equal to ``materialize()[..., start:stop, :]``."""
        raise NotImplementedError

    def layout(self) -> tuple:
        """The structure's kind and its constants (a grid size, a window): what a backend judges
        besides the shape of the tensor it stands for (``CallFacts.structure``)."""
        return (self.kind,)

    def detached(self) -> StructuredMask:
        """The same bias over detached copies of its parts (``requires_grad`` kept), so a trial
        backward (``auto``'s timing) reaches no parameter of the module."""
        raise NotImplementedError

    def as_4d(self, q_shape: tuple[int, ...]) -> StructuredMask:
        """The same bias for the call :func:`attnswap.call.to_4d` makes of one whose query has shape ``q_shape``."""
        raise NotImplementedError

    def signature(self) -> tuple:
        """What a call's plan depends on beyond q/k/v: part of the router's plan key."""
        return (self.layout(), self.shape, self.dtype, self.requires_grad)

    @property
    def nbytes(self) -> int:
        """Bytes the materialized tensor would take."""
        n = self.dtype.itemsize if hasattr(self.dtype, "itemsize") else torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    # -- everything else sees the tensor ----------------------------------------------------
    def _outside(self, use: str) -> torch.Tensor:
        if self._tensor is None:
            self.materialized_by = f"{use} outside the attention call"
        return self.materialize()

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", str(func))

        def tensor(a: Any) -> Any:
            return a._outside(name) if isinstance(a, StructuredMask) else a

        return func(*tree_map(tensor, args), **tree_map(tensor, kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        # only reached for names the object does not have: a tensor method or attribute
        if name.startswith("_") or name == "materialized_by":
            raise AttributeError(name)
        return getattr(self._outside(f".{name}"), name)

    def __add__(self, other: Any) -> Any:
        return self._outside("+") + other

    def __radd__(self, other: Any) -> Any:
        return other + self._outside("+")

    def __sub__(self, other: Any) -> Any:
        return self._outside("-") - other

    def __rsub__(self, other: Any) -> Any:
        return other - self._outside("-")

    def __mul__(self, other: Any) -> Any:
        return self._outside("*") * other

    def __rmul__(self, other: Any) -> Any:
        return other * self._outside("*")

    def __getitem__(self, index: Any) -> Any:
        return self._outside("[]")[index]

    def __repr__(self) -> str:
        return f"<attnswap {self.kind} bias {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}>"
