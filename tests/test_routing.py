"""The router: per-signature decisions, fallback chains with reasons, strictness, counting."""

import pytest
import torch

import attnswap
from attnswap.backends import eager_attention
from attnswap.routing import Policy, Router
from conftest import rand


def test_decides_once_per_signature_then_reuses(registered):
    checks = []

    def supports(facts):
        checks.append(facts.q_shape)
        return []

    registered("counted", lambda q, k, v, **kw: eager_attention(q, k, v, **kw), supports=supports)
    router = Router(Policy("counted"))
    a, b = rand(1, 2, 4, 8), rand(1, 2, 6, 8)
    for _ in range(5):
        router(a, a, a)
    router(b, b, b)
    router(a, a, a)
    assert checks == [(1, 2, 4, 8), (1, 2, 6, 8)], "supports() runs once per call signature"
    (tally,) = router.tallies()
    assert tally.calls == 7 and not tally.is_fallback


def test_fallback_chain_is_walked_in_order_with_every_reason(registered):
    registered("no_mask", lambda q, k, v, **kw: q, limits=attnswap.Limits(additive_mask=False, bool_mask=False))
    registered("no_bias_f64", lambda q, k, v, **kw: q, limits=attnswap.Limits(dtypes=frozenset({torch.float32})))
    router = Router(Policy("no_mask", ("no_bias_f64", "eager")), site="blocks.0.attn")
    q, bias = rand(1, 2, 4, 8), rand(2, 4, 4)
    out = router(q, q, q, attn_mask=bias)
    torch.testing.assert_close(out, eager_attention(q, q, q, attn_mask=bias))
    (tally,) = router.tallies()
    assert tally.backend == "eager"
    tried = dict(tally.tried)
    assert tried["no_mask"] == ("additive attn_mask (bias) not supported",)
    assert tried["no_bias_f64"] == ("dtype float64 (supported: float32)",)


def test_strict_raises_with_every_reason_and_no_fallback(registered):
    registered("tiny", lambda q, k, v, **kw: q, limits=attnswap.Limits(max_head_dim=4, dropout=False))
    router = Router(Policy("tiny", ("sdpa",), strict=True), site="blocks.3.attn")
    q = rand(1, 2, 4, 8)
    with pytest.raises(attnswap.UnsupportedCall) as info:
        router(q, q, q, dropout_p=0.5)
    err = info.value
    assert err.site == "blocks.3.attn"
    assert err.reasons == {"tiny": ["head_dim 8 > 4", "value head_dim 8 > 4", "dropout_p=0.5 (no dropout support)"]}
    assert "blocks.3.attn" in str(err) and "HINT" in str(err)


def test_exhausted_chain_raises_unsupported_call_naming_all(registered):
    registered("never", lambda q, k, v, **kw: q, supports=lambda f: ["never serves anything"])
    router = Router(Policy("never", ("never",)))
    q = rand(1, 1, 2, 2)
    with pytest.raises(attnswap.UnsupportedCall, match="never serves anything"):
        router(q, q, q)


def test_approximate_backends_are_never_a_fallback(registered):
    registered("approx", lambda q, k, v, **kw: q, exact=False)
    registered("picky", lambda q, k, v, **kw: q, supports=lambda f: ["no"])
    router = Router(Policy("picky", ("approx", "sdpa")))
    q = rand(1, 1, 3, 4)
    router(q, q, q)
    (tally,) = router.tallies()
    assert tally.backend == "sdpa"
    assert dict(tally.tried)["approx"] == ("approximate backends are never used as a fallback",)


def test_invalid_calls_are_rejected_before_any_backend():
    # CPU flash would silently compute garbage for k/v of different lengths: never reach it
    router = Router(Policy("sdpa_flash"), site="x")
    q, k, v = rand(1, 1, 3, 4), rand(1, 1, 5, 4), rand(1, 1, 6, 4)
    with pytest.raises(attnswap.AttnSwapError, match="key and value sequence lengths differ"):
        router(q, k, v)
    with pytest.raises(attnswap.AttnSwapError, match="attn_mask and is_causal"):
        router(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)
    # backends without limits skip the per-signature checks; PyTorch's own validation still runs
    with pytest.raises(RuntimeError):
        Router(Policy("sdpa_math"))(q, k, v)


def test_user_backend_errors_name_site_and_backend(registered):
    def boom(q, k, v, **kw):
        raise ValueError("kernel exploded")

    registered("boom", boom)
    router = Router(Policy("boom"), site="layers.1.attn")
    q = rand(1, 1, 2, 2)
    with pytest.raises(attnswap.AttnSwapError, match=r"backend 'boom' raised at site layers.1.attn: ValueError: kernel exploded"):
        router(q, q, q)


@pytest.mark.parametrize("bad", [lambda q, k, v, **kw: q[..., :1], lambda q, k, v, **kw: q.float(), lambda q, k, v, **kw: None])
def test_user_backend_wrong_result_is_an_error(registered, bad):
    registered("bad", bad)
    router = Router(Policy("bad"), site="s")
    q = rand(1, 1, 2, 4)
    with pytest.raises(attnswap.AttnSwapError, match="backend 'bad' returned"):
        router(q, q, q)


def test_registry_change_invalidates_cached_decisions(registered):
    registered("flip", lambda q, k, v, **kw: q, supports=lambda f: ["no"])
    router = Router(Policy("flip", ("sdpa",)))
    q = rand(1, 1, 2, 2)
    router(q, q, q)
    registered("flip", lambda q, k, v, **kw: eager_attention(q, k, v))
    router(q, q, q)
    assert {t.backend: t.calls for t in router.tallies()} == {"sdpa": 1, "flip": 1}


def test_pickle_keeps_policy_and_counts_not_plans():
    import pickle

    router = Router(Policy("sdpa_math", ("eager",)), site="a", site_class="C")
    q = rand(1, 1, 2, 2)
    router(q, q, q)
    clone = pickle.loads(pickle.dumps(router))
    assert clone.policy == router.policy and clone.site == "a"
    assert [(t.backend, t.calls) for t in clone.tallies()] == [("sdpa_math", 1)]
    clone(q, q, q)
    assert [t.calls for t in clone.tallies()] == [2] and [t.calls for t in router.tallies()] == [1]
