"""Key padding (NaFlexViT): the mask travels as the tokens' validity; each sequence of a padded
batch can run on its valid tokens only, every output row (padded ones too) as the masked call
gives it."""

from __future__ import annotations

import copy

import pytest
import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

import attnswap
from attnswap import forms
from attnswap.backends import eager_attention
from attnswap.call import facts_of
from attnswap.models import naflex_batch, ungate
from attnswap.routing import Policy, Router
from attnswap.structure import builders, replacement_for
from attnswap.structure.padding import KeyPadding
from families import assert_same_grads

naflex = pytest.importorskip("timm.models.naflexvit")

create_attention_mask = naflex.create_attention_mask
structured = replacement_for(create_attention_mask)[0]


def qkv(batch, length, heads=3, kv_heads=None, dim=8, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def validity(lengths, length, scattered=False, seed=0):
    valid = torch.zeros(len(lengths), length, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lengths):
        if scattered:
            valid[b, torch.randperm(length, generator=g)[:n]] = True
        else:
            valid[b, :n] = True
    return valid


@pytest.mark.parametrize("prefix", [0, 2])
@pytest.mark.parametrize("symmetric,q_len", [(True, None), (False, None), (False, 1)])
def test_structure_materializes_exactly_timms_mask(prefix, symmetric, q_len):
    valid = validity([9, 4, 0], 9, scattered=True)
    expected = create_attention_mask(valid, prefix, symmetric, q_len, torch.float32)
    got = structured(valid, prefix, symmetric, q_len, torch.float32)
    assert isinstance(got, KeyPadding) and got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got.materialize(), expected)
    assert structured(None) is None and create_attention_mask(None) is None


@pytest.mark.parametrize(
    "lengths,scattered",
    [([12, 5, 1], False), ([12, 12, 12], False), ([7, 3, 10], True), ([6, 0, 12], False)],
    ids=["tail padding", "no padding", "scattered valid tokens", "a sequence without valid tokens"],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "key only"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_per_sequence_equals_the_masked_call_on_every_row_with_gradients(lengths, scattered, symmetric, gqa):
    q, k, v = qkv(len(lengths), 12, heads=4, kv_heads=2 if gqa else 4, requires_grad=True)
    valid = validity(lengths, 12, scattered)
    mask = create_attention_mask(valid, 0, symmetric, None, torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):  # see test_fully_masked_rows_get_softmaxs_gradient
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    torch.testing.assert_close(
        expected, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    )
    router = Router(Policy("sdpa", (), True), site="t")
    padding = structured(valid, 0, symmetric, None, torch.float64)
    out = router.route(q, k, v, attn_mask=padding, enable_gqa=gqa)
    assert router.tallies()[0].structure == ("key_padding", forms.FORM_SEQUENCES)
    assert padding._tensor is None, "the mask is never built"
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_get_softmaxs_gradient():
    """A padded query row of a symmetric mask has every score at finfo.min: SDPA's forward is the
    mean of v, and its gradient is softmax's at the uniform point (PyTorch's math kernel and
    eager). PyTorch's CPU flash kernel returns L times that gradient for such rows (its
    logsumexp, min + log L, rounds to min, so the backward recomputes every weight as 1, not
    1/L): a numerical artifact, not the function's gradient. Per sequence gives the math one."""
    q, k, v = qkv(1, 12, requires_grad=True)
    valid = validity([5], 12)
    mask = create_attention_mask(valid, 0, True, None, torch.float64)
    out = Router(Policy("sdpa", (), True), site="t").route(q, k, v, attn_mask=structured(valid, 0, True, None, torch.float64))
    (grad_q,) = torch.autograd.grad(out[..., 5:, :].sum(), q)
    with sdpa_kernel([SDPBackend.MATH]):
        (math_q,) = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[..., 5:, :].sum(), q)
    (eager_q,) = torch.autograd.grad(eager_attention(q, k, v, attn_mask=mask)[..., 5:, :].sum(), q)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        (flash_q,) = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[..., 5:, :].sum(), q)
    torch.testing.assert_close(grad_q, math_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_q, eager_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flash_q[..., 5:, :], 12 * math_q[..., 5:, :], rtol=1e-10, atol=1e-12)


