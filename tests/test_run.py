"""attnswap run: unmodified scripts with every model they call patched."""

from __future__ import annotations

import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnswap

from attnswap.run import run_script

timm = pytest.importorskip("timm")

# the shape of timm's train.py / validate.py: argparse, create_model, steps, results written out
TRAIN_SCRIPT = '''
import argparse, sys
import timm, torch

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="vit_tiny_patch16_224")
parser.add_argument("--img-size", type=int, default=32)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--out", required=True)
parser.add_argument("--exit", type=int, default=None)
args = parser.parse_args()
torch.manual_seed(0)
model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(2, 3, args.img_size, args.img_size)
for _ in range(args.steps):
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
with torch.no_grad():
    torch.save({"out": model(x), "argv": sys.argv[1:]}, args.out)
if args.exit is not None:
    sys.exit(args.exit)
'''


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train_like.py"
    path.write_text(TRAIN_SCRIPT)
    return path


def _hooks() -> int:
    return len(torch.nn.modules.module._global_forward_pre_hooks)


def test_a_training_script_runs_patched_and_computes_the_same(script, tmp_path):
    plain, patched = tmp_path / "plain.pt", tmp_path / "patched.pt"
    saved_argv = sys.argv[:]
    sys.argv = [str(script), "--out", str(plain)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
    hooks = _hooks()
    printed: list[str] = []
    status = run_script(str(script), ["--out", str(patched), "--steps", "2"], backend="sdpa", print_to=printed.append)
    assert status == 0 and sys.argv == saved_argv and _hooks() == hooks
    ref, out = torch.load(plain), torch.load(patched)
    assert out["argv"] == ["--out", str(patched), "--steps", "2"]
    assert torch.equal(out["out"], ref["out"])  # routed to PyTorch's SDPA: the same kernel, the same numbers
    report = printed[0]
    assert "VisionTransformer #1" in report and "blocks.11.attn" in report
    # 2 training steps and one evaluation: 3 calls per block
    assert "sdpa: 3" in report and "36 calls, 0 fell back" in report


def test_the_exit_status_and_errors_of_the_script_pass_through(script, tmp_path):
    printed: list[str] = []
    assert run_script(str(script), ["--out", str(tmp_path / "o.pt"), "--exit", "3"], print_to=printed.append) == 3
    assert "VisionTransformer #1" in printed[0]  # the counts are printed on exit too
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('from the script')\n")
    hooks = _hooks()
    with pytest.raises(ValueError, match="from the script"):
        run_script(str(broken), [], print_to=printed.append)
    assert _hooks() == hooks and "no model with attention" in printed[-1]


def test_every_model_the_script_builds_is_patched(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    module = tmp_path / "many_models.py"
    module.write_text(textwrap.dedent('''
        import torch, timm, torchvision, transformers
        import kept_models
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
        swin = torchvision.models.swin_t(weights=None).eval()
        mha = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
        bert = transformers.BertModel(transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)).eval()
        with torch.no_grad():
            vit(torch.randn(1, 3, 32, 32))
            swin(torch.randn(1, 3, 64, 64))
            mha(torch.randn(1, 5, 16))
            bert(torch.randint(0, 99, (1, 6)))
            vit(torch.randn(1, 3, 32, 32))
        kept_models.models += [vit, swin, bert]
    '''))
    (tmp_path / "kept_models.py").write_text("models = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    printed: list[str] = []
    assert run_script("many_models", [], module=True, backend="sdpa_math", print_to=printed.append) == 0
    report = printed[0]
    for label in ("VisionTransformer #1", "SwinTransformer #2", "TransformerEncoderLayer #3", "BertModel #4"):
        assert label in report
    assert "24 calls" in report  # the ViT, twice
    assert "12 calls" in report  # Swin-T: 12 blocks
    assert "3 calls" in report and "BertSelfAttention" in report
    import kept_models  # the script's own models: unpatched when it ended

    vit, swin, bert = kept_models.models
    assert not any(attnswap.is_patched(m) for m in (vit, swin, bert))
    assert bert.config._attn_implementation == "sdpa"


def test_an_attention_module_called_directly_counts_its_first_call(tmp_path):
    script = tmp_path / "direct.py"
    script.write_text(textwrap.dedent('''
        import torch
        mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
        x = torch.randn(1, 5, 16)
        with torch.no_grad():
            for _ in range(3):
                mha(x, x, x, need_weights=False)
    '''))
    printed: list[str] = []
    run_script(str(script), [], backend="sdpa", print_to=printed.append)
    report = printed[0]
    assert "sdpa: 2" in report and "1 computed by the module itself" in report
    assert "made before it was patched" in report


def test_the_command_line(script, tmp_path):
    out = tmp_path / "cli.pt"
    done = subprocess.run(
        [sys.executable, "-m", "attnswap", "run", "--backend", "sdpa_math", "--", str(script), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "attnswap run: VisionTransformer #1, backend sdpa_math" in done.stderr
    assert "sdpa_math: 3" in done.stderr and out.exists()
