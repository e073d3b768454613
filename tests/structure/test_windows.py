"""Shifted windows (Swin v1): the window's rel-pos bias and the [nW, N, N] shift mask travel instead
of the [B·nW, H, N, N] sum timm expands them to; flex reads both per score, every other backend gets
timm's tensor."""

from __future__ import annotations

import copy

import pytest
import torch

import attnswap
from attnswap import forms
from attnswap.backends.flex import FlexBackend
from attnswap.structure import builders
from attnswap.structure.table import TableGather
from attnswap.structure.windows import WindowedBias
from families import assert_same_grads, build, features
from versions import needs_flex_on_cpu

swin = pytest.importorskip("timm.models.swin_transformer")


def shift_masks(model):
    return [m.attn_mask for m in model.modules() if type(m).__name__ == "SwinTransformerBlock" and m.attn_mask is not None]


def timm_fused_mask(attn, mask, batch):
    """What timm's fused branch passes SDPA (its own code, unpatched)."""
    n, heads = mask.shape[-1], attn.num_heads
    expanded = mask.view(1, mask.shape[0], 1, n, n).expand(batch // mask.shape[0], -1, heads, -1, -1)
    return swin.WindowAttention._get_rel_pos_bias(attn) + expanded.reshape(-1, heads, n, n)


def test_the_pinned_timm_forward_matches_the_registered_fingerprint():
    wrappers = builders.method_wrappers_for(swin.WindowAttention)
    assert "forward" in wrappers and wrappers["forward"][1] == "window_segments"
    known = builders._method_wrappers[("timm.models.swin_transformer.WindowAttention", "forward")].fingerprint
    assert builders.fingerprint(swin.WindowAttention.forward) == known


@pytest.mark.parametrize("table", [True, False], ids=["table", "tensor"])
def test_structure_materializes_exactly_timms_mask(table):
    model, _ = build("swin")
    attn = next(m for m in model.modules() if type(m) is swin.WindowAttention)
    mask = shift_masks(model)[0]
    batch = 3 * mask.shape[0]
    bias = swin.WindowAttention._get_rel_pos_bias(attn)
    if table:
        replacement, _ = builders.method_replacements_for(swin.WindowAttention)["_get_rel_pos_bias"]
        bias = replacement(attn)
        assert isinstance(bias, TableGather)
    structure = WindowedBias(bias, mask, batch, attn.num_heads)
    expected = timm_fused_mask(attn, mask, batch)
    assert structure.shape == expected.shape and structure.requires_grad == expected.requires_grad
    table_, index = structure.table()
    n = mask.shape[-1]
    by_rule = table_[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0) + mask.repeat(batch // mask.shape[0], 1, 1)[:, None]
    assert torch.equal(by_rule, expected), "the rule flex reads it by: bias[h, q, kv] + mask[b % nW, q, kv]"
    assert torch.equal(structure.materialize(), expected)
    assert structure.nbytes == expected.numel() * 4 and structure.layout()[:2] == ("window_segments", mask.shape[0])
    with pytest.raises(ValueError, match="multiple"):
        WindowedBias(bias, mask, batch + 1, attn.num_heads)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "sdpa_math"])
def test_forward_and_gradients_match_unpatched(backend):
    model, x = build("swin", torch.float64)
    x = torch.cat([x, x.flip(-1)])  # two images: windows of both share the mask
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():  # unpatched swin runs its non-fused path: compare with its fused one
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend=backend, strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    assert_same_grads(model, ref_model, rtol=1e-9, atol=1e-12)
    seen = attnswap.stats(model).structures()
    shifted = len(shift_masks(model))
    assert seen == {
        ("window_segments", backend, forms.FORM_WHOLE): shifted,
        ("table_gather", backend, forms.FORM_WHOLE): attnswap.stats(model).total_calls - shifted,
    }


def test_the_non_fused_branch_and_unpatching_see_timms_code():
    model, x = build("swin")
    with torch.no_grad():
        ref = features(model, x)
        with attnswap.patched(model, backend="sdpa"):
            patched = features(model, x)
            assert all(m.fused_attn for m in model.modules() if type(m).__name__ == "WindowAttention")
        assert type(next(m for m in model.modules() if type(m).__name__ == "WindowAttention")) is swin.WindowAttention
        again = features(model, x)
    torch.testing.assert_close(patched, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, ref)


@needs_flex_on_cpu
def test_flex_reads_the_bias_and_mask():
    model, x = build("swin")
    x = torch.cat([x, x.flip(-1)])
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    seen = attnswap.stats(model).structures()
    assert seen[("window_segments", "flex", forms.FORM_PARTS)] == len(shift_masks(model))


@needs_flex_on_cpu
def test_flex_reads_a_tensor_bias_with_its_windows():
    torch.manual_seed(0)
    windows, heads, n, batch = 4, 2, 16, 8
    bias = torch.randn(1, heads, n, n)
    mask = torch.where(torch.rand(windows, n, n) < 0.3, -100.0, 0.0)
    q, k, v = (torch.randn(batch, heads, n, 16) for _ in range(3))
    structure = WindowedBias(bias, mask, batch, heads)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=structure.materialize())
    with torch.no_grad():
        out = FlexBackend()(q, k, v, WindowedBias(bias, mask, batch, heads))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_detached_parts_keep_the_values_and_reach_no_parameter():
    model, _ = build("swin")
    attn = next(m for m in model.modules() if type(m) is swin.WindowAttention)
    mask = shift_masks(model)[0]
    replacement, _ = builders.method_replacements_for(swin.WindowAttention)["_get_rel_pos_bias"]
    structure = WindowedBias(replacement(attn), mask, mask.shape[0], attn.num_heads)
    detached = structure.detached()
    assert detached.requires_grad and detached.signature() == structure.signature()
    detached.materialize().sum().backward()
    assert attn.relative_position_bias_table.grad is None
    assert torch.equal(detached.materialize(), structure.materialize())


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["swinv2", "swinv2_cr"])
def test_swin_v2_hand_written_shift_masks_become_windowed_biases(family, backend):
    """Swin v2 (and v2-cr) add the mask in a (B, nW, H, N, N) view of their hand-written scores:
    the router gets the [1, H, N, N] bias and the [nW, N, N] mask, not their sum for every image."""
    model, x = build(family, torch.float64)
    x = torch.cat([x, x.flip(-1)])
    ref_model = copy.deepcopy(model)
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend=backend, strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    total = torch.stack([p.grad.norm() for p in ref_model.parameters() if p.grad is not None]).norm()
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        # relative to the model's gradient norm: the hand-written sum is (scores + bias) + mask in
        # timm, scores + (bias + mask) here, so single elements differ at rounding level (and a
        # bias shared by every key, like meta_mlp.fc2.bias, has a gradient of pure rounding noise)
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            assert ((p.grad - p_ref.grad).norm() / total).item() < 1e-12, name
    shifted = sum(1 for m in model.modules() if type(m).__name__.endswith("Block") and getattr(m, "attn_mask", None) is not None)
    assert shifted and attnswap.stats(model).structures() == {("window_segments", backend, forms.FORM_WHOLE): shifted}


@needs_flex_on_cpu
@pytest.mark.parametrize("family", ["swinv2", "swinv2_cr"])
def test_swin_v2_on_flex_reads_bias_and_mask(family):
    model, x = build(family)
    x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert ("window_segments", "flex", forms.FORM_PARTS) in attnswap.stats(model).structures()
