"""benchmarks/gpu_check.py runs end to end (its --smoke mode, on whatever device is here), so the
one script a lent GPU gets is known to work before the GPU time is spent."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_gpu_check_smoke_writes_every_section(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "result.json"
    code = gpu_check.main(["--smoke", "--budget", "120", "--out", str(out), "--backends", "sdpa,sdpa_cudnn,eager"])
    result = json.loads(out.read_text())
    assert code == 0
    assert {r["backend"] for r in result["numerics"]} == {"sdpa", "sdpa_cudnn", "eager"}
    ok = [r for r in result["numerics"] if r["status"] == "ok"]
    assert ok and all(r["within_tolerance"] and "bwd_rel_err" in r for r in ok)
    if result["environment"]["device"] == "cpu":
        assert all(r["status"].startswith("refused: device cpu") for r in result["numerics"] if r["backend"] == "sdpa_cudnn")
    assert [r["backend"] for r in result["models"]] == ["unpatched", "sdpa", "sdpa_cudnn", "eager", "auto"]
    assert all(r["status"] == "ok" for r in result["models"])
    pinned = {(r["backend"], r["case"], r.get("dtype")): r for r in result["pinned"]}
    if result["environment"]["device"] == "cpu":  # the CPU recipes: bitwise SDPA under sdpa_kernel
        flash = [r for k, r in pinned.items() if k[0] == "sdpa_flash" and r["status"] == "ok"]
        assert len(flash) >= 15 and all(r["forward_bitwise"] and r["backward_bitwise"] for r in flash), flash
        assert pinned[("sdpa_cudnn", "-", None)]["status"] == "no direct recipe on cpu"
    forms = {(r["backend"], r["kind"], r.get("dtype")): r for r in result["structured"]}
    for backend in ("sdpa", "eager"):
        for kind in ("decomposed_rel_pos", "key_padding"):
            row = forms[(backend, kind, "float32")]
            assert row["status"] == "ok" and row["within_tolerance"], row
    if result["environment"]["device"] == "cpu":
        assert forms[("sdpa", "key_padding", "float32")]["form"] == "per sequence, padding dropped"
    assert forms[("sdpa", "SAM global layer", "float32")]["status"] == "ok"
    verdict = result["xformers_own_verdict"]
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001
        assert verdict["importable"] is False
    else:  # CI installs its Python side: on CPU every operator refuses the device, and the call fails
        assert verdict["importable"] is True and "direct_call" in verdict
        if result["environment"]["device"] == "cpu":
            assert any("device=cpu" in r for r in verdict["cutlassF-pt"]), verdict
            assert not verdict["direct_call"].startswith("ran")
    printed = capsys.readouterr().out
    assert "xformers' own verdict" in printed
    assert printed.index("numerics vs float32 math") < printed.index("summary")
    assert "direct operator call vs SDPA under sdpa_kernel" in printed
    assert "structured biases" in printed
