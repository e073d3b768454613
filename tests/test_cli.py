import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnswap.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_backends_json_lists_every_backend(capsys):
    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names[:12] == [
        "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex",
        "flash", "flash3", "flash4", "xformers", "sage", "eager",
    ]
    assert all("available" in r and "limits" in r for r in rows)


def test_backends_table(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "sdpa_cudnn" in out and "declared limits" in out


def test_bench_runs_every_backend_side_by_side(capsys, tmp_path):
    plot, out_json = tmp_path / "bench.png", tmp_path / "bench.json"
    argv = ["bench", "test_vit", "--backends", "sdpa,sdpa_efficient,eager", "--img-size", "64", "--repeats", "2",
            "--plot", str(plot), "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("unpatched", "sdpa_efficient", "eager", "speed-up", "max rel. error"):
        assert name in out
    assert "device cpu" in out, "sdpa_efficient's fallback reason is shown"
    result = json.loads(out_json.read_text())
    rows = {v["backend"]: v for v in result["variants"]}
    assert list(rows) == ["unpatched", "sdpa", "sdpa_efficient", "eager"]
    assert all(len(v["times_ms"]) == 2 and v["speedup"] > 0 for v in rows.values())
    assert rows["sdpa"]["sites"] == 6 and rows["sdpa"]["served"] == {"sdpa": 6} and rows["sdpa"]["rel_err"] < 1e-5
    assert rows["sdpa_efficient"]["fallbacks"] == 6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train_mode_and_auto(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "test_vit", "--backends", "auto", "--img-size", "32", "--repeats", "1", "--train",
                 "--json", str(out_json)]) == 0
    (auto,) = [v for v in json.loads(out_json.read_text())["variants"] if v["backend"] == "auto"]
    assert auto["tuning_s"] > 0 and auto["calls"] == 6 and auto["rel_err"] < 1e-5


def test_bench_of_a_users_own_module(capsys):
    assert main(["bench", "cli_models:small_encoder", "--backends", "sdpa,eager", "--input-shape", "2,7,32",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "cli_models:small_encoder" in out and "eager: 2" in out


def test_bench_says_when_the_input_does_not_fit(capsys):
    assert main(["bench", "cli_models:small_encoder", "--input-shape", "2,7,31", "--repeats", "1"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_unknown_backend_is_a_clean_error(capsys):
    assert main(["demo", "test_vit", "--backends", "sdpa_flsh"]) == 2
    assert "Did you mean 'sdpa_flash'" in capsys.readouterr().err


def test_unknown_model_is_a_clean_error(capsys):
    assert main(["bench", "vit_tiny_patch16_22"]) == 2
    assert "timm has no model named 'vit_tiny_patch16_22'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "attnswap", "backends", "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(example):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
