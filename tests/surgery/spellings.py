"""Attention modules that call SDPA in every way real code does (and a few it cannot be rerouted from)."""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention
from torch.nn.functional import scaled_dot_product_attention as attend

_stored = F.scaled_dot_product_attention


class Base(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, n, c = x.shape
        return self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, x):
        b, h, n, d = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, h * d))


class ViaF(Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v))


class ViaTorchNNFunctional(Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5))


class ViaNNFunctional(Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(nn.functional.scaled_dot_product_attention(q, k, v, None, 0.0, False))


class ViaImportedName(Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(scaled_dot_product_attention(q, k, v, is_causal=True))


class ViaAlias(Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(attend(q, k, v))


class ViaHelperMethod(Base):
    def _attention(me, q, k, v, mask=None):  # self under another name, in a helper
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(self._attention(q, k, v, torch.zeros(q.shape[-2], k.shape[-2])))


class ViaNestedFunction(Base):
    def forward(self, x):
        q, k, v = self.split(x)

        def attn(a, b, c):
            return F.scaled_dot_product_attention(a, b, c)

        return self.merge(attn(q, k, v) + attn(q, k, v))


class WithSuperAndFlag(Base):
    fused_attn = False  # class-level default, like timm's experimental classes

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        q, k, v = self.split(x)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            y = attn @ v
        return super().merge(y)


class WithNegatedFlag(Base):
    def __init__(self):
        super().__init__()
        self.not_fused = False
        self.fused_attn = False

    def forward(self, x):
        q, k, v = self.split(x)
        if not self.fused_attn:
            return self.merge((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v)
        else:
            return self.merge(F.scaled_dot_product_attention(q, k, v))


class Child(ViaF):
    """Inherits the SDPA-calling forward."""


class StaticSdpa(Base):
    @staticmethod
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x):
        return self.merge(self.attend(*self.split(x)))


class StoresSdpa(Base):
    def __init__(self):
        super().__init__()
        self.fn = F.scaled_dot_product_attention

    def forward(self, x):
        return self.merge(self.fn(*self.split(x)))


def _identity_decorator(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Decorated(Base):
    @_identity_decorator
    def forward(self, x):
        return self.merge(F.scaled_dot_product_attention(*self.split(x)))


class SameNameNotSdpa(Base):
    def scaled_dot_product_attention(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    def forward(self, x):
        return self.merge(self.scaled_dot_product_attention(*self.split(x)))


class TwoCalls(Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v) - 0.5 * F.scaled_dot_product_attention(k, q, v))
