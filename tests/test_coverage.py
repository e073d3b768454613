"""The coverage sweep: on a fixed sample with one model per attention class, every attention
is found and routed (or deliberately left alone, with its reason), outputs match, nothing escapes."""

import pytest
import torch

from attnswap import coverage
from attnswap.zoos.timm_models import create_on_meta
from attnswap.cli import main
from versions import skip_unless_in_timm

#: model -> classes expected to be left alone (C: no single attention call expresses them)
SAMPLE = {
    # A: SDPA call sites
    "test_vit": (), "eva02_tiny_patch14_224": (), "vit_relpos_small_patch16_224": (), "pvt_v2_b0": (),
    "test_maxvit": (), "hiera_tiny_224": (), "sam2_hiera_tiny": (), "twins_svt_small": (), "nest_tiny": (),
    "mobilenetv4_hybrid_medium": (), "tiny_vit_5m_224": (), "iformer_t": (), "fastvit_mci0": (),
    "lowformer_b0": (), "caformer_s18": (), "test_vit3": (),
    # A*: SDPA behind an experimental flag
    "swin_tiny_patch4_window7_224": (), "visformer_tiny": (), "xcit_nano_12_p16_224": (),
    # B: hand-written attention
    "levit_128s": (), "levit_conv_128s": (), "efficientformer_l1": (), "efficientvit_m0": (), "mvitv2_tiny": (),
    "swinv2_tiny_window8_256": (), "swinv2_cr_tiny_ns_224": (), "davit_tiny": (), "edgenext_xx_small": (),
    "gcvit_xxtiny": (), "crossvit_tiny_240": (), "tnt_s_patch16_224": (), "convit_tiny": (), "shvit_s1": (),
    "halonet26t": (), "botnet26t_256": (),
    # C, left alone next to routed sites
    "cait_xxs24_224": ("timm.models.cait.TalkingHeadAttn",),
    "efficientformerv2_s0": ("timm.models.efficientformer_v2.Attention2d",),
    "volo_d1_224": ("timm.models.volo.OutlookAttention",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAMPLE))
def test_sample_model_fully_covered(name):
    skip_unless_in_timm(name)
    r = coverage.sweep_one(name)
    assert not r.error, r.error
    assert r.routed > 0 and not r.not_routable, r
    assert set(r.left_alone) == set(SAMPLE[name]), r.left_alone
    assert r.checked, r.skipped
    assert r.matches and r.escaped == 0 and r.unrouted == 0, r


def test_softmax_that_is_not_attention_is_counted_apart():
    r = coverage.sweep_one("coat_lite_tiny", numerics=False)
    assert r.routed == 0 and r.sites == 0 and r.not_attention and r.ok


def test_report_totals_and_problems():
    good = coverage.ModelCoverage("a", sites=2, routed=2, checked=True, rel_err=1e-7, calls=4)
    partial = coverage.ModelCoverage("b", sites=3, routed=2, left_alone={"X": "why"}, checked=True, rel_err=0.0)
    bad = coverage.ModelCoverage("c", sites=1, routed=1, checked=True, rel_err=1e-2)
    amplified = coverage.ModelCoverage("d", sites=1, routed=1, checked=True, rel_err=3e-4, rel_err_f64=1e-13)
    t = coverage.totals([good, partial, bad, amplified])
    assert t["fully routed"] == 3 and t["partly routed (rest left alone)"] == 1
    assert t["mismatches"] == 1 and t["float32 above tolerance, float64 agrees"] == 1
    text = coverage.markdown([good, partial, bad, amplified], command="cmd", environment="env", seconds=60)
    assert "| c | 1.00e-02 / 0 / 0 |" in text and "| b | 2 | `X` |" in text


def test_cli_writes_the_report(tmp_path):
    skip_unless_in_timm("test_vit")
    out, js = tmp_path / "COVERAGE.md", tmp_path / "cov.json"
    assert main(["coverage", "test_vit", "levit_128s", "--out", str(out), "--json", str(js)]) == 0
    text = out.read_text()
    assert "| fully routed | 2 |" in text and "M.levit.Attention" in text
    assert [r.name for r in coverage.load_json(js)] == ["levit_128s", "test_vit"]


def test_discovery_builds_on_meta_with_an_older_timm_too():
    """timm 1.0.15 takes no `device=`, and some of its models read values in __init__."""

    class Model(torch.nn.Module):
        def __init__(self, reads_values: bool) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            if reads_values:
                torch.linspace(0, 1, 3)[1].item()

    class OldTimm:
        def __init__(self, reads_values: bool) -> None:
            self.reads_values = reads_values

        def create_model(self, name, pretrained=False):
            return Model(self.reads_values)

    assert create_on_meta(OldTimm(False), "m").proj.weight.is_meta
    assert not create_on_meta(OldTimm(True), "m").proj.weight.is_meta


