"""nn.MultiheadAttention sites: PyTorch's semantics exactly (masks, layouts, causal hint),
the original path (counted, with the reason) for what the router does not take, exact restore."""

import copy
import pickle

import pytest
import torch
from torch import nn

import attnswap

E, H = 32, 4


def compare(mha, *args, backend="eager", **kwargs):
    mha.eval()
    with torch.no_grad():
        ref = mha(*args, **kwargs)
        attnswap.patch(mha, backend=backend)
        out = mha(*args, **kwargs)
        s = attnswap.stats(mha)
        attnswap.unpatch(mha)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    if ref[1] is None:
        assert out[1] is None
    else:
        torch.testing.assert_close(out[1], ref[1])
    return s


def inputs(batch_first=True, L=7, S=7, B=2):
    torch.manual_seed(0)
    shape_q = (B, L, E) if batch_first else (L, B, E)
    shape_k = (B, S, E) if batch_first else (S, B, E)
    return torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_k)


def padding(B=2, S=7):
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 5:] = True
    return kpm


CASES = {
    "self": dict(),
    "key_padding_mask bool": dict(key_padding_mask=padding()),
    "key_padding_mask float": dict(key_padding_mask=padding().float() * -1e4),
    "attn_mask bool 2-D": dict(attn_mask=torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)),
    "attn_mask float 3-D + padding": dict(attn_mask=torch.randn(2 * H, 7, 7), key_padding_mask=padding().float() * -1e4),
    "causal hint": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(7), is_causal=True),
    "causal hint + padding": dict(
        attn_mask=nn.Transformer.generate_square_subsequent_mask(7), key_padding_mask=padding().float() * -1e4,
        is_causal=True,
    ),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_routed_calls_equal_pytorch(case, batch_first):
    q, k, v = inputs(batch_first)
    x = q
    s = compare(nn.MultiheadAttention(E, H, batch_first=batch_first), x, x, x, need_weights=False, **CASES[case])
    assert s.total_calls == 1 and s.unrouted_calls == 0


def test_cross_attention_with_kdim_vdim_and_no_bias():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=16, vdim=24, bias=False)
    s = compare(mha, torch.randn(3, 2, E), torch.randn(5, 2, 16), torch.randn(5, 2, 24), need_weights=False)
    assert s.total_calls == 1


def test_unbatched_input():
    x = torch.randn(7, E)
    assert compare(nn.MultiheadAttention(E, H), x, x, x, need_weights=False).total_calls == 1


@pytest.mark.parametrize("kwargs,reason", [
    (dict(), "need_weights=True"),
    (dict(need_weights=False, _module=dict(add_bias_kv=True)), "add_bias_kv"),
    (dict(need_weights=False, _module=dict(add_zero_attn=True)), "add_zero_attn"),
])
def test_what_the_router_does_not_take_runs_pytorchs_own_path_counted(kwargs, reason):
    module_kwargs = kwargs.pop("_module", {})
    mha = nn.MultiheadAttention(E, H, batch_first=True, **module_kwargs)
    x = inputs()[0]
    s = compare(mha, x, x, x, **kwargs)
    assert s.total_calls == 0 and s.unrouted_calls == 1
    assert reason in next(iter(s[0].unrouted))


def test_dropout_in_train_mode_reaches_the_router(registered):
    seen = []

    def rec(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append(dropout_p)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale)

    registered("rec", rec)
    mha = nn.MultiheadAttention(E, H, dropout=0.3, batch_first=True)
    attnswap.patch(mha, backend="rec")
    x = inputs()[0]
    mha.train()(x, x, x, need_weights=False)
    mha.eval()(x, x, x, need_weights=False)
    assert seen == [0.3, 0.0]


def test_transformer_encoder_layer_fast_path_is_routed_and_restored():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True).eval()
    x = inputs()[0]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        ref = layer(x, src_key_padding_mask=padding())
        report = attnswap.patch(layer)
        out = layer(x, src_key_padding_mask=padding())
    assert report.patched[0].how == "nn.MultiheadAttention"
    assert attnswap.stats(layer).total_calls == 1  # the fused encoder path did not bypass the site
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    clone = pickle.loads(pickle.dumps(layer))
    deep = copy.deepcopy(layer)
    for m in (layer, clone, deep):
        assert attnswap.unpatch(m) == 1
        assert type(m.self_attn) is nn.MultiheadAttention and not m.self_attn._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_torchvision_vit_is_routed():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        report = attnswap.patch(model, backend="eager")
        out = model(x)
    assert len(report.patched) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attnswap.stats(model).total_calls == 2