def test_a_pooling_query_against_padded_keys():
    q, k, v = qkv(3, 12)
    q = q[:, :, :1]  # one latent query, keys masked by validity alone (NaFlexViT's attention pool)
    valid = validity([12, 5, 2], 12)
    mask = create_attention_mask(valid, 0, False, 1, torch.float64)
    router = Router(Policy("sdpa", (), True), site="t")
    out = router.route(q, k, v, attn_mask=structured(valid, 0, False, 1, torch.float64))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_a_kernel_without_mask_support_serves_padded_batches(registered):
    seen = []

    def maskless(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        seen.append(q.shape[-2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)

    registered("maskless", maskless, supports=lambda f: ["no attn_mask"] if f.has_mask else [])
    q, k, v = qkv(3, 12)
    valid = validity([12, 5, 3], 12)
    router = Router(Policy("maskless", (), True), site="t")
    out = router.route(q, k, v, attn_mask=structured(valid, 0, True, None, torch.float64))
    mask = create_attention_mask(valid, 0, True, None, torch.float64)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert seen == [12, 5, 3]
    with pytest.raises(attnswap.UnsupportedCall):  # the same mask as a tensor: refused, as before
        router.route(q, k, v, attn_mask=mask)


def test_flex_and_dropout_get_the_tensor():
    q, k, v = qkv(2, 12, dtype=torch.float32)
    valid = validity([12, 5], 12)
    facts = facts_of(q, k, v, structured(valid, 0, True, None, torch.float32))
    assert facts.structure == ("key_padding", True)
    assert forms.per_sequence_facts(facts).q_shape == (1, 3, 12, 8)
    from attnswap.backends import get_backend

    flex = get_backend("flex")
    assert forms.choose(flex, facts, lambda b, f: b.reasons(f))[2] == forms.FORM_WHOLE, "flex compiles per shape"
    dropout = facts_of(q, k, v, structured(valid, 0, True, None, torch.float32), 0.1)
    assert forms.per_sequence_facts(dropout) is None


def naflex_model(name="naflexvit_base_patch16_gap", dtype=torch.float64):
    torch.manual_seed(0)
    model = ungate(
        __import__("timm").create_model(name, pretrained=False, embed_dim=64, depth=2, num_heads=2)
    ).eval().to(dtype)
    return model, naflex_batch([64, 20, 7], 64, grid_w=8, dtype=dtype)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "eager"])
@pytest.mark.parametrize("name", ["naflexvit_base_patch16_gap", "naflexvit_base_patch16_map"])
def test_naflexvit_every_token_and_gradient_matches_unpatched(name, backend):
    model, x = naflex_model(name)
    ref_model = copy.deepcopy(model)
    with sdpa_kernel([SDPBackend.MATH]):  # a loss on padded tokens: see test_fully_masked_rows_get_softmaxs_gradient
        ref_tokens = ref_model.forward_features(**x)["patches"]
        ref = ref_model(x)
        (ref.square().sum() + ref_tokens.square().sum()).backward()
    report = attnswap.patch(model, backend=backend, strict=True)
    assert report.bias_sources == (("", ("key_padding",)),)
    assert "builds its key_padding bias as structure" in str(report)
    tokens = model.forward_features(**x)["patches"]
    out = model(x)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-10, atol=1e-10)  # padded tokens included
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (out.square().sum() + tokens.square().sum()).backward()
    assert_same_grads(model, ref_model, rtol=1e-8, atol=1e-10)
    seen = attnswap.stats(model).structures()
    assert set(seen) == {("key_padding", backend, forms.FORM_SEQUENCES)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert attnswap.unpatch(model) == len(report.patched)
    assert not attnswap.is_patched(model) and type(model) is type(ref_model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_naflexvit_training_gradients_match_unpatched_as_pytorch_picks_kernels():
    """NaFlexViT's own loss never sees padded tokens (its pooling masks them), so their rows get
    no gradient and every parameter's gradient equals the unpatched model's, whatever kernel SDPA
    picks unpatched."""
    model, x = naflex_model()
    ref_model = copy.deepcopy(model)
    ref_model(x).square().sum().backward()
    attnswap.patch(model, backend="sdpa")
    model(x).square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-8, atol=1e-10)


def test_naflexvit_patched_context_and_repatching_restore_the_model_class():
    model, x = naflex_model(dtype=torch.float32)
    cls = type(model)
    with attnswap.patched(model, backend="sdpa"):
        assert type(model) is not cls and attnswap.is_patched(model)
        with attnswap.patched(model, backend="eager"):
            attnswap.patch(model, backend="sdpa_math")  # switching backends keeps one bias source
            model(x)
        assert attnswap.is_patched(model)
    assert type(model) is cls and not attnswap.is_patched(model)
    assert "_attnswap_bias_source" not in model.__dict__


def test_a_standard_image_batch_has_no_mask_and_no_structure():
    model, _ = naflex_model(dtype=torch.float32)
    attnswap.patch(model, backend="sdpa")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert attnswap.stats(model).structures() == {}


# -- packed sequences: one variable-length kernel call ----------------------------------------


def reference_varlen(calls=None):
    """flash-attn's varlen convention, computed per sequence with SDPA's math (float64 exact)."""

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None, enable_gqa=False):
        assert q.dim() == 3 and k.dim() == 3 and cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:])) and max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
        if calls is not None:
            calls.append((q.shape[0], k.shape[0]))
        outs = []
        for (qa, qb), (ka, kb) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
            seq = [t.transpose(0, 1)[None] for t in (q[qa:qb], k[ka:kb], v[ka:kb])]
            with sdpa_kernel([SDPBackend.MATH]):
                out = torch.nn.functional.scaled_dot_product_attention(*seq, scale=scale, enable_gqa=enable_gqa)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    return varlen


