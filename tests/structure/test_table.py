"""Table-gather biases (BEiT, Swin v1, MaxViT's RelPosBias): the table and its index travel instead of the
[1, H, N, N] bias; flex gathers per score, every other backend gets timm's tensor."""

from __future__ import annotations

import copy

import pytest
import torch

import attnswap
from attnswap import forms
from attnswap.structure import builders
from attnswap.structure.table import TableGather
from families import build, features
from versions import needs_flex_on_cpu

beit = pytest.importorskip("timm.models.beit")
swin = pytest.importorskip("timm.models.swin_transformer")
pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")

#: family -> (class that builds the bias, its builder method)
BUILDERS = {
    "beit": (beit.Attention, "_get_rel_pos_bias"),
    "swin": (swin.WindowAttention, "_get_rel_pos_bias"),
    "maxvit": (pos_embed_rel.RelPosBias, "get_bias"),
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_pinned_timm_methods_match_their_fingerprints(family):
    cls, method = BUILDERS[family]
    target = f"{cls.__module__}.{cls.__qualname__}"
    assert method in builders.method_replacements_for(cls)  # (loads timm's room)
    known = builders._method_builders[(target, method)].fingerprint
    assert builders.fingerprint(getattr(cls, method)) == known


@pytest.mark.parametrize("family", list(BUILDERS))
def test_structure_materializes_exactly_timms_bias_and_gathers_the_same_values(family):
    cls, method = BUILDERS[family]
    model, _ = build(family)
    attn = next(m for m in model.modules() if type(m) is cls)
    expected = getattr(cls, method)(attn)
    replacement, kind = builders.method_replacements_for(cls)[method]
    structure = replacement(attn)
    assert kind == "table_gather" and isinstance(structure, TableGather)
    assert structure.shape == expected.shape and structure.requires_grad == expected.requires_grad
    with torch.no_grad():
        assert not replacement(attn).requires_grad and not getattr(cls, method)(attn).requires_grad
    n = structure.shape[-1]
    gathered = structure.table[structure.index].view(n, n, -1).permute(2, 0, 1)
    assert torch.equal(gathered, expected[0]), "the rule flex uses: table[index[q * N + kv], h]"
    assert torch.equal(structure.materialize(), expected)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "sdpa_math"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_forward_and_table_gradients_match_unpatched(family, backend):
    model, x = build(family, torch.float64)
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():  # swin v1 runs its non-fused path unpatched: compare with its fused one
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    ref = features(ref_model, x)
    ref.square().sum().backward()
    attnswap.patch(model, backend=backend, strict=True)
    out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    tables = 0
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
        tables += "relative_position_bias_table" in name
    assert tables
    seen = attnswap.stats(model).structures()
    assert set(seen) == {("table_gather", backend, forms.FORM_WHOLE)}


def test_a_shifted_swin_window_adds_its_mask_to_the_tensor():
    model, x = build("swin")
    shifted = [m for m in model.modules() if type(m).__name__ == "SwinTransformerBlock" and m.attn_mask is not None]
    assert shifted, "the sample has shifted windows"
    attnswap.patch(model, backend="sdpa")
    with torch.no_grad():
        features(model, x)
    stats = attnswap.stats(model)
    structured = sum(stats.structures().values())
    assert structured == stats.total_calls - len(shifted), "bias + shift mask is one tensor, built as timm builds it"


@needs_flex_on_cpu
@pytest.mark.parametrize("family", list(BUILDERS))
def test_flex_gathers_from_the_table(family):
    model, x = build(family)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    with torch.no_grad():
        ref = features(model, x)
        attnswap.patch(model, backend="flex", strict=True)
        out = features(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    parts = {k: n for k, n in attnswap.stats(model).structures().items() if k[2] == forms.FORM_PARTS}
    assert parts and all(k[:2] == ("table_gather", "flex") for k in parts)
