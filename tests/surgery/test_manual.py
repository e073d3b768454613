"""Hand-written attention: which products are deferred, the symbolic scores' algebra (every
form must equal the module's own computation, or settle to exactly it), and liveness."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnswap
from attnswap.backends import eager_attention


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


class Manual(nn.Module):
    def __init__(self, body=None, p=0.0):
        super().__init__()
        self.attn_drop = nn.Dropout(p)
        self.softmax = nn.Softmax(dim=-1)


def make(forward):
    """A module class whose ``forward(self, q, k, v, extra)`` is hand-written attention code."""
    return type("M", (Manual,), {"forward": forward})


def run_both(module_cls, *args, p=0.0, train=False, backend="eager"):
    m = module_cls(None, p=p).train(train)
    ref = m(*args)
    attnswap.patch(m, backend=backend)
    out = m(*args)
    return ref, out, attnswap.stats(m)


def _scaled_bias(self, q, k, v, bias):
    attn = q @ k.transpose(-2, -1)
    attn = attn * 0.125 + bias
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    return attn @ v


def _per_head_scale_then_bias(self, q, k, v, bias):
    attn = q @ k.transpose(-2, -1)
    attn = attn * torch.exp(bias[0, :, :1, :1])  # (H, 1, 1) per-head factor, like Swin v2
    attn = bias + attn
    return self.softmax(attn) @ v


def _view_mask(self, q, k, v, mask):  # Swin's shift mask added in a 5-D view
    attn = q @ k.transpose(-2, -1)
    nw = mask.shape[0]
    b, h, n, _ = attn.shape
    attn = attn.view(-1, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, h, n, n)
    return F.softmax(attn, dim=-1) @ v


def _transposed(self, q, k, v, extra):  # v @ attnᵀ (LeViT conv mode)
    attn = q @ k.transpose(-2, -1)
    attn = (attn / 3.0).softmax(-1)
    return (v.transpose(-2, -1) @ attn.transpose(-2, -1)).transpose(-2, -1)


def _gated_mix(self, q, k, v, pos):  # ConViT GPSA
    attn = q @ k.transpose(-2, -1)
    g = torch.sigmoid(pos[:1, :, :1, :1])
    attn = (1.0 - g) * attn.softmax(dim=-1) + g * pos.softmax(dim=-1)
    attn /= attn.sum(dim=-1).unsqueeze(-1)
    return self.attn_drop(attn) @ v


CASES = {
    "scale+bias": (_scaled_bias, lambda: rand(1, 4, 6, 6)),
    "per-head scale folded into q": (_per_head_scale_then_bias, lambda: rand(1, 4, 6, 6)),
    "mask added in a view": (_view_mask, lambda: rand(3, 6, 6)),
    "transposed product": (_transposed, lambda: None),
    "gated mix (GPSA)": (_gated_mix, lambda: rand(1, 4, 6, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_symbolic_forms_equal_the_modules_own_math(case):
    finish, extra = CASES[case]
    q, k, v = rand(6, 4, 6, 8), rand(6, 4, 6, 8), rand(6, 4, 6, 5)
    ref, out, s = run_both(make(finish), q, k, v, extra())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert s.total_calls >= 1 and s.unrouted_calls == 0, str(s)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.calls.append(dict(q=q, k=k, v=v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale))
        return eager_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def test_router_receives_the_attention_it_expresses(registered):
    rec = Recorder()
    registered("rec", rec)
    q, k, v, bias = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5), rand(1, 4, 6, 6)
    m = make(_scaled_bias)(None)
    attnswap.patch(m, backend="rec")
    m(q, k, v, bias)
    (call,) = rec.calls
    assert call["scale"] == 0.125 and call["dropout_p"] == 0.0
    assert call["q"] is q and torch.equal(call["k"], k) and call["v"] is v
    torch.testing.assert_close(call["attn_mask"], bias * 0.125 / 0.125)  # added after the scale: unscaled


def test_dropout_follows_the_modules_own_flag_and_p_at_call_time(registered):
    rec = Recorder()
    registered("rec", rec)
    q, k, v, bias = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5), rand(1, 4, 6, 6)
    m = make(_scaled_bias)(None, p=0.25)
    attnswap.patch(m, backend="rec")
    m.train()
    m(q, k, v, bias)
    m.eval()
    m(q, k, v, bias)
    m.attn_drop.p = 0.5
    m.train()
    m(q, k, v, bias)
    assert [c["dropout_p"] for c in rec.calls] == [0.25, 0.0, 0.5]


def test_what_the_algebra_cannot_follow_settles_to_the_exact_original():
    def talking_heads(self, q, k, v, w):
        attn = q @ k.transpose(-2, -1)
        attn = attn.roll(1, dims=1) * w  # heads mixed: not one attention call
        return attn.softmax(dim=-1) @ v

    q, k, v, w = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5), rand(4, 1, 1)
    ref, out, s = run_both(make(talking_heads), q, k, v, w)
    assert torch.equal(out, ref)  # replayed bit for bit
    assert s.unrouted_calls == 1 and s.total_calls == 0
    assert "roll" in next(iter(s[0].unrouted))


def test_in_place_write_settles_and_stays_exact():
    def masked_fill(self, q, k, v, mask):
        attn = q @ k.transpose(-2, -1)
        attn = attn * 0.5
        attn[..., 0] = -1e4  # written in place
        return attn.softmax(-1) @ v

    q, k, v = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5)
    ref, out, s = run_both(make(masked_fill), q, k, v, None)
    assert torch.equal(out, ref) and s.unrouted_calls == 1


def test_forward_never_returns_symbolic_scores():
    class ReturnsScores(nn.Module):
        def forward(self, q, k):
            attn = q @ k.transpose(-2, -1)
            _ = attn.softmax(-1)
            return attn * 2.0

    q, k = rand(2, 3, 4), rand(2, 3, 4)
    m = ReturnsScores()
    ref = m(q, k)
    attnswap.patch(m)
    out = m(q, k)
    assert type(out) is torch.Tensor and torch.equal(out, ref)


def test_unrelated_products_and_non_float_products_are_untouched():
    class Mixed(nn.Module):
        def forward(self, x, w, idx):
            h = x @ w  # not attention: its result never meets a softmax
            attn = (h @ h.transpose(-2, -1)).softmax(-1)
            return attn @ h, idx @ idx

    m = Mixed()
    x, w, idx = rand(2, 5, 4), rand(4, 4), torch.arange(4).view(2, 2)
    ref = m(x, w, idx)
    report = attnswap.patch(m)
    assert report.patched[0].products == 1  # only the product that feeds the softmax
    out = m(x, w, idx)
    torch.testing.assert_close(out[0], ref[0])
    assert torch.equal(out[1], ref[1])
    assert attnswap.stats(m).total_calls == 1


def test_gradients_flow_through_routed_hand_written_attention():
    q, k, v = rand(2, 4, 6, 8).requires_grad_(), rand(2, 4, 6, 8).requires_grad_(), rand(2, 4, 6, 5).requires_grad_()
    bias = rand(1, 4, 6, 6).requires_grad_()
    m = make(_per_head_scale_then_bias)(None)
    ref = m(q, k, v, bias).sum()
    ref_grads = torch.autograd.grad(ref, (q, k, v, bias))
    attnswap.patch(m, backend="eager")
    out = m(q, k, v, bias).sum()
    grads = torch.autograd.grad(out, (q, k, v, bias))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("viewed,base,bias,expected", [
    ((2, 3, 4, 5, 5), (6, 4, 5, 5), (1, 3, 1, 5, 5), (6, 1, 5, 5)),
    ((1, 3, 4, 5, 5), (3, 4, 5, 5), (3, 1, 5, 5), (3, 1, 5, 5)),
    ((2, 3, 4, 5, 5), (6, 4, 5, 5), (5,), (1, 1, 1, 5)),
])
def test_unview_bias_keeps_broadcast_dims(viewed, base, bias, expected):
    from attnswap.surgery.scores import _unview_bias

    b = torch.randn(*bias)
    out = _unview_bias(b, viewed, base)
    assert tuple(out.shape) == expected
    full = torch.zeros(viewed) + b
    torch.testing.assert_close(torch.zeros(base) + out, full.reshape(base))


def test_swin_v2_set_input_size_after_patching_stays_routed_and_exact():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "swinv2_tiny_window8_256", pretrained=False, img_size=64, window_size=4, embed_dim=32,
        depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8),
    ).eval()
    attnswap.patch(model, backend="eager")
    model.set_input_size(img_size=(96, 96), window_size=6)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = model.forward_features(x)
        s = attnswap.stats(model)
        attnswap.unpatch(model)
        ref = model.forward_features(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5
    assert s.total_calls > 0 and s.unrouted_calls == 0


def test_train_eval_switch_after_patching_levit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    attnswap.patch(model, backend="eager")
    for mode in (True, False, True, False):
        model.train(mode)
        out = model.forward_features(x)
        with attnswap.patched(model, backend="sdpa_math"):
            pass
        attnswap.unpatch(model)
        ref = model.forward_features(x)
        attnswap.patch(model, backend="eager")
        assert (out - ref).abs().max() / ref.abs().max() < 1e-5, mode  # train mode: LeViT's bias cache bypassed
    assert attnswap.stats(model).unrouted_calls == 0


def test_left_alone_classes_are_reported_with_reasons_and_untouched():
    import timm

    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=64, depth=2)
    report = attnswap.patch(model)
    talking = [s for s in report.sites if s.cls.endswith("TalkingHeadAttn")]
    assert talking and all(s.status == "not routed" and "talking-head" in s.reason for s in talking)
    assert all(not attnswap.is_patched(model.get_submodule(s.path)) for s in talking)


def test_softmax_that_is_not_attention_is_never_touched():
    import timm

    model = timm.create_model("coat_lite_tiny", pretrained=False)
    report = attnswap.patch(model)
    assert not report.patched and report.sites and all(s.status == "not attention" for s in report.sites)


def test_einsum_attention_is_followed():
    from timm.layers.attention2d import MultiQueryAttentionV2

    report = attnswap.patch(MultiQueryAttentionV2(16, 16, num_heads=2))
    (site,) = report.sites
    assert site.status == "patched" and site.how == "hand-written"  # (tests/surgery/test_einsum.py)


def test_math_of_scale_is_exact_for_sdpa_default():
    # scale=None in SDPA means 1/sqrt(d); the deferred scores always pass an explicit scale
    q, k, v = rand(1, 2, 3, 16), rand(1, 2, 3, 16), rand(1, 2, 3, 4)
    def default_scale(self, q, k, v, extra=None):
        return ((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(-1) @ v

    ref, out, s = run_both(make(default_scale), q, k, v)
    torch.testing.assert_close(out, ref)
    assert s.total_calls == 1


def _routed_equal(model, x):
    model.eval()
    with torch.no_grad():
        ref = model(x)
        report = attnswap.patch(model, backend="sdpa")
        out = model(x)
    stats = attnswap.stats(model)
    return ref, out, report, stats


def test_non_local_attention_is_routed():
    # B class with no registered model, reachable through create_attn('nl'); scale = C^-0.5
    from timm.layers.non_local_attn import NonLocalAttn

    model = NonLocalAttn(16).double()
    nn.init.normal_(model.norm.weight)  # timm zero-inits it, which would hide the attention output
    ref, out, report, stats = _routed_equal(model, rand(2, 16, 5, 5))
    assert [s.status for s in report.sites] == ["patched"] and report.sites[0].how == "hand-written"
    assert stats.total_calls == 1 and stats.fallback_calls == 0
    torch.testing.assert_close(out, ref)


def test_mvitv2_pool_first_attention_is_rewritten_and_keeps_timms_behaviour():
    # MultiScaleAttentionPoolFirst has no registered model, and in timm 1.0.x its k is never
    # transposed to (B, H, N, d), so its forward cannot run. The rewrite must not hide that:
    # the patched module fails the same way the original does.
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=1, pool_first=True)
    model = MultiScaleVit(cfg, img_size=(64, 64), num_classes=0).double().eval()
    x = rand(1, 3, 64, 64)
    with pytest.raises(RuntimeError) as original:
        model(x)
    report = attnswap.patch(model, backend="sdpa")
    pool_first = [s for s in report.sites if s.cls.endswith("MultiScaleAttentionPoolFirst")]
    assert len(pool_first) == 2 and all(s.status == "patched" and s.how == "hand-written" for s in pool_first)
    with pytest.raises(RuntimeError) as patched:
        model(x)
    assert str(patched.value) == str(original.value)


def test_symbolic_scores_copy_carries_every_slot():
    # copy() spells its slots out for speed: a slot added later must be added there too
    from attnswap.surgery.scores import _ScoresSym

    q = torch.randn(1, 2, 3, 4)
    sym = _ScoresSym(q, q, (1, 2, 3, 3))
    sym.biases.append(q)
    new = sym.copy()
    for name in _ScoresSym.__slots__:
        assert getattr(new, name) == getattr(sym, name) if not isinstance(getattr(sym, name), torch.Tensor) else getattr(new, name) is getattr(sym, name), name
    assert new.biases is not sym.biases and new.viewed_biases is not sym.viewed_biases


def test_helper_discovery_skips_an_empty_closure_cell():
    # a method whose closure variable is not assigned yet must not break the class analysis
    from attnswap.surgery import helpers

    def outer():
        def method(self, x):
            return later(x)  # noqa: F821 - bound after method is made

        cell_fn = method
        return cell_fn
        later = None  # noqa: F841 - never reached: the cell stays empty

    assert helpers.calls_helpers(outer()) is False


def _float32_softmax_cast_back(self, q, k, v, mask):  # transformers' eager functions
    attn = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    attn = F.dropout(attn, p=0.0, training=self.training)
    return torch.matmul(attn, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float32_softmax_cast_back_is_one_routed_call(dtype):
    q, k, v = (rand(2, 4, 6, 8).to(dtype) for _ in range(3))
    mask = rand(1, 1, 6, 6).to(dtype)
    ref, out, s = run_both(make(_float32_softmax_cast_back), q, k, v, mask, backend="sdpa_math")
    assert s.total_calls == 1 and s.unrouted_calls == 0, str(s)
    # bfloat16: what any attention kernel differs from eager code by (P rounded once, not twice)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_a_float32_softmax_of_float64_scores_is_not_routed():
    # the module's own code loses float64 precision there; a float64 kernel would not
    q, k, v = (rand(2, 4, 6, 8) for _ in range(3))
    ref, out, s = run_both(make(_float32_softmax_cast_back), q, k, v, rand(1, 1, 6, 6), backend="sdpa_math")
    assert torch.equal(out, ref)
    assert s.total_calls == 0 and "softmax over another dim or dtype" in next(iter(s[0].unrouted))


def test_a_float32_softmax_not_cast_back_settles_exactly():
    def kept_in_float32(self, q, k, v, mask):
        attn = F.softmax(q @ k.transpose(-2, -1), dim=-1, dtype=torch.float32)
        return attn.to(torch.float16).float() @ v.float()  # another dtype than the scores': not one attention call

    q, k, v = (rand(1, 2, 5, 4).to(torch.bfloat16) for _ in range(3))
    ref, out, s = run_both(make(kept_in_float32), q, k, v, None)
    assert torch.equal(out, ref)
    assert s.total_calls == 0 and s.unrouted_calls == 1
    assert "another dtype" in next(iter(s[0].unrouted))


def test_scores_passed_inside_a_list_settle_and_are_counted():
    def sinks(self, q, k, v, sink):  # gpt-oss: a per-head logit concatenated to the scores
        attn = q @ k.transpose(-2, -1)
        logits = torch.cat([attn, sink.expand(*attn.shape[:-1], 1)], dim=-1)
        return logits.softmax(dim=-1)[..., :-1] @ v

    q, k, v, sink = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5), rand(1, 4, 1, 1)
    ref, out, s = run_both(make(sinks), q, k, v, sink)
    assert torch.equal(out, ref)
    assert s.unrouted_calls == 1 and "scores passed to cat" in next(iter(s[0].unrouted))


def _returns_weights(self, q, k, v, output_attentions=False):
    attn = (q @ k.transpose(-2, -1) * 0.25).softmax(dim=-1)
    return attn @ v, attn


@pytest.fixture
def weights_convention():
    from attnswap.surgery import manual

    captured = []
    manual.RETURNED_WEIGHTS[__name__] = ("output_attentions", lambda: bool(captured))
    yield captured
    del manual.RETURNED_WEIGHTS[__name__]


def test_returned_weights_follow_the_librarys_convention(weights_convention):
    cls = type("ReturnsWeights", (Manual,), {"forward": _returns_weights, "__module__": __name__})
    q, k, v = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5)
    m = cls(None)
    ref_out, ref_attn = m(q, k, v)
    attnswap.patch(m, backend="eager")
    out, attn = m(q, k, v)  # not asked for, not captured: not computed
    assert attn is None and attnswap.stats(m).unrouted_calls == 0
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    out, attn = m(q, k, v, output_attentions=True)  # asked for: the module's own code computes them, counted
    assert torch.equal(attn, ref_attn) and attnswap.stats(m).unrouted_calls == 1
    weights_convention.append(True)  # captured by the library
    assert torch.equal(m(q, k, v)[1], ref_attn) and attnswap.stats(m).unrouted_calls == 2


def test_without_a_convention_returned_weights_are_computed():
    m = make(_returns_weights)(None)
    q, k, v = rand(2, 4, 6, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 5)
    ref = m(q, k, v)[1]
    attnswap.patch(m, backend="eager")
    assert torch.equal(m(q, k, v)[1], ref) and attnswap.stats(m).unrouted_calls == 1


def _t5_style(self, q, k, v, bias):  # softmax(scores.float()).type_as(scores), then .type(v.dtype)
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += bias
    attn = F.softmax(scores.float(), dim=-1).type_as(scores)
    attn = F.dropout(attn, p=0.0, training=self.training).type(v.dtype)
    return torch.matmul(attn, v)


def test_t5_style_casts_of_float32_scores_are_one_routed_call():
    q, k, v = (rand(2, 4, 6, 8, dtype=torch.float32) for _ in range(3))
    ref, out, s = run_both(make(_t5_style), q, k, v, rand(1, 4, 6, 6, dtype=torch.float32), backend="sdpa_math")
    assert s.total_calls == 1 and s.unrouted_calls == 0, str(s)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
