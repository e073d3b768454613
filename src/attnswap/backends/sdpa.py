"""``sdpa`` (PyTorch chooses) and the pinned kernels ``sdpa_flash``, ``sdpa_efficient``,
``sdpa_cudnn``, ``sdpa_math``.

A pinned backend calls its kernel's own ATen operator (``_scaled_dot_product_attention_math``,
``_scaled_dot_product_flash_attention_for_cpu``, ``_scaled_dot_product_flash_attention``,
``_scaled_dot_product_efficient_attention``, ``_scaled_dot_product_cudnn_attention``), doing
around it exactly what ``F.scaled_dot_product_attention`` does when it has chosen that kernel
(``aten/src/ATen/native/transformers/attention.cpp``): a boolean mask becomes an additive one
(-inf where False), the CUDA flash kernel gets its head dim padded to a multiple of 8 and the
unpadded scale, the efficient kernel gets its bias aligned and expanded. No process-global
state is touched, so pinned calls from several threads run in parallel and never change which
kernel another thread's SDPA call gets; the call also costs what SDPA itself costs, where
``torch.nn.attention.sdpa_kernel`` added 8 to 60 µs per call. On CPU the result is bitwise
SDPA's under ``sdpa_kernel`` (``tests/backends/test_sdpa.py``); the CUDA recipes are checked
on a GPU by ``benchmarks/gpu_check.py``.

Each pinned kernel declares the limits PyTorch's own selector enforces
(``aten/src/ATen/native/transformers/{sdp_utils_cpp.h,cuda/sdp_utils.cpp}``), so a call it
cannot take is refused with reasons before the kernel is ever called.

Torch versions outside the range this was read and measured for (2.5 to 2.14), and devices
without a recipe here (MPS, XPU, ...), pin with ``sdpa_kernel`` instead. Its switches are
process-global and restore on exit what they found, so those pins hold :data:`PIN_LOCK`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import threading
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from packaging.version import Version

from ..call import MASK_ADDITIVE, MASK_BOOL, MASK_NONE, CallFacts
from ..errors import BackendRefused
from .base import AttentionFn, Backend, Limits, cuda_capability, head_count_reasons

_HALF = frozenset({torch.float16, torch.bfloat16})
_CPU_FLASH_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_NO_KERNEL = "No available kernel"
_TORCH = Version(torch.__version__.split("+")[0])
#: the torch versions whose SDPA dispatcher the direct operator calls reproduce
DIRECT_OPS = Version("2.5") <= _TORCH < Version("2.15")
#: what a boolean mask's False becomes for cuDNN (2.14 converts for every kernel alike)
_CUDNN_MASKED = float("-inf") if _TORCH >= Version("2.14") else -65504.0
#: held while a pinned backend's ``sdpa_kernel`` flags are set (they are process-global)
PIN_LOCK = threading.RLock()


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, masked: float = float("-inf")) -> torch.Tensor | None:
    """SDPA's ``convert_boolean_attn_mask``: True -> 0, False -> ``masked``, in ``dtype``;
    a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.scalar_tensor(masked, dtype=dtype, device=mask.device))