def test_torchvision_sweep_routes_swin_and_checks_it():
    r = coverage.sweep_one("swin_t", zoo="torchvision")
    assert r.ok and r.checked and r.fully_routed, r
    assert r.routed == 12 and r.calls == 12 and r.escaped == 0 and r.unrouted == 0
    assert set(r.routed_classes.values()) == {"hand-written in shifted_window_attention()"}
    # a detection model: built without downloading a backbone, no attention
    d = coverage.sweep_one("fasterrcnn_mobilenet_v3_large_320_fpn", zoo="torchvision", numerics=False)
    assert d.ok and d.sites == 0 and not d.error


def test_write_section_keeps_the_other_libraries(tmp_path):
    path = tmp_path / "COVERAGE.md"
    timm_md = coverage.markdown([], command="a", environment="e", seconds=1, zoo="timm")
    tv_md = coverage.markdown([], command="b", environment="e", seconds=1, zoo="torchvision")
    coverage.write_section(path, timm_md)
    coverage.write_section(path, tv_md)
    coverage.write_section(path, tv_md.replace("Regenerate", "Made again"))
    text = path.read_text()
    assert text.count("# attnswap coverage of timm") == 1 and text.count("# attnswap coverage of torchvision") == 1
    assert "    a\n" in text and "Made again" in text and text.index("of timm") < text.index("of torchvision")


@pytest.mark.parametrize("name", ["llama", "t5", "vit_mae"])
def test_transformers_sweep_routes_through_the_interface_and_checks_it(name):
    pytest.importorskip("transformers")
    r = coverage.sweep_one(name, zoo="transformers")
    assert r.fully_routed and r.checked and r.ok, r
    assert set(r.routed_classes.values()) == {"transformers attention interface"}
    assert r.calls == r.routed  # one call per attention module, none escaped (the probe counts SDPA calls in sites)


@pytest.mark.parametrize("name", ["clip", "deepseek_v3", "qwen2_vl_text"])
def test_transformers_sweep_builds_inputs_and_sizes_for_dual_encoders_latent_and_multimodal_rotary(name):
    # CLIP runs on text and images together; DeepSeek-V3's latent attention and Qwen2-VL's three-section
    # rotary embedding need sizes consistent with the small head
    pytest.importorskip("transformers")
    r = coverage.sweep_one(name, zoo="transformers")
    assert r.fully_routed and r.checked and r.ok and r.calls == r.routed, r


def test_transformers_sweep_does_not_count_the_calls_of_a_site_reported_not_routable_as_escaped():
    # Mistral-Large-4 compares _attn_implementation with "sdpa": those sites are reported and keep SDPA
    pytest.importorskip("transformers")
    r = coverage.sweep_one("mistral_large4", zoo="transformers")
    assert r.not_routable and r.routed and r.checked and r.matches and r.escaped == 0, r


def test_probe_counts_an_sdpa_call_outside_every_site_as_escaped_unless_its_module_was_reported():
    class Attend(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    module, x = Attend(), torch.randn(1, 2, 4, 8)
    for reported, escaped in ((frozenset(), 1), (frozenset({id(module)}), 0)):
        probe = coverage._Attribution(reported)
        probe.stack.append(module)
        with probe:
            module(x)
        assert probe.escaped == escaped and probe.sdpa_in_sites == 0


def test_transformers_sweep_checks_a_model_on_eager_and_counts_its_soft_capping():
    pytest.importorskip("transformers")
    r = coverage.sweep_one("gemma2", zoo="transformers")
    # Gemma 2's soft-capped scores are computed by its own eager code: counted, not escaped
    assert r.fully_routed and r.checked and r.matches and r.escaped == 0 and r.unrouted == 2 and r.calls == 0


def test_diffusers_sweep_checks_the_models_it_has_inputs_for_and_discovers_the_rest():
    pytest.importorskip("diffusers")
    flux = coverage.sweep_one("FluxTransformer2DModel", zoo="diffusers")
    assert flux.fully_routed and flux.checked and flux.ok and flux.calls == 2
    latte = coverage.sweep_one("LatteTransformer3DModel", zoo="diffusers")
    assert latte.fully_routed and not latte.checked and "no example inputs" in latte.skipped
