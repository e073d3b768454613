"""``sdpa`` (PyTorch chooses) and the pinned kernels ``sdpa_flash``, ``sdpa_efficient``,
``sdpa_cudnn``, ``sdpa_math`` (through ``torch.nn.attention.sdpa_kernel``).

Each pinned kernel declares the limits PyTorch's own selector enforces
(``aten/src/ATen/native/transformers/{sdp_utils_cpp.h,cuda/sdp_utils.cpp}``, checked
against torch 2.14.1), so a call it cannot take is refused with reasons before PyTorch
would raise its bare "No available kernel". Should PyTorch still refuse (a stride or
alignment rule that is not part of the call's facts), the refusal is turned into
:class:`~attnswap.errors.BackendRefused` with PyTorch's own explanation, and the router
falls back.

``sdpa_kernel`` sets process-global flags (not thread-local) and restores, on exit, the
flags it saw on entry. Two threads pinning at once would each restore the other's pin and
could leave the process with one kernel enabled for good; pinned calls therefore hold
:data:`PIN_LOCK` for the duration of the pin. An unpinned SDPA call in another thread at that
moment still runs under the pinned flags (PyTorch's limitation; README, "Threads").
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch
import torch.nn.functional as F

from ..call import MASK_ADDITIVE, CallFacts
from ..errors import BackendRefused
from .base import Backend, Limits, cuda_capability, head_count_reasons

_HALF = frozenset({torch.float16, torch.bfloat16})
_CPU_FLASH_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_NO_KERNEL = "No available kernel"
#: held while a pinned backend's ``sdpa_kernel`` flags are set (they are process-global)
PIN_LOCK = threading.RLock()


class SdpaBackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention; PyTorch picks the kernel"
    accepts_everything = True

    @property
    def kernel(self):
        return F.scaled_dot_product_attention

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=True,
            )
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )


class PinnedSdpaBackend(Backend):
    """SDPA restricted to one kernel with ``sdpa_kernel``.

    ``_limits`` maps each device type the kernel exists on to its limits; on any other device
    type every call is refused by device.
    """

    kernel_name: str = ""
    _limits: dict[str, Limits] = {}
    needs_unit_last_stride = True

    def limits(self, device_type: str) -> Limits | None:
        found = self._limits.get(device_type)
        if found is None and self._limits:
            return Limits(devices=frozenset(self._limits))
        return found

    @property
    def sdp_backend(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, self.kernel_name)

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        if facts.in_graph and not dynamo_traces_sdpa_kernel():
            return [f"pinning an SDPA kernel inside torch.compile: the dynamo of torch {torch.__version__} cannot trace sdpa_kernel"]
        return []

    def check_available(self) -> str | None:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError:
            return "torch.nn.attention.sdpa_kernel needs torch >= 2.3"
        if not hasattr(SDPBackend, self.kernel_name):
            return f"this torch ({torch.__version__}) has no SDPBackend.{self.kernel_name}"
        return None

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        from torch.nn.attention import sdpa_kernel

        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if enable_gqa:
            kwargs["enable_gqa"] = True
        if torch.compiler.is_compiling():
            with sdpa_kernel([self.sdp_backend]):
                return F.scaled_dot_product_attention(query, key, value, **kwargs)
        if self.needs_unit_last_stride:
            # Every fused kernel wants the last dim contiguous (check_last_dim_stride_equals_1);
            # XCiT's XCA and CPUBone/LowFormer pass transposed views. Refuse before PyTorch does
            # (and warns), so the fallback is quiet and explained.
            strides = [t.stride(-1) for t in (query, key, value) if t.size(-1) != 1]
            if any(st != 1 for st in strides):
                raise BackendRefused(
                    f"query/key/value last-dim strides {tuple(t.stride(-1) for t in (query, key, value))}: "
                    "fused kernels need the head dim contiguous (stride 1)"
                )
            if attn_mask is not None and query.is_cuda and attn_mask.size(-1) != 1 and attn_mask.stride(-1) != 1:
                raise BackendRefused(f"attn_mask last-dim stride {attn_mask.stride(-1)}: fused CUDA kernels need 1")
        try:
            with PIN_LOCK, sdpa_kernel([self.sdp_backend]):
                return F.scaled_dot_product_attention(query, key, value, **kwargs)
        except RuntimeError as exc:
            if _NO_KERNEL not in str(exc):
                raise
            # PyTorch explains each refusal in a UserWarning; run the selection again to keep them.
            with warnings.catch_warnings(record=True) as caught, PIN_LOCK, sdpa_kernel([self.sdp_backend]):
                warnings.simplefilter("always")
                try:
                    F.scaled_dot_product_attention(query, key, value, **kwargs)
                except RuntimeError:
                    pass
            said = [_strip_origin(str(w.message)) for w in caught]
            said = [m for m in said if m and not m.endswith("kernel not used because:")]
            raise BackendRefused(
                "PyTorch refused the call: " + (" ".join(said) if said else "no reason given (mask requires grad, or its shape)")
            ) from None


@functools.lru_cache(maxsize=None)
def dynamo_traces_sdpa_kernel() -> bool:
    """Whether dynamo can trace ``sdpa_kernel`` (torch 2.5's cannot: a pinned kernel breaks the graph).

    Asked only while tracing, when dynamo is already imported."""
    from torch._dynamo.variables import ctx_manager

    return hasattr(ctx_manager, "SDPAKernelVariable")


def _strip_origin(message: str) -> str:
    return message.split(" (Triggered internally at")[0].strip()


class SdpaMathBackend(PinnedSdpaBackend):
    name = "sdpa_math"
    kernel_name = "MATH"
    needs_unit_last_stride = False
    description = "SDPA pinned to the math kernel (PyTorch's reference; every feature)"
    accepts_everything = True


class SdpaFlashBackend(PinnedSdpaBackend):
    name = "sdpa_flash"
    kernel_name = "FLASH_ATTENTION"
    description = "SDPA pinned to FlashAttention-2 (CUDA) or the CPU flash kernel"
    _limits = {
        "cpu": Limits(
            dtypes=_CPU_FLASH_DTYPES,
            ndims=frozenset({4}),
            v_head_dim_differs=False,
            mask_grad=False,
            mask_ndims=frozenset({2, 4}),
            kv_batch_broadcast=False,
            dropout=False,
        ),
        "cuda": Limits(
            dtypes=_HALF,
            ndims=frozenset({4}),
            max_head_dim=256,
            v_head_dim_differs=False,
            additive_mask=False,
            bool_mask=False,
            causal_unequal_lengths=False,
            kv_batch_broadcast=False,
            min_cuda_capability=(8, 0),
            max_cuda_capability=(12, 1),
        ),
    }

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        out = super().extra_reasons(facts) + head_count_reasons(facts, same_kv_heads=True)
        if facts.device_type == "cuda" and facts.needs_grad:
            cap = cuda_capability(facts.device_index)
            if (8, 6) <= cap <= (8, 9) or (12, 0) <= cap <= (12, 1):
                d = facts.head_dim
                if 192 < d <= 224 or (224 < d <= 256 and facts.dropout_p > 0):
                    out.append(f"training with head_dim {d} is not supported on sm{cap[0]}{cap[1]}")
        return out


class SdpaEfficientBackend(PinnedSdpaBackend):
    name = "sdpa_efficient"
    kernel_name = "EFFICIENT_ATTENTION"
    description = "SDPA pinned to the memory-efficient (cutlass) kernel; takes masks with gradient"
    _limits = {
        "cuda": Limits(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            ndims=frozenset({4}),
            mask_dtype_matches_query=True,
            kv_batch_broadcast=False,
            min_cuda_capability=(5, 0),
            max_cuda_capability=(12, 1),
        )
    }

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        out = super().extra_reasons(facts)
        if facts.device_type != "cuda":
            return out
        out += head_count_reasons(facts, same_kv_heads=True)
        cap = cuda_capability(facts.device_index)
        if facts.dtype == torch.bfloat16 and cap < (8, 0):
            out.append("bfloat16 needs compute capability >= 8.0")
        if cap >= (8, 0):
            align = 4 if facts.dtype == torch.float32 else 8
        elif cap >= (7, 0):
            align = 1 if facts.dtype == torch.float32 else 8
        else:
            align = 1
        for label, d in (("head_dim", facts.head_dim), ("value head_dim", facts.v_head_dim)):
            if d % align:
                out.append(f"{label} {d} is not a multiple of {align} for {str(facts.dtype)[6:]}")
        if facts.dropout_p > 0 and facts.q_shape and facts.as_4d().q_shape[0] > 65535:
            out.append("dropout with batch size > 65535")
        return out


class SdpaCudnnBackend(PinnedSdpaBackend):
    name = "sdpa_cudnn"
    kernel_name = "CUDNN_ATTENTION"
    description = "SDPA pinned to cuDNN attention (Hopper/Blackwell fast path)"
    _limits = {
        "cuda": Limits(
            dtypes=_HALF,
            ndims=frozenset({4}),
            head_dim_multiple=8,
            mask_grad=False,
            mask_ndims=frozenset({2, 4}),
            kv_batch_broadcast=False,
            causal_unequal_lengths=False,  # cuDNN's corner for L != S is unverified: refuse, never guess
            min_cuda_capability=(8, 0),
            max_cuda_capability=(12, 1),
        )
    }

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        out = super().extra_reasons(facts)
        if facts.device_type != "cuda":
            return out
        out += head_count_reasons(facts, same_kv_heads=False)
        cap = cuda_capability(facts.device_index)
        version = torch.backends.cudnn.version() or 0
        big = (cap == (9, 0) or cap[0] == 10) and version > 92200
        limit = 256 if big else 128
        d, dv = facts.head_dim, facts.v_head_dim
        pair_ok = (d, dv) == (192, 128) and (cap == (9, 0) or cap[0] == 10) and version >= 91100
        if (d > limit or dv > limit) and not pair_ok:
            out.append(f"head dims ({d}, {dv}) > {limit} for cuDNN {version} on sm{cap[0]}{cap[1]}")
        if big and facts.needs_grad and not (max(d, dv) <= 128 or (d, dv) in ((192, 128), (256, 256))):
            out.append(f"backward with head dims ({d}, {dv}) is not supported by cuDNN")
        if facts.kv_len == 1:
            out.append("kv_len 1 is not supported")
        if facts.q_len == 1 and facts.dropout_p > 0:
            out.append("q_len 1 with dropout is not supported")
        if facts.dropout_p > 0:
            if (facts.dropout_p * 16) % 1:
                out.append(f"dropout_p={facts.dropout_p} is not a multiple of 1/16")
            if 91100 < version < 91400:
                out.append(f"dropout is broken in cuDNN {version}")
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            out.append("deterministic algorithms are on (cuDNN attention is not deterministic)")
        batch, heads = facts.as_4d().q_shape[:2]
        if batch > 65535 or heads > 65535:
            out.append("batch or heads > 65535")
        if facts.mask_kind == MASK_ADDITIVE and facts.mask_dtype not in (facts.dtype, torch.float32):
            out.append("additive attn_mask dtype must be the query dtype or float32")
        return out
