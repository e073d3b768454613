"""backend="auto": checked first, then timed on the call's own inputs; fastest wins, per
signature, once per process; decisions persist to a JSON file keyed by environment."""

import json
import time

import pytest
import torch
import torch.nn.functional as F

import attnswap
from attnswap.auto import TUNER
from attnswap.routing import Policy, Router
from conftest import rand


@pytest.fixture(autouse=True)
def fresh_tuner():
    TUNER.forget()
    yield
    TUNER.forget()


@pytest.fixture
def contenders(registered):
    """Three exact backends: one slow, one fast but wrong, one fast and right; calls counted."""
    counts = {"slow": 0, "wrong": 0, "fast": 0}

    def slow(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        counts["slow"] += 1
        time.sleep(0.02)  # far slower than anything a loaded CPU does to the fast one
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    def wrong(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        counts["wrong"] += 1
        return v[..., : q.shape[-2], :] * 1.0  # fast, and not attention

    def fast(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        counts["fast"] += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    for name, fn in (("slow", slow), ("wrong", wrong), ("fast", fast)):
        registered(name, fn)
    return counts


NAMES = ("slow", "wrong", "fast")


def test_the_fastest_backend_within_tolerance_is_chosen(contenders):
    router = Router(Policy("auto", candidates=NAMES), site="a")
    q = rand(2, 2, 8, 16, dtype=torch.float32)
    out = router(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    (tally,) = router.tallies()
    assert tally.backend == "fast" and not tally.is_fallback
    (row,) = attnswap.auto_decisions()
    assert row.chosen == "fast" and set(row.times_ms) == {"slow", "fast"}
    assert row.times_ms["slow"] > row.times_ms["fast"]
    assert row.rejected["wrong"].startswith("error ") and "> tolerance 1e-04" in row.rejected["wrong"]
    assert router.tuning_seconds > 0


def test_a_signature_is_tuned_once_for_every_site(contenders):
    first, second = Router(Policy("auto", candidates=NAMES), site="a"), Router(Policy("auto", candidates=NAMES), site="b")
    q = rand(1, 2, 8, 16, dtype=torch.float32)
    first(q, q, q)
    tuned = dict(contenders)
    for _ in range(3):
        second(q, q, q)
    assert contenders["slow"] == tuned["slow"] and contenders["fast"] == tuned["fast"] + 3
    assert second.tuning_seconds == 0 and first.tuning_seconds > 0
    first(rand(1, 2, 9, 16, dtype=torch.float32), q, q)  # a new signature is tuned again
    assert contenders["slow"] > tuned["slow"]


def test_training_calls_are_timed_forward_and_backward_without_touching_caller_grads(contenders):
    router = Router(Policy("auto", candidates=("slow", "fast")))
    q = rand(1, 2, 8, 16, dtype=torch.float32).requires_grad_()
    out = router(q, q, q)
    assert q.grad is None
    out.sum().backward()
    torch.testing.assert_close(q.grad, torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q)[0])


def test_a_backend_that_fails_is_rejected_with_its_error(registered, contenders):
    def broken(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        raise RuntimeError("kernel exploded")

    registered("broken", broken)
    router = Router(Policy("auto", candidates=("broken", "fast")))
    q = rand(1, 1, 4, 8, dtype=torch.float32)
    router(q, q, q)
    (row,) = attnswap.auto_decisions()
    assert row.chosen == "fast" and "kernel exploded" in row.rejected["broken"]


def test_decisions_persist_to_a_file_and_the_next_process_starts_tuned(contenders, tmp_path):
    path = tmp_path / "tuned.json"
    model = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        attnswap.patch(model, backend="auto", candidates=NAMES, auto_cache=path)
        model(x, x, x, need_weights=False)
    data = json.loads(path.read_text())
    (entry,) = data["entries"]
    assert entry["backend"] == "fast" and entry["environment"]["torch"] == torch.__version__
    assert entry["candidates"] == list(NAMES)

    TUNER.forget()  # as a new process
    before = dict(contenders)
    with torch.no_grad():
        attnswap.patch(model, backend="auto", candidates=NAMES, auto_cache=path)
        model(x, x, x, need_weights=False)
    assert contenders == {**before, "fast": before["fast"] + 1}, "no timing: the file's decision was used"
    (row,) = attnswap.auto_decisions()
    assert row.from_file and row.chosen == "fast"
    assert attnswap.stats(model).tuning_seconds == 0


def test_a_file_from_another_environment_is_kept_but_never_used(contenders, tmp_path):
    path = tmp_path / "tuned.json"
    router = Router(Policy("auto", candidates=NAMES))
    q = rand(1, 2, 8, 16, dtype=torch.float32)
    TUNER.use_file(path)
    router(q, q, q)
    data = json.loads(path.read_text())
    data["entries"][0]["environment"]["device"] = "some other machine"
    data["entries"][0]["backend"] = "slow"
    path.write_text(json.dumps(data))
    TUNER.forget()
    assert TUNER.use_file(path) == 1
    fresh = Router(Policy("auto", candidates=NAMES))
    fresh(q, q, q)
    assert [t.backend for t in fresh.tallies()] == ["fast"] and fresh.tuning_seconds > 0
    saved = json.loads(path.read_text())["entries"]
    assert {e["environment"]["device"] for e in saved} >= {"some other machine"}


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text("{not json")
    with pytest.raises(attnswap.AttnSwapError, match="cannot read the auto-tuning file"):
        attnswap.patch(torch.nn.MultiheadAttention(8, 2), backend="auto", auto_cache=path)


def test_auto_with_every_backend_on_a_timm_model_matches_and_reports(sdpa_counter):
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        attnswap.patch(model, backend="auto", candidates=("sdpa", "sdpa_math", "eager"))
        out = model.forward_features(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    stats = attnswap.stats(model)
    assert stats.total_calls == 2 and stats.fallback_calls == 0 and stats[0].backend == "auto"
    assert "auto tuning took" in str(stats)
    (row,) = attnswap.auto_decisions()
    assert set(row.times_ms) == {"sdpa", "sdpa_math", "eager"} and row.chosen in row.times_ms


@pytest.mark.slow
def test_inside_torch_compile_nothing_is_timed(contenders):
    q = rand(1, 2, 8, 16, dtype=torch.float32)
    untuned = Router(Policy("auto", candidates=NAMES))
    torch.compile(lambda a: untuned(a, a, a), backend="eager", fullgraph=True)(q)
    (tally,) = untuned.tallies()
    assert tally.backend == "sdpa" and tally.traced == 1 and dict(tally.tried)["auto"][0].startswith("not tuned")
    assert contenders == {"slow": 0, "wrong": 0, "fast": 0}

    tuned = Router(Policy("auto", candidates=NAMES))
    tuned(q, q, q)  # eager warm-up tunes
    counts = dict(contenders)
    torch._dynamo.reset()
    torch.compile(lambda a: tuned(a, a, a), backend="eager", fullgraph=True)(q)
    assert [(t.backend, t.traced) for t in tuned.tallies() if t.traced] == [("fast", 1)]
    assert contenders["slow"] == counts["slow"], "no timing while tracing"