@pytest.mark.parametrize(
    "lengths,scattered",
    [([12, 5, 1], False), ([12, 12, 12], False), ([7, 3, 10], True), ([6, 0, 12], False)],
    ids=["tail padding", "no padding", "scattered valid tokens", "a sequence without valid tokens"],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "key only"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_packed_equals_the_masked_call_on_every_row_with_gradients(registered, lengths, scattered, symmetric, gqa):
    calls = []
    registered("packs", lambda q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False:
               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa),
               varlen=reference_varlen(calls))
    q, k, v = qkv(len(lengths), 12, heads=4, kv_heads=2 if gqa else 4, requires_grad=True)
    valid = validity(lengths, 12, scattered)
    mask = create_attention_mask(valid, 0, symmetric, None, torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    router = Router(Policy("packs", (), True), site="t")
    padding = structured(valid, 0, symmetric, None, torch.float64)
    out = router.route(q, k, v, attn_mask=padding, enable_gqa=gqa)
    assert router.tallies()[0].structure == ("key_padding", forms.FORM_PACKED)
    assert padding._tensor is None, "the mask is never built"
    if 0 in lengths:
        assert not calls, "a sequence without valid tokens: that batch runs per sequence"
    else:
        valid_tokens = sum(lengths)
        assert calls == [(valid_tokens if symmetric else 12 * len(lengths), valid_tokens)], "one call, padding left out"
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_packing_is_made_once_per_mask_for_every_layer():
    valid = validity([7, 3, 10], 12, scattered=True)
    padding = structured(valid, 0, True, None, torch.float32)
    first = padding.packing()
    assert padding.packing() is first and first.lengths == [7, 3, 10] and first.max_seqlen == 10
    assert first.cu_seqlens.tolist() == [0, 7, 10, 20] and first.cu_seqlens.dtype == torch.int32
    assert torch.equal(first.index, valid.reshape(-1).nonzero().squeeze(1))
    assert structured(validity([4, 0], 6), 0, True, None, torch.float32).packing() is None


def test_a_backend_with_a_varlen_kernel_gets_naflexvit_packed(registered):
    registered("packs_nf", lambda q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False:
               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa),
               supports=lambda f: ["no attn_mask"] if f.has_mask else [], varlen=reference_varlen())
    model, x = naflex_model("naflexvit_base_patch16_gap")
    ref_model = copy.deepcopy(model)
    with sdpa_kernel([SDPBackend.MATH]):  # (padded tokens in the loss: see test_fully_masked_rows_get_softmaxs_gradient)
        ref = ref_model.forward_features(**x)["patches"]
        ref.square().sum().backward()
    attnswap.patch(model, backend="packs_nf", strict=True)
    out = model.forward_features(**x)["patches"]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)  # padded tokens included
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-8, atol=1e-10)
    assert set(attnswap.stats(model).structures()) == {("key_padding", "packs_nf", forms.FORM_PACKED)}


# -- Gemma 4 ViT: a key-only -inf mask built inline in the encoder -------------------------------

gemma4 = pytest.importorskip("timm.models.gemma4_vit")


def gemma4_model(dtype=torch.float64):
    import timm

    torch.manual_seed(0)
    model = ungate(timm.create_model("gemma4_vit_167m", pretrained=False, depth=2, embed_dim=64, num_heads=2)).eval().to(dtype)
    return model


def gemma4_batch(lengths, n=36, dtype=torch.float64):
    return naflex_batch(lengths, n, grid_w=6, patch_dim=16 * 16 * 3, dtype=dtype)


def test_the_pinned_gemma4_encoder_matches_the_registered_fingerprint():
    methods = builders.method_replacements_for(gemma4.Gemma4VitEncoder)
    assert methods["_encode"][1] == "key_padding"
    known = builders._method_builders[("timm.models.gemma4_vit.Gemma4VitEncoder", "_encode")].fingerprint
    assert builders.fingerprint(gemma4.Gemma4VitEncoder._encode) == known


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_gemma4_padded_batch_matches_unpatched_with_gradients(backend):
    model = gemma4_model()
    x = gemma4_batch([36, 12, 5])
    ref_model = copy.deepcopy(model)
    ref = ref_model.forward_features(x)
    ref.square().sum().backward()
    report = attnswap.patch(model, backend=backend, strict=True)
    assert report.bias_sources == (("encoder", ("key_padding",)),)
    out = model.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)  # padded tokens included
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-8, atol=1e-10)
    stats = attnswap.stats(model)
    assert stats.structures() == {("key_padding", backend, forms.FORM_SEQUENCES): stats.total_calls}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attnswap.unpatch(model)
    assert type(model.encoder) is gemma4.Gemma4VitEncoder and not attnswap.is_patched(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_gemma4_keeps_timms_tensor_without_padding_or_with_a_sequence_of_padding_only():
    model = gemma4_model(torch.float32)
    attnswap.patch(model, backend="sdpa")
    with torch.no_grad():
        model.forward_features(gemma4_batch([36, 36], dtype=torch.float32))
        model.forward_features(torch.randn(1, 3, 96, 96))
        assert not attnswap.stats(model).structures() and attnswap.stats(model).total_calls == 4
        x = gemma4_batch([36, 1], dtype=torch.float32)
        x["patch_valid"][1] = False  # padding only: -inf rows, which kernels answer differently
        model.forward_features(x)
    assert not attnswap.stats(model).structures()
