"""Swap the attention backend of a timm model for inference and check nothing changed.

    python examples/inference_swap.py [MODEL] [BACKEND]
"""

import sys

import timm
import torch

import attnswap

model_name = sys.argv[1] if len(sys.argv) > 1 else "vit_small_patch16_224"
backend = sys.argv[2] if len(sys.argv) > 2 else "sdpa_flash"

torch.manual_seed(0)
model = timm.create_model(model_name, pretrained=False).eval()  # or load your weights here
x = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    reference = model(x)

report = attnswap.patch(model, backend=backend)
print(report)
with torch.no_grad():
    out = model(x)
print(attnswap.stats(model))
err = ((out - reference).abs().max() / reference.abs().max()).item()
print(f"max relative difference to the unpatched model: {err:.2e}")
assert err < 1e-4

attnswap.unpatch(model)
with torch.no_grad():
    assert torch.equal(model(x), reference), "unpatch restores the model exactly"
print("unpatched: bit-identical to before")
