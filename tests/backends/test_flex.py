"""flex: compiled flex_attention with bias as score_mod and masks as BlockMask (CPU)."""

import pytest
import torch
import torch._dynamo.utils

import attnswap
from attnswap.backends import eager_attention, get_backend
from attnswap.bench import peak_allocated_bytes
from attnswap.routing import Policy, Router
from conftest import rand
from versions import FLEX_ON_CPU, FLEX_ON_CPU_IN_GRAPH, needs_flex_on_cpu


def route(*args, strict=True, **kwargs):
    router = Router(Policy("flex", ("sdpa",), strict), site="test")
    return router, router(*args, **kwargs)


def f32(*shape, seed=0, **kw):
    return rand(*shape, dtype=torch.float32, seed=seed, **kw)


CASES = {
    "plain": lambda: ((f32(2, 3, 40, 16, seed=1), f32(2, 3, 40, 16, seed=2), f32(2, 3, 40, 16, seed=3)), {}),
    "bias broadcast (H,L,S), q_len != kv_len": lambda: (
        (f32(2, 3, 20, 16, seed=1), f32(2, 3, 33, 16, seed=2), f32(2, 3, 33, 16, seed=3)),
        dict(attn_mask=f32(3, 20, 33, seed=4)),
    ),
    "bool padding mask with a fully masked row": lambda: (
        (f32(2, 2, 24, 16, seed=1), f32(2, 2, 24, 16, seed=2), f32(2, 2, 24, 16, seed=3)),
        dict(attn_mask=torch.ones(24, 24, dtype=torch.bool).index_fill_(0, torch.tensor([5]), False)),
    ),
    "causal q_len < kv_len (top-left)": lambda: (
        (f32(1, 2, 10, 16, seed=1), f32(1, 2, 30, 16, seed=2), f32(1, 2, 30, 16, seed=3)), dict(is_causal=True)
    ),
    "gqa, scale, v head dim differs": lambda: (
        (f32(1, 4, 18, 16, seed=1), f32(1, 2, 18, 16, seed=2), f32(1, 2, 18, 32, seed=3)),
        dict(enable_gqa=True, scale=0.2),
    ),
    "5-D with bias": lambda: (
        (f32(1, 2, 3, 16, 8, seed=1), f32(1, 2, 3, 16, 8, seed=2), f32(1, 2, 3, 16, 8, seed=3)),
        dict(attn_mask=f32(3, 16, 16, seed=4)),
    ),
}


@needs_flex_on_cpu
@pytest.mark.parametrize("name", list(CASES))
def test_flex_matches_eager(name):
    (q, k, v), kwargs = CASES[name]()
    with torch.no_grad():
        router, out = route(q, k, v, **kwargs)
        ref = eager_attention(q.double(), k.double(), v.double(),
                              **{n: (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kwargs.items()})
    assert [t.backend for t in router.tallies()] == ["flex"]
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@needs_flex_on_cpu
def test_repeated_calls_do_not_recompile_and_new_bias_values_are_used():
    flex = get_backend("flex")
    q = f32(1, 2, 24, 16, seed=1)
    router = Router(Policy("flex", (), True))
    with torch.no_grad():
        router(q, q, q, attn_mask=f32(2, 24, 24, seed=5))
        cached = flex.compiled_signatures()
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for seed in range(3):
            bias = f32(2, 24, 24, seed=10 + seed)
            out = router(q, q, q, attn_mask=bias)
            torch.testing.assert_close(out, eager_attention(q, q, q, attn_mask=bias), atol=1e-5, rtol=1e-5)
    assert flex.compiled_signatures() == cached
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "same signature must not recompile"


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda q: dict(dropout_p=0.1), "no dropout"),
        (lambda q: dict(query=q.double(), key=q.double(), value=q.double()), "dtype float64"),
        (lambda q: dict(query=q.clone().requires_grad_()), "needs backward"),
    ],
)
def test_flex_refuses_what_it_cannot_do_on_cpu(make, reason):
    q = f32(1, 2, 8, 16)
    kwargs = dict(query=q, key=q, value=q)
    kwargs.update(make(q))
    with pytest.raises(attnswap.UnsupportedCall) as info:
        route(**kwargs)
    assert any(reason in r for r in info.value.reasons["flex"]), info.value.reasons
    router, out = route(strict=False, **kwargs)
    assert [t.backend for t in router.tallies()] == ["sdpa"]


