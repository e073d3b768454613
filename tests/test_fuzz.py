"""Issue 16: every CPU backend, fuzzed against float64 eager with 1,000 random calls (float32 and
float64, strict and with fallback): 0 wrong answers. The fuzz itself must catch a wrong kernel."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnswap
from attnswap.fuzz import FuzzReport, check_one, draw_spec, fuzz, make_call
from versions import FLEX_ON_CPU

CPU_BACKENDS = ["sdpa", "sdpa_math", "sdpa_flash", "eager"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_is_never_wrong_in_1000_random_calls(backend):
    report = fuzz(backend, calls=1000, seed=16)
    assert report.calls == 1000
    assert not report.wrong, "\n".join(map(str, report.wrong[:10]))
    assert report.served > 500, report.as_dict()


def test_the_draws_cover_what_real_calls_do():
    rng = random.Random(0)
    specs = [draw_spec(rng, torch.float32) for _ in range(1000)]
    seen = lambda pred: sum(map(pred, specs))  # noqa: E731
    assert seen(lambda s: s.mask == "bool") > 100 and seen(lambda s: s.mask == "additive") > 100
    assert seen(lambda s: s.is_causal) > 100 and seen(lambda s: bool(s.masked_rows)) > 10
    assert seen(lambda s: s.enable_gqa) > 50 and seen(lambda s: s.kv_heads == 1 < s.q_heads and not s.enable_gqa) > 5
    assert seen(lambda s: s.q_len != s.kv_len) > 300 and seen(lambda s: s.head_dim != s.v_head_dim) > 100
    assert seen(lambda s: s.kv_lead != s.lead) > 10 and seen(lambda s: len(s.lead) == 0) > 100
    assert {s.layout for s in specs} == {"contiguous", "heads_last", "fused_qkv", "strided_head_dim"}
    assert seen(lambda s: s.grad) > 100 and seen(lambda s: s.scale is not None) > 200
    assert seen(lambda s: s.head_dim in (8, 16) and s.kv_len % 16 == 8) > 10  # a known kernel bug's region


def test_layouts_are_views_like_a_module_makes_them():
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    fused = next(s for s in (draw_spec(rng, torch.float32) for _ in range(500)) if s.layout == "fused_qkv")
    ref, (q, k, v), _ = make_call(fused, gen)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert not q.is_contiguous() and q.dtype == torch.float32
    torch.testing.assert_close(q.double(), ref[0], atol=1e-6, rtol=1e-6)


def _register(name, fn, **kw):
    attnswap.register_backend(name, fn, **kw)
    return name


def test_the_fuzz_catches_a_kernel_wrong_on_tile_tails_and_one_that_raises():
    def tail_bug(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        return out + 1 if q.size(-1) in (8, 16) and k.size(-2) % 16 == 8 else out

    def crashes(q, k, v, **kwargs):
        if q.size(-2) == 1:
            raise RuntimeError("boom")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    try:
        report = fuzz(_register("fuzz_tail_bug", tail_bug), calls=1000, seed=3)
        assert report.wrong and all("wrong output" in w.what for w in report.wrong)
        assert all(w.spec.head_dim in (8, 16) and w.spec.kv_len % 16 == 8 for w in report.wrong)
        report = fuzz(_register("fuzz_crashes", crashes), calls=400, seed=3)
        assert report.wrong and all("raised" in w.what and "boom" in w.what for w in report.wrong)
    finally:
        attnswap.unregister_backend("fuzz_tail_bug")
        attnswap.unregister_backend("fuzz_crashes")


def test_refusals_are_counted_not_wrong():
    from attnswap import Limits

    def sdpa(q, k, v, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    try:
        name = _register("fuzz_no_masks", sdpa, limits=Limits(additive_mask=False, bool_mask=False))
        report = fuzz(name, calls=200, seed=5, dtypes=(torch.float64,))
        assert not report.wrong and report.refused > 0 and report.fell_back > 0
        assert any("attn_mask" in r for r in report.reasons)
    finally:
        attnswap.unregister_backend("fuzz_no_masks")


def test_a_wrong_gradient_is_caught():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        @staticmethod
        def backward(ctx, g):
            q, k, v = ctx.saved_tensors
            with torch.enable_grad():
                q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
                out = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)
                gq, gk, gv = torch.autograd.grad(out, (q_, k_, v_), g)
            return gq * 2, gk, gv

    def wrong_grad(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return WrongGrad.apply(q, k, v)

    spec = draw_spec(random.Random(0), torch.float64, grad=True)
    spec = type(spec)(**{**spec.__dict__, "mask": "none", "mask_shape": None, "masked_rows": (), "is_causal": False,
                         "scale": None, "enable_gqa": False, "kv_heads": spec.q_heads, "kv_lead": spec.lead,
                         "v_head_dim": spec.head_dim})
    try:
        report = FuzzReport("fuzz_wrong_grad")
        check_one(_register("fuzz_wrong_grad", wrong_grad), spec, torch.Generator().manual_seed(0), strict=True, report=report)
        assert len(report.wrong) == 1 and "gradient of q" in report.wrong[0].what, report.wrong
    finally:
        attnswap.unregister_backend("fuzz_wrong_grad")


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().lower().startswith("avx512"), reason="needs an AVX-512 CPU")
def test_cpu_backends_on_avx2_code_paths_are_never_wrong():
    """PyTorch's CPU kernels dispatch per instruction set: fuzz them again on their AVX2 paths."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(attnswap.__file__).parents[1]), env.get("PYTHONPATH", "")])
    code = (
        "import sys\nfrom attnswap.fuzz import fuzz\nimport torch\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2', torch.backends.cpu.get_cpu_capability()\n"
        f"bad = [w for b in {CPU_BACKENDS!r} for w in fuzz(b, calls=1000, seed=17).wrong]\n"
        "print('\\n'.join(map(str, bad[:10])))\nsys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not FLEX_ON_CPU, reason="flex_attention on CPU needs torch >= 2.6")
def test_flex_is_never_wrong_in_random_calls():
    # each signature compiles (~5 s here), so 12 signatures each get several calls with new values
    # (the kernel's shape rule itself is swept by tests/backends/test_flex_cpu_kernel.py)
    report = fuzz("flex", calls=120, dtypes=(torch.float32,), specs=12, seed=16)
    assert not report.wrong, "\n".join(map(str, report.wrong[:10]))
    assert report.served > 30, report.as_dict()
