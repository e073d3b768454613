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
    assert names[:7] == ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex", "eager"]
    assert all("available" in r and "limits" in r for r in rows)


def test_backends_table(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "sdpa_cudnn" in out and "declared limits" in out


def test_demo_runs_and_reports_every_backend(capsys):
    assert main(["demo", "test_vit", "--backends", "sdpa,sdpa_efficient,eager", "--img-size", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 attention sites routed" in out
    for name in ("unpatched", "sdpa_efficient", "eager"):
        assert name in out
    assert "device cpu" in out, "sdpa_efficient's fallback reason is shown"


def test_unknown_backend_is_a_clean_error(capsys):
    assert main(["demo", "test_vit", "--backends", "sdpa_flsh"]) == 2
    assert "Did you mean 'sdpa_flash'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "attnswap", "backends", "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(example):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