def _lse_needed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """SDPA's ``should_compute_logsumexp``: the backward needs it."""
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def _refuse_strided(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Refuse q/k/v whose head dim is not contiguous (``check_last_dim_stride_equals_1``); XCiT's
    XCA and CPUBone/LowFormer pass such views, and SDPA gives them the math kernel. The CPU flash
    operator called on them anyway computes garbage (measured: 850 of 3,000 random strided calls
    wrong), so this is a correctness rule, not only PyTorch's selection."""
    strides = [t.stride()[-1] for t in (query, key, value) if t.size(-1) != 1]
    if any(st != 1 for st in strides):
        raise BackendRefused(
            f"query/key/value last-dim strides {tuple(t.stride()[-1] for t in (query, key, value))}: "
            "fused kernels need the head dim contiguous (stride 1)"
        )


def math_kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's math kernel (any device but MPS, whose math SDPA runs elsewhere)."""
    if query.is_mps:
        return _pinned(SdpaMathBackend.kernel_name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = additive_mask(attn_mask, query.dtype)
    return torch._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
    )[0]


def _cpu_flash_kernel(facts: CallFacts) -> AttentionFn:
    op = torch._scaled_dot_product_flash_attention_for_cpu
    checked = not facts.in_graph  # a traced graph holds no refusal: inductor lays inputs out for the kernel
    convert = facts.mask_kind == MASK_BOOL
    # GQA needs no flag: the kernel maps query heads to key/value heads itself

    if facts.mask_kind == MASK_NONE and not facts.is_causal and facts.scale is None:
        # the plain call (most of them): every argument the operator parses costs ~0.1 us
        def cpu_flash_plain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if checked and (query.stride()[-1] != 1 or key.stride()[-1] != 1 or value.stride()[-1] != 1):
                _refuse_strided(query, key, value)
            return op(query, key, value)[0]

        return cpu_flash_plain

    def cpu_flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if checked and (query.stride()[-1] != 1 or key.stride()[-1] != 1 or value.stride()[-1] != 1):
            _refuse_strided(query, key, value)
        if convert:
            attn_mask = additive_mask(attn_mask, query.dtype)
        return op(query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]

    return cpu_flash


def _cuda_flash_kernel(facts: CallFacts) -> AttentionFn:
    checked = not facts.in_graph  # a traced graph holds no refusal: inductor lays inputs out for the kernel
    op = torch._scaled_dot_product_flash_attention
    head_dim = facts.head_dim
    pad = -head_dim % 8
    unpadded_scale = 1.0 / math.sqrt(head_dim)  # SDPA's calculate_scale, on the unpadded head dim

    def cuda_flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if checked:
            _refuse_strided(query, key, value)
        if pad:
            query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        out = op(query, key, value, dropout_p, is_causal, False, scale=unpadded_scale if scale is None else scale)[0]
        return out[..., :head_dim] if pad else out

    return cuda_flash


def _aligned_bias(bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """SDPA's ``preprocess_mask`` for the efficient kernel: rows 8-aligned in memory, expanded."""
    if bias.stride(-1) != 1 or any(bias.stride(i) % 8 for i in range(bias.dim() - 1)):
        kv_len = bias.size(-1)
        bias = F.pad(bias, (0, 8 - kv_len % 8))[..., :kv_len]
    return bias.expand(query.size(0), query.size(1), query.size(2), key.size(2))


def _cuda_efficient_kernel(facts: CallFacts) -> AttentionFn:
    checked = not facts.in_graph  # a traced graph holds no refusal: inductor lays inputs out for the kernel
    op = torch._scaled_dot_product_efficient_attention
    has_mask = facts.mask_kind != MASK_NONE

    def cuda_efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if checked:
            _refuse_strided(query, key, value)
        if has_mask:
            attn_mask = _aligned_bias(additive_mask(attn_mask, query.dtype), query, key)
        return op(query, key, value, attn_mask, _lse_needed(query, key, value), dropout_p, is_causal, scale=scale)[0]

    return cuda_efficient


def _cuda_cudnn_kernel(facts: CallFacts) -> AttentionFn:
    checked = not facts.in_graph  # a traced graph holds no refusal: inductor lays inputs out for the kernel
    op = torch._scaled_dot_product_cudnn_attention
    convert = facts.mask_kind == MASK_BOOL

    def cuda_cudnn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if checked:
            _refuse_strided(query, key, value)
        if convert:
            attn_mask = additive_mask(attn_mask, query.dtype, _CUDNN_MASKED)
        lse = _lse_needed(query, key, value)
        return op(query, key, value, attn_mask, lse, dropout_p, is_causal, False, scale=scale)[0]

    return cuda_cudnn


def _pinned(kernel_name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA under ``sdpa_kernel``: for torch versions and devices without a direct recipe."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, kernel_name)
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        kwargs["enable_gqa"] = True
    if torch.compiler.is_compiling():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(query, key, value, **kwargs)
    try:
        with PIN_LOCK, sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(query, key, value, **kwargs)
    except RuntimeError as exc:
        if _NO_KERNEL not in str(exc):
            raise
        # PyTorch explains each refusal in a UserWarning; run the selection again to keep them.
        with warnings.catch_warnings(record=True) as caught, PIN_LOCK, sdpa_kernel([backend]):
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

    def varlen_reasons(self, facts: CallFacts) -> list[str]:
        """PyTorch's own varlen kernel (``torch.nn.attention.varlen.varlen_attn``: FlashAttention-2, or
        cuDNN where it picks it), as its source checks: CUDA, fp16/bf16, equal head dims up to 256."""
        if facts.device_type != "cuda":
            return ["torch's varlen_attn runs on CUDA only"]
        fn, takes_gqa = torch_varlen()
        if fn is None:
            return [f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"]
        out = []
        if facts.dtype not in _HALF:
            out.append(f"dtype {str(facts.dtype)[6:]} (varlen_attn takes float16 and bfloat16)")
        if facts.v_head_dim != facts.head_dim or facts.head_dim > 256 or facts.head_dim % 8:
            out.append(f"head dims ({facts.head_dim}, {facts.v_head_dim}) (varlen_attn: equal, a multiple of 8, up to 256)")
        if facts.grouped_heads and not takes_gqa:
            out.append(f"grouped key/value heads (varlen_attn in torch {torch.__version__} has no enable_gqa)")
        if cuda_capability(facts.device_index) < (8, 0):
            out.append("varlen_attn needs compute capability >= 8.0")
        return out

    def varlen(self, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lengths_q, lengths_k,
               scale=None, enable_gqa=False):
        fn, takes_gqa = torch_varlen()
        extra = {"enable_gqa": True} if takes_gqa and key.shape[-2] != query.shape[-2] else {}
        return fn(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, **extra)


@functools.lru_cache(maxsize=None)
def torch_varlen() -> tuple[Callable | None, bool]:
    """``torch.nn.attention.varlen.varlen_attn`` where this torch has it, and whether it takes
    ``enable_gqa`` (added after 2.11)."""
    try:
        fn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        return None, False
    return fn, "enable_gqa" in inspect.signature(fn).parameters


class PinnedSdpaBackend(Backend):
    """SDPA restricted to one kernel: its own operator where this module has its recipe,
    ``sdpa_kernel`` elsewhere.

    ``_limits`` maps each device type the kernel exists on to its limits; on any other device
    type every call is refused by device. ``_direct`` maps device types to a function of the
    call's facts that returns the direct call.
    """

    kernel_name: str = ""
    _limits: dict[str, Limits] = {}
    _direct: dict[str, object] = {}
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
        out = []
        if facts.in_graph and not dynamo_traces_sdpa_kernel():
            out.append(f"pinning an SDPA kernel inside torch.compile: the dynamo of torch {torch.__version__} cannot trace sdpa_kernel")
        if self._limits and (facts.q_len == 0 or facts.kv_len == 0):
            # SDPA returns zeros without calling a kernel; the CPU flash operator dies (SIGFPE)
            out.append("an empty query or key sequence (SDPA computes no attention there)")
        return out

    def check_available(self) -> str | None:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError:
            return "torch.nn.attention.sdpa_kernel needs torch >= 2.3"
        if not hasattr(SDPBackend, self.kernel_name):
            return f"this torch ({torch.__version__}) has no SDPBackend.{self.kernel_name}"
        return None

    def runs_directly(self, device_type: str) -> bool:
        """Whether calls on ``device_type`` go to the kernel's own operator (no global switch)."""
        return DIRECT_OPS and device_type in self._direct

    def kernel_for(self, facts: CallFacts) -> AttentionFn:
        if self.runs_directly(facts.device_type):
            return self._direct[facts.device_type](facts)
        return self.kernel

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # A router's plan calls kernel_for(facts)'s function; a direct call decides here
        if self.runs_directly(query.device.type):
            from ..call import facts_of

            facts = facts_of(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            return self.kernel_for(facts)(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if self.needs_unit_last_stride and not torch.compiler.is_compiling():
            _refuse_strided(query, key, value)
            if attn_mask is not None and query.is_cuda and attn_mask.size(-1) != 1 and attn_mask.stride(-1) != 1:
                raise BackendRefused(f"attn_mask last-dim stride {attn_mask.stride(-1)}: fused CUDA kernels need 1")
        return _pinned(self.kernel_name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


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

    def runs_directly(self, device_type: str) -> bool:
        return DIRECT_OPS and device_type != "mps"

    @property
    def kernel(self) -> AttentionFn:
        return math_kernel if DIRECT_OPS else self.__call__

    def kernel_for(self, facts: CallFacts) -> AttentionFn:
        return self.kernel

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if DIRECT_OPS:
            return math_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        return _pinned(self.kernel_name, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


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
    _direct = {"cpu": _cpu_flash_kernel, "cuda": _cuda_flash_kernel}

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
    _direct = {"cuda": _cuda_efficient_kernel}

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        out = super().extra_reasons(facts)
        if facts.device_type != "cuda":
            return out
        out += head_count_reasons(facts, same_kv_heads=True)
        if facts.grouped_heads and self.runs_directly("cuda"):
            # the operator takes equal head counts; SDPA's selector refuses it grouped heads
            out.append(f"{facts.q_heads} query heads with {facts.kv_heads} key/value heads (the kernel needs equal counts)")
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

    _direct = {"cuda": _cuda_cudnn_kernel}

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
