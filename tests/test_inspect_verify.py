"""attnswap inspect (sites, how reached, what calls pass, decisions) and verify (per-site error
against a float64 eager reference; a wrong backend is flagged, rounding alone is not)."""

import json

import torch
import torch.nn.functional as F

import attnswap
from attnswap.cli import main
from attnswap.inspection import inspect
from attnswap.verify import verify


def test_inspect_reports_calls_masks_and_decisions():
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32,
                              depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8)).eval()
    result = inspect(model, torch.randn(1, 3, 224, 224), backend="sdpa_cudnn")
    assert not attnswap.is_patched(model)
    sites = {s.path: s for s in result.sites}
    shifted = sites["layers.1.blocks.1.attn"]
    assert shifted.how == "SDPA call; table_gather bias as structure; window_segments bias as structure"
    (call,) = shifted.calls  # its bias + shift mask: the two parts, not their sum for every window
    assert call.passes == ["window_segments bias (as structure) (16, 2, 49, 49)"] and call.backend == "sdpa (bias materialized)"
    assert call.fallback_reasons["sdpa_cudnn"] == ["device cpu (supported: cuda)"]
    (plain,) = sites["layers.1.blocks.0.attn"].calls
    assert plain.passes == ["table_gather bias (as structure) (1, 2, 49, 49)"], "no grad under inspect's no_grad"
    assert plain.backend == "sdpa (bias materialized)"


def test_inspect_lists_left_alone_and_hand_written_sites(capsys):
    assert main(["inspect", "cait_xxs24_224", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sites"]
    talking = [r for r in rows if r["cls"].endswith("TalkingHeadAttn")]
    assert talking and all(r["status"] == "not routed" and "talking-head" in r["note"] for r in talking)
    class_attn = [r for r in rows if r["cls"].endswith("ClassAttn")]
    assert class_attn and all(c["passes"] == ["q_len 1 != kv_len 197"] for r in class_attn for c in r["calls"])


def test_inspect_table_from_the_command_line(capsys):
    assert main(["inspect", "levit_128s", "--backend", "sdpa_flash"]) == 0
    out = capsys.readouterr().out
    assert "hand-written" in out and "AttentionDownsample" in out


def test_inspect_says_when_the_input_does_not_fit(capsys):
    assert main(["inspect", "levit_128s", "--img-size", "64"]) == 2
    assert "fails on an input of shape (1, 3, 64, 64)" in capsys.readouterr().err


def test_verify_passes_exact_backends_and_flags_a_wrong_one(registered):
    import timm

    model = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, depth=2)
    x = torch.randn(2, 3, 32, 32)
    good = verify(model, x, "sdpa")
    assert not good.flagged and len(good.sites) == 2 and all(s.patched_err < 1e-5 for s in good.sites)

    def off_by_a_percent(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale) * 1.01

    registered("off", off_by_a_percent)
    bad = verify(model, x, "off")
    assert [s.path for s in bad.flagged] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(s.patched_err > 5e-3 and s.baseline_err < 1e-5 for s in bad.sites)
    assert not attnswap.is_patched(model)


def test_verify_does_not_flag_what_the_dtype_alone_explains(capsys):
    assert main(["verify", "test_vit", "--backend", "eager", "--dtype", "bfloat16", "--img-size", "64"]) == 0
    assert "0 sites flagged" in capsys.readouterr().out


def test_verify_exit_code_is_1_when_a_site_is_flagged(registered, capsys):
    registered("way_off", lambda q, k, v, **kw: v * 2.0)
    assert main(["verify", "test_vit", "--backend", "way_off", "--img-size", "64", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "way_off" and all(s["flagged"] for s in result["sites"])
