"""Issue 16: inductor's CPU flex kernel computes wrong values (or NaN) for head dims 8 and 16
with kv lengths of 8 mod 16 on CPUs with 8-float vectors (AVX2). attnswap declares that region
as a limit of its flex backend, so those calls are refused with the reason and fall back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnswap
from attnswap.backends import eager_attention, get_backend
from attnswap.backends import flex as flex_module
from attnswap.backends.flex import cpu_kernel_miscomputes
from attnswap.call import facts_of
from attnswap.routing import Policy, Router
from versions import FLEX_ON_CPU, needs_flex_on_cpu

SWEEP = Path(__file__).with_name("flex_kernel_sweep.py")


def test_the_rule_is_the_tail_of_a_16_key_tile_on_narrow_vectors():
    # AVX2 (8 floats): head dims 8 and 16, kv tails of 8
    bad = {(e, s) for e in range(1, 65) for s in range(1, 200) if cpu_kernel_miscomputes(e, s, 8)}
    assert bad == {(e, s) for e in (8, 16) for s in range(1, 200) if s % 16 == 8}
    # NEON (4 floats): head dims 4..20 in steps of 4, tails 4, 8, 12
    assert cpu_kernel_miscomputes(12, 36, 4) and cpu_kernel_miscomputes(20, 4, 4)
    assert not cpu_kernel_miscomputes(24, 8, 4) and not cpu_kernel_miscomputes(12, 32, 4)
    # AVX-512 (16 floats): never
    assert not any(cpu_kernel_miscomputes(e, s, 16) for e in range(1, 65) for s in range(1, 200))


def _reasons(monkeypatch, isa, head_dim, kv_len, q_len=5):
    monkeypatch.setattr(flex_module, "cpu_vector_isa", lambda: isa)
    q = torch.zeros(1, 2, q_len, head_dim)
    k = torch.zeros(1, 2, kv_len, head_dim)
    return get_backend("flex").reasons(facts_of(q, k, k))[0]


@needs_flex_on_cpu
def test_flex_refuses_exactly_that_region_with_the_reason(monkeypatch):
    reasons = _reasons(monkeypatch, ("avx2", 8), 16, 40)
    assert len(reasons) == 1 and "computes wrong scores" in reasons[0] and "avx2" in reasons[0], reasons
    assert _reasons(monkeypatch, ("avx2", 8), 16, 41) == []
    assert _reasons(monkeypatch, ("avx2", 8), 32, 40) == []
    assert _reasons(monkeypatch, ("avx512", 16), 16, 40) == []
    # an instruction set that cannot be asked: judged as if it were narrow (4 or 8 floats)
    assert _reasons(monkeypatch, None, 12, 36) and _reasons(monkeypatch, None, 16, 24)
    assert _reasons(monkeypatch, None, 16, 41) == []
    no_simd = _reasons(monkeypatch, ("none", 0), 64, 64)
    assert len(no_simd) == 1 and "no SIMD" in no_simd[0]


@needs_flex_on_cpu
def test_a_refused_call_falls_back_and_strict_says_why(monkeypatch):
    monkeypatch.setattr(flex_module, "cpu_vector_isa", lambda: ("avx2", 8))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (17, 40, 40))
    with pytest.raises(attnswap.UnsupportedCall) as info:
        Router(Policy("flex", (), strict=True)).route(q, k, v)
    assert any("computes wrong scores" in r for r in info.value.reasons["flex"])
    router = Router(Policy("flex", ("sdpa",)))
    with torch.no_grad():
        out = router.route(q, k, v)
    assert [(t.backend, t.is_fallback) for t in router.tallies()] == [("sdpa", True)]
    torch.testing.assert_close(out.double(), eager_attention(q.double(), k.double(), v.double()), atol=1e-5, rtol=1e-5)


def _isas() -> list[str]:
    """The instruction sets to sweep: this CPU's own, and AVX2 on an AVX-512 CPU (x86 only)."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    out = ["native"]
    if native.startswith("avx512"):
        out.append("avx2")
    return out


@pytest.mark.slow
@pytest.mark.skipif(not FLEX_ON_CPU, reason="flex_attention on CPU needs torch >= 2.6")
@pytest.mark.parametrize("isa", _isas())
def test_every_wrong_answer_of_the_cpu_kernel_is_refused(isa, tmp_path):
    """Sweeps the kernel itself (dynamic shapes: ~1,800 calls, one compile per head dim) and
    checks that attnswap refuses every call it gets wrong. A new torch whose kernel is wrong
    somewhere else fails here, with the cases."""
    # A cache of its own: inductor's cache key leaves out ATEN_CPU_CAPABILITY, so a kernel built
    # for AVX2 would be loaded by the AVX-512 run (and compute garbage there)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    if isa != "native":
        env["ATEN_CPU_CAPABILITY"] = isa
    env["PYTHONPATH"] = os.pathsep.join([str(Path(attnswap.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(SWEEP)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["checked"] > 1000
    unrefused = [case for case in result["wrong"] if not case["attnswap_refuses"]]
    assert not unrefused, f"{result['isa']}: the CPU flex kernel is wrong where attnswap does not refuse: {unrefused}"
    if result["lanes"] >= 16:
        assert not result["wrong"], "wrong answers on 16-float vectors: the declared rule says none"
