"""attnswap: route every attention computation of a PyTorch model through the backend you choose.

    >>> import timm, attnswap
    >>> model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    >>> report = attnswap.patch(model, backend="flex")   # in place; state_dict unchanged
    >>> attnswap.unpatch(model)                          # exactly as before

Importing attnswap imports no optional backend package.
"""

from __future__ import annotations

from .api import is_patched, patch, patched, stats, unpatch
from .auto import decisions as auto_decisions
from .backends import (
    Backend,
    BackendInfo,
    Limits,
    get_backend,
    list_backends,
    register_backend,
    unregister_backend,
)
from .call import CallFacts
from .errors import AttnSwapError, BackendUnavailable, NotScriptable, PatchError, UnsupportedCall
from .report import ModelStats, PatchReport, SiteReport, SiteStats

__version__ = "0.1.0"

__all__ = [
    "AttnSwapError",
    "Backend",
    "BackendInfo",
    "BackendUnavailable",
    "CallFacts",
    "Limits",
    "ModelStats",
    "NotScriptable",
    "PatchError",
    "PatchReport",
    "SiteReport",
    "SiteStats",
    "UnsupportedCall",
    "auto_decisions",
    "get_backend",
    "is_patched",
    "list_backends",
    "patch",
    "patched",
    "register_backend",
    "stats",
    "unpatch",
    "unregister_backend",
]
