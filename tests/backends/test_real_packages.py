"""The fakes in ``fakes.py`` against the real packages, where one is installed.

CI has none of them (they need CUDA to run), so these skip there; they run where a package is
installed: the GPU machine (``benchmarks/gpu_check.py`` carries xformers) or a
``bash .ci/compat`` environment with ``pip install xformers``. What they check needs no GPU: the
signatures the adapters call, and the rules each adapter relies on that the package applies
before it picks a kernel.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import torch

from attnswap.backends import get_backend
from attnswap.backends.xformers import aligned_bias

import fakes


def _real(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not installed, or a binary built for another torch
        pytest.skip(f"{module} not importable here: {type(exc).__name__}: {exc}")


def _parameters(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "module, function, make_fake",
    [
        ("xformers.ops", "memory_efficient_attention", fakes.xformers_ops),
        ("flash_attn", "flash_attn_func", fakes.flash_attn_2),
        ("flash_attn_interface", "flash_attn_func", fakes.flash_attn_3),
        ("flash_attn.cute", "flash_attn_func", fakes.flash_attn_4),
        ("sageattention", "sageattn", fakes.sageattention),
    ],
)
def test_signature_is_the_fakes(module, function, make_fake):
    real = getattr(_real(module), function)
    fake = getattr(make_fake(fakes.Recorder()), function)
    assert _parameters(real) == _parameters(fake)


@pytest.mark.parametrize(
    "module, make_fake",
    [("flash_attn", fakes.flash_attn_2), ("flash_attn_interface", fakes.flash_attn_3), ("flash_attn.cute", fakes.flash_attn_4)],
)
def test_varlen_signature_is_the_fakes(module, make_fake):
    real = _real(module).flash_attn_varlen_func
    assert _parameters(real) == _parameters(make_fake(fakes.Recorder()).flash_attn_varlen_func)


def test_xformers_block_diagonal_mask_is_the_fakes():
    xops = _real("xformers.ops")
    real = xops.fmha.BlockDiagonalMask
    assert _parameters(real.from_seqlens) == _parameters(fakes.BlockDiagonalMask.from_seqlens)
    q_lengths, k_lengths = [3, 1, 4], [5, 2, 4]
    mask = real.from_seqlens(q_lengths, k_lengths, device=torch.device("cpu"))
    fake = fakes.BlockDiagonalMask.from_seqlens(q_lengths, k_lengths, device=torch.device("cpu"))
    assert torch.equal(mask.materialize((8, 11)), fake.materialize((8, 11)))


def test_xformers_causal_mask_is_top_left_like_sdpa():
    # the adapter maps is_causal to LowerTriangularMask; SDPA's causal is top-left for q_len != kv_len
    xops = _real("xformers.ops")
    for q_len, kv_len in ((3, 5), (5, 3), (4, 4)):
        allowed = xops.LowerTriangularMask().materialize((q_len, kv_len)) == 0
        assert torch.equal(allowed, torch.ones(q_len, kv_len, dtype=torch.bool).tril()), (q_len, kv_len)


def _bias_reasons(q, k, v, bias) -> list[str]:
    """What xformers' cutlass operator says against this bias (its other reasons are about the CPU)."""
    from xformers.ops.fmha import cutlass
    from xformers.ops.fmha.common import Inputs

    inputs = Inputs(query=q, key=k, value=v, attn_bias=bias)
    inputs.validate_inputs()  # raises ValueError on a wrong bias shape or dtype
    return [r for r in cutlass.FwOp.not_supported_reasons(inputs) if "attn_bias" in r]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "mask_shape, mask_dtype",
    [
        ((197, 197), None),  # timm's ViT length: not a multiple of the alignment
        ((3, 197, 197), None),  # per head
        ((2, 1, 197, 197), None),  # per batch, broadcast over heads
        ((197, 197), torch.bool),
        ((2, 3, 197, 1), torch.bool),  # padding-style
    ],
)
def test_xformers_accepts_the_adapters_bias(dtype, mask_shape, mask_dtype):
    _real("xformers.ops")
    b, h, n, d = 2, 3, 197, 16
    q, k, v = (torch.randn(b, n, h, d, dtype=dtype) for _ in range(3))
    if mask_dtype is torch.bool:
        mask = torch.rand(mask_shape) > 0.2
    else:
        mask = torch.randn(mask_shape, dtype=dtype)
    bias = aligned_bias(mask, (b, h, n, n), dtype)
    assert _bias_reasons(q, k, v, bias) == []
    # and the check can fail: the bias as SDPA takes it, contiguous at 197, is refused
    if mask_dtype is None and mask.dim() == 2:
        plain = mask.expand(b, h, n, n).contiguous()
        assert any("attn_bias.stride" in r for r in _bias_reasons(q, k, v, plain))


def test_xformers_adapter_reports_an_extension_that_did_not_load():
    # xformers wheels are built for one torch; with another, the extension does not load and
    # every CUDA operator lists "xFormers wasn't build with CUDA support" (fmha/common.py)
    _real("xformers.ops")
    top = sys.modules["xformers"]
    reason = get_backend("xformers").unavailable_reason
    if getattr(top, "_has_cpp_library", True) is False:
        assert reason is not None and "compiled extension did not load" in reason
    else:
        assert reason is None or "compiled extension" not in reason
