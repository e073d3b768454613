"""Temporarily run a model with another backend: a context manager that restores everything.

    python examples/temporary_swap.py
"""

import timm
import torch

import attnswap

model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, depth=2).eval()
x = torch.randn(1, 3, 64, 64)

attnswap.patch(model, backend="sdpa_flash")  # the model's usual backend
with torch.no_grad():
    fast = model(x)

# compare against PyTorch's math kernel for a moment (BEiT passes a relative-position bias)
with attnswap.patched(model, backend="sdpa_math"):
    with torch.no_grad():
        reference = model(x)
    print(attnswap.stats(model))

# back to sdpa_flash, with its earlier call counts
print(attnswap.stats(model))
print("difference sdpa_flash vs sdpa_math:", (fast - reference).abs().max().item())

try:
    with attnswap.patched(model, backend="eager"):
        raise RuntimeError("something failed inside")
except RuntimeError:
    pass
assert {s.backend for s in attnswap.stats(model)} == {"sdpa_flash"}, "restored even when the body raised"
print("restored after an exception: ok")