@needs_flex_on_cpu
def test_flex_refuses_masks_inside_compiled_cpu_graphs_and_missing_compiler(monkeypatch):
    import dataclasses

    from attnswap.backends import flex as flex_module
    from attnswap.call import facts_of

    q = f32(1, 2, 8, 16)
    facts = facts_of(q, q, q, f32(2, 8, 8))
    flex = get_backend("flex")
    assert flex.reasons(facts)[0] == []
    in_graph = flex.reasons(dataclasses.replace(facts, in_graph=True))[0]
    assert any("inside a torch.compile graph on CPU" in r for r in in_graph)
    causal_in_graph = flex.reasons(dataclasses.replace(facts_of(q, q, q, None, 0.0, True), in_graph=True))[0]
    if FLEX_ON_CPU_IN_GRAPH:
        assert causal_in_graph == [], "causal and unmasked calls stay on flex inside a graph"
    else:
        assert len(causal_in_graph) == 1 and "share a buffer" in causal_in_graph[0]
    monkeypatch.setattr(flex_module, "_cpp_compiler", lambda: None)
    assert any("no C++ compiler" in r for r in flex.reasons(facts)[0])


def test_flex_on_cpu_refused_before_torch_2_6_with_the_version():
    from attnswap.call import facts_of

    q = f32(1, 2, 8, 16)
    reasons = get_backend("flex").reasons(facts_of(q, q, q))[0]
    version_reasons = [r for r in reasons if "needs torch >= 2.6" in r]
    assert bool(version_reasons) is not FLEX_ON_CPU, reasons


@needs_flex_on_cpu
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "bias"])
def test_flex_scratch_is_not_sequence_squared(biased):
    """Issue 13: without a BlockMask inductor's CPU kernel sizes its scratch to the whole
    sequence (2 x threads x N^2 floats: 64 MB here at N=2048 on 2 threads); with the full
    128-block mask every call now gets, a flex call's peak is close to SDPA's."""
    n = 2048
    q, k, v = f32(1, 1, n, 64, seed=1), f32(1, 1, n, 64, seed=2), f32(1, 1, n, 64, seed=3)
    bias = f32(1, 1, 1, n, seed=4) if biased else None  # broadcast: the bias itself is small
    router = Router(Policy("flex", (), True))
    with torch.no_grad():
        out = router(q, k, v, attn_mask=bias)  # compiles
        torch.testing.assert_close(out, eager_attention(q, k, v, attn_mask=bias), atol=2e-5, rtol=2e-5)
        flex_peak = peak_allocated_bytes(lambda: router(q, k, v, attn_mask=bias))
        sdpa_peak = peak_allocated_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    n_squared = n * n * 4
    assert flex_peak < 2 * sdpa_peak + n_squared // 8, (flex_peak, sdpa_peak)


def test_full_block_mask_covers_every_block_of_uneven_lengths():
    from attnswap.backends.flex import BLOCK, full_block_mask

    get_backend("flex").unavailable_reason  # probes this torch
    mask = full_block_mask(300, 129, torch.device("cpu"))
    if mask is None:
        pytest.skip("this torch's BlockMask.from_kv_blocks takes no seq_lengths")
    assert mask.BLOCK_SIZE == (BLOCK, BLOCK) and mask.seq_lengths == (300, 129)
    dense = mask.to_dense()
    assert dense.shape[-2:] == (3, 2) and bool(dense.all())
