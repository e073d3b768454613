"""Register your own attention function as a backend, declare what it cannot do, and let
attnswap fall back (and tell you why) for the calls it cannot take.

    python examples/custom_backend.py
"""

import timm
import torch

import attnswap


def chunked_supports(facts):
    reasons = []
    if facts.dropout_p > 0:
        reasons.append(f"dropout_p={facts.dropout_p} (chunked has no dropout)")
    if facts.is_causal:
        reasons.append("is_causal (chunked has no causal mask)")
    if facts.grouped_heads:
        reasons.append("grouped-query attention")
    return reasons


@attnswap.register_backend("chunked", supports=chunked_supports, description="exact attention, 64 query rows at a time")
def chunked(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Exact attention, 64 query rows at a time (no dropout, no causal)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for start in range(0, q.shape[-2], 64):
        qs = q[..., start:start + 64, :]
        scores = (qs @ k.transpose(-2, -1)) * scale
        if attn_mask is not None:
            m = attn_mask[..., start:start + 64, :] if attn_mask.shape[-2] > 1 else attn_mask
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        outs.append(scores.softmax(-1) @ v)
    return torch.cat(outs, dim=-2)


model = timm.create_model("vit_small_patch16_224", pretrained=False, drop_rate=0.0, attn_drop_rate=0.1)
x = torch.randn(2, 3, 224, 224)
attnswap.patch(model, backend="chunked")

model.eval()  # no attention dropout: chunked serves every call
with torch.no_grad():
    out = model(x)
model.train()  # attention dropout 0.1: chunked refuses, sdpa takes over, counted with the reason
model(x)
print(attnswap.stats(model))
by_backend = attnswap.stats(model).by_backend()
assert by_backend == {"chunked": 12, "sdpa": 12}, by_backend
