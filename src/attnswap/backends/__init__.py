"""Attention backends: one signature (SDPA's), each declaring what it supports."""

from __future__ import annotations

from .base import Backend, FunctionBackend, Limits, limit_reasons
from .eager import EagerBackend, eager_attention
from .flash import FlashAttn2Backend, FlashAttn3Backend, FlashAttn4Backend
from .flex import FlexBackend
from .registry import (
    ALIASES,
    BackendInfo,
    get_backend,
    list_backends,
    register_backend,
    resolve_name,
    unregister_backend,
)
from .registry import _add as _register_builtin
from .sage import SageBackend
from .sdpa import SdpaBackend, SdpaCudnnBackend, SdpaEfficientBackend, SdpaFlashBackend, SdpaMathBackend
from .xformers import XformersBackend

for _backend in (
    SdpaBackend(),
    SdpaFlashBackend(),
    SdpaEfficientBackend(),
    SdpaCudnnBackend(),
    SdpaMathBackend(),
    FlexBackend(),
    FlashAttn2Backend(),
    FlashAttn3Backend(),
    FlashAttn4Backend(),
    XformersBackend(),
    SageBackend(),
    EagerBackend(),
):
    _register_builtin(_backend, builtin=True)
del _backend

__all__ = [
    "ALIASES",
    "Backend",
    "BackendInfo",
    "FunctionBackend",
    "Limits",
    "eager_attention",
    "get_backend",
    "limit_reasons",
    "list_backends",
    "register_backend",
    "resolve_name",
    "unregister_backend",
]
