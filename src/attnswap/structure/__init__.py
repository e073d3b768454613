"""Attention biases and masks carried as the parts they are built from (see :mod:`.base`)."""

from .base import StructuredMask
from .builders import register_builder, replacement_for
from .decomposed import DecomposedRelPos

__all__ = ["DecomposedRelPos", "StructuredMask", "register_builder", "replacement_for"]
