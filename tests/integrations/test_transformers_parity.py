"""benchmarks/transformers_parity.py, the check behind the issue's transformers targets, runs and
judges: a decoder with GQA and an encoder-decoder match unpatched in float32 and float64 and
generate the same tokens; a changed token is reported as DIFFERENT."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_parity_of_a_decoder_and_an_encoder_decoder(name):
    import transformers_parity

    p = transformers_parity.check(name)
    assert p.ok and p.calls and p.generate == "same" and p.compiled == "not asked", p
    assert p.f32 < transformers_parity.FLOAT32 and p.f64 < transformers_parity.FLOAT64


def test_parity_reports_generated_tokens_that_differ(monkeypatch):
    import attnswap
    import transformers_parity

    real = attnswap.patch

    def patch_then_perturb(model, **kwargs):
        report = real(model, **kwargs)
        head = model.get_output_embeddings()
        if head is not None:  # the patched run's logits change: its tokens must too
            with __import__("torch").no_grad():
                head.weight.mul_(-1)
        return report

    monkeypatch.setattr(transformers_parity.attnswap, "patch", patch_then_perturb)
    p = transformers_parity.Parity("llama")
    transformers_parity._generate(p, "llama")
    assert p.generate == "DIFFERENT"


def test_an_error_above_the_target_passes_only_within_what_one_ulp_at_the_sites_does():
    import transformers_parity as tp

    base = dict(name="m", calls=2, f64=0.0, generate="same", compiled="not asked")
    assert not tp.Parity(f32=7e-5, **base).ok  # above 1e-5, nothing to explain it
    assert tp.Parity(f32=7e-5, f32_ulp=1.1e-4, **base).ok  # the model moves more than that under one ulp
    assert not tp.Parity(f32=7e-4, f32_ulp=1.1e-4, **base).ok  # beyond ULP_MARGIN times it
