"""Fixtures and helpers for the CUDA-kernel backends, tested on CPU against the fakes in ``fakes.py``
(test modules import the fixtures by name)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from attnswap.backends import base, get_backend, packaged
from attnswap.call import CallFacts
from fakes import Recorder, flash_attn_2, flash_attn_3, flash_attn_4


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def install(monkeypatch):
    """``install(backend_name, {module_name: module_or_None})``: put (fake) modules into
    ``sys.modules`` (None makes the import fail as "not installed") and make the backend look
    for its package again. Everything is undone after the test."""
    touched = []

    def install(backend_name: str, modules: dict):
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        backend = get_backend(backend_name)
        backend.forget()
        touched.append(backend)
        return backend

    yield install
    for backend in touched:
        backend.forget()


@pytest.fixture
def flash_fakes(install, recorder, monkeypatch):
    """Install the flash-attn 2, FA3 and FA4 fakes; FA4's version comes from its distribution's metadata."""
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda dist: "4.0.0b27" if dist == "flash-attn-4" else real_version(dist)
    )
    flash_pkg = flash_attn_2(recorder)
    flash_pkg.cute = flash_attn_4(recorder)
    return {
        "flash": install("flash", {"flash_attn": flash_pkg}),
        "flash3": install("flash3", {"flash_attn_interface": flash_attn_3(recorder)}),
        "flash4": install("flash4", {"flash_attn": flash_pkg, "flash_attn.cute": flash_pkg.cute}),
    }


@pytest.fixture
def gpu(monkeypatch):
    """``gpu((9, 0))``: make every capability lookup answer as if on that GPU."""

    def on(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(base, "cuda_capability", lambda index: capability)
        monkeypatch.setattr(packaged, "cuda_capability", lambda index: capability)

    return on


@pytest.fixture
def as_if_on_cuda(monkeypatch):
    """Let a packaged backend serve CPU calls with its CUDA limits (minus device and arch), so a
    whole timm model runs through an adapter and its fake on CPU."""

    def allow(backend):
        limits = dataclasses.replace(backend.cuda_limits, devices=None, min_cuda_capability=None, max_cuda_capability=None)
        monkeypatch.setattr(backend, "limits", lambda device_type: limits)
        monkeypatch.setitem(backend.__dict__, "unavailable_reason", None)
        return backend

    return allow


def cuda_facts(q=(2, 4, 197, 64), k=None, v=None, dtype=torch.float16, **kwargs) -> CallFacts:
    """The facts of a call on ``cuda:0`` (nothing touches a GPU)."""
    k = q if k is None else k
    v = k if v is None else v
    return CallFacts(
        device_type="cuda", device_index=0, dtype=dtype, q_shape=tuple(q), k_shape=tuple(k), v_shape=tuple(v),
        kv_dtypes_match=True, **kwargs,
    )


def reasons(backend_name: str, facts: CallFacts) -> list[str]:
    return get_backend(backend_name).reasons(facts)[0]


def sdpa_reference(q, k, v, **kwargs):
    """SDPA in float64 on the same inputs: what every adapter must agree with."""
    mask = kwargs.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, **kwargs)


def assert_matches(out, ref, dtype):
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
