"""``flex``: ``torch.nn.attention.flex_attention``, compiled.

An additive mask becomes a ``score_mod`` that adds the captured bias tensor; a boolean
mask and ``is_causal`` become a ``BlockMask`` (so fully masked blocks are skipped), and every
other call gets a full ``BlockMask`` of 128-token blocks (see :func:`full_block_mask`). Flex is
only fast compiled, so each distinct call signature gets its own compiled function, kept
in a bounded cache: repeated calls never recompile, and no signature can push another
past dynamo's recompile limit. Under an outer ``torch.compile`` the uncompiled functions
are used so the caller's graph inlines them.

Flex has no dropout (refused). On CPU (torch >= 2.6, needs a C++ compiler) it has no
backward and no float64 (refused); on CUDA it needs Triton.

On CPU, inductor's kernel computes wrong values (or NaN) in one shape region on CPUs whose
vector unit holds fewer than 16 floats (AVX2, NEON): see :func:`cpu_kernel_miscomputes`.
Those calls are refused with the reason, so they fall back.
"""

from __future__ import annotations

import collections
import functools
import os
import shutil
import threading
import types
from typing import Callable

import torch
from packaging.version import Version

from ..call import CallFacts
from ..errors import BackendRefused
from ..structure.decomposed import KIND as DECOMPOSED, DecomposedRelPos
from ..structure.table import KIND as TABLE, TableGather
from ..structure.windows import KIND as WINDOWS, WindowedBias
from .base import Backend, Limits

_LOW = frozenset({torch.float32, torch.float16, torch.bfloat16})
_TORCH = Version(torch.__version__.split("+")[0])
_CACHE_SIZE = 128


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


#: query and key rows per BlockMask block (flex's default)
BLOCK = 128


def full_block_mask(q_len: int, kv_len: int, device: torch.device):
    """A ``BlockMask`` of ``BLOCK``-sized blocks that are all full (nothing masked).

    Without a block mask flex treats the whole sequence as one block; inductor's CPU kernel
    then sizes its scratch to it: two ``threads × q_len × kv_len`` float buffers per call (265 MB
    at 4096 tokens with 2 threads, measured; N² per thread). With blocks of 128 the scratch is a
    few MB and the kernel is faster (BENCHMARKS.md). Built from block counts, so no mask is
    evaluated and nothing N×N is made; under compile it is a few tiny tensors in the graph.
    None where this torch's ``BlockMask`` cannot be built that way (flex then uses its default)."""
    if not _BLOCKS_TAKE_LENGTHS:
        return None
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    return BlockMask.from_kv_blocks(
        torch.zeros(1, 1, nq, dtype=torch.int32, device=device),
        torch.zeros(1, 1, nq, nk, dtype=torch.int32, device=device),
        torch.full((1, 1, nq), nk, dtype=torch.int32, device=device),
        torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous(),
        BLOCK_SIZE=BLOCK,
        seq_lengths=(q_len, kv_len),
    )


def _from_kv_blocks_takes_lengths() -> bool:
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


#: set when the backend is first probed (a plain global, so traced code reads a constant)
_BLOCKS_TAKE_LENGTHS = False


def _plain(query, key, value, scale, enable_gqa):
    flex_attention, _ = _flex()
    block_mask = full_block_mask(query.size(-2), key.size(-2), query.device)
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _with_bias(query, key, value, bias, scale, enable_gqa):
    flex_attention, _ = _flex()

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    block_mask = full_block_mask(query.size(-2), key.size(-2), query.device)
    return flex_attention(query, key, value, score_mod=add_bias, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _with_decomposed(query, key, value, rel_h, rel_w, prefix, scale, enable_gqa):
    """A decomposed relative-position bias read from its factors: key ``j`` is grid cell
    ``(j // kw, j % kw)``; the bias element is the factors' sum, as the module computes it. The
    first ``prefix`` queries and keys (a class token) have no bias."""
    flex_attention, _ = _flex()
    kw = rel_w.size(-1)

    if prefix:
        def add_rel_pos(score, b, h, q_idx, kv_idx):
            inner = (q_idx >= prefix) & (kv_idx >= prefix)
            qi = torch.where(inner, q_idx - prefix, 0)
            ki = torch.where(inner, kv_idx - prefix, 0)
            return score + torch.where(inner, rel_h[b, h, qi, ki // kw] + rel_w[b, h, qi, ki % kw], 0.0)
    else:
        def add_rel_pos(score, b, h, q_idx, kv_idx):
            return score + (rel_h[b, h, q_idx, kv_idx // kw] + rel_w[b, h, q_idx, kv_idx % kw])

    block_mask = full_block_mask(query.size(-2), key.size(-2), query.device)
    return flex_attention(
        query, key, value, score_mod=add_rel_pos, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa
    )


def _with_table(query, key, value, table, index, prefix, scale, enable_gqa):
    """A bias gathered from its table per score: ``table[index[q · Nk + kv], h]``; no N×N tensor.
    The first ``prefix`` rows and columns (class tokens before the grid) have a zero bias."""
    flex_attention, _ = _flex()
    kv_len = key.size(-2)

    if prefix:
        grid = kv_len - prefix

        def add_table(score, b, h, q_idx, kv_idx):
            inner = (q_idx >= prefix) & (kv_idx >= prefix)
            at = torch.where(inner, (q_idx - prefix) * grid + (kv_idx - prefix), 0)
            return score + torch.where(inner, table[index[at], h], 0.0)
    else:
        def add_table(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx * kv_len + kv_idx], h]

    block_mask = full_block_mask(query.size(-2), kv_len, query.device)
    return flex_attention(query, key, value, score_mod=add_table, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _with_windows(query, key, value, table, index, mask, scale, enable_gqa):
    """Shifted windows: batch entry ``b`` is window ``b % nW`` of its image; its score gets the
    window's table-gathered bias plus that window's mask (timm adds the two before the call)."""
    flex_attention, _ = _flex()
    kv_len, windows = key.size(-2), mask.size(0)

    def add_windowed(score, b, h, q_idx, kv_idx):
        return score + (table[index[q_idx * kv_len + kv_idx], h] + mask[b % windows, q_idx, kv_idx])

    block_mask = full_block_mask(query.size(-2), kv_len, query.device)
    return flex_attention(
        query, key, value, score_mod=add_windowed, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa
    )


def _with_bool_mask(query, key, value, mask, scale, enable_gqa):
    flex_attention, create_block_mask = _flex()
    # The kernel reads the mask at every (b, h) of the call, so it is indexed expanded (a view);
    # the block mask itself only needs the dims the mask really has.
    full = mask.expand(query.size(0), query.size(1), query.size(-2), key.size(-2))

    def keep(b, h, q_idx, kv_idx):
        return full[b, h, q_idx, kv_idx]

    block_mask = create_block_mask(
        keep,
        None if mask.stride(0) == 0 or mask.size(0) == 1 else mask.size(0),
        None if mask.stride(1) == 0 or mask.size(1) == 1 else mask.size(1),
        query.size(-2),
        key.size(-2),
        device=query.device,
    )
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _causal_top_left(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _causal(query, key, value, scale, enable_gqa):
    flex_attention, create_block_mask = _flex()
    block_mask = create_block_mask(_causal_top_left, None, None, query.size(-2), key.size(-2), device=query.device)
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _distinct(query, key, value):
    """``key`` and ``value`` as tensor objects distinct from each other and from ``query``.

    Dynamo turns one tensor passed twice into one graph input, and inductor's CPU flex lowering
    before torch 2.13 rejects that ("query, key, value are the same buffer"). A view is a new
    graph input over the same memory: nothing is copied. (Inside a caller's graph a view is
    still the same buffer, so there that torch is refused instead: see ``extra_reasons``.)"""
    value_repeats = value is query or value is key
    if key is query:
        key = key.view(key.shape)
    if value_repeats:
        value = value.view(value.shape)
    return key, value


def _own_code_copy(fn: Callable, tag: int) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo keeps one cache (and one recompile
    budget) per code object, so each call signature compiles exactly once."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_sig{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class FlexBackend(Backend):
    name = "flex"
    description = "flex_attention, compiled per call signature; bias as score_mod, masks as BlockMask"

    _cpu = Limits(
        dtypes=_LOW,
        ndims=frozenset({4}),
        kv_batch_broadcast=False,
        dropout=False,
        backward=False,
    )
    _cuda = Limits(dtypes=_LOW, ndims=frozenset({4}), kv_batch_broadcast=False, dropout=False)
    structures = frozenset({DECOMPOSED, TABLE, WINDOWS})
    compiles_per_shape = True

    def __init__(self) -> None:
        self._compiled: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._tags = 0

    def check_available(self) -> str | None:
        if _TORCH < Version("2.5"):
            return f"flex_attention needs torch >= 2.5 (found {torch.__version__})"
        try:
            _flex()
        except ImportError as exc:
            return f"torch.nn.attention.flex_attention cannot be imported: {exc}"
        global _BLOCKS_TAKE_LENGTHS
        _BLOCKS_TAKE_LENGTHS = _from_kv_blocks_takes_lengths()
        return None

    def limits(self, device_type: str) -> Limits | None:
        if device_type == "cpu":
            return self._cpu
        if device_type == "cuda":
            return self._cuda
        return Limits(devices=frozenset({"cpu", "cuda"}))

    def extra_reasons(self, facts: CallFacts) -> list[str]:
        out: list[str] = []
        hq, hk, hv = facts.q_heads, facts.kv_heads, facts.v_shape[-3]
        if hk != hv:
            out.append(f"key heads {hk} != value heads {hv}")
        elif hq != hk and hq % hk:
            out.append(f"query heads {hq} not divisible by key/value heads {hk}")
        elif hq != hk and not facts.enable_gqa and hk != 1:
            out.append(f"query heads {hq} vs key/value heads {hk} without enable_gqa")
        if facts.device_type == "cpu":
            if _TORCH < Version("2.6"):
                out.append(f"flex_attention on CPU needs torch >= 2.6 (found {torch.__version__})")
            if not _cpp_compiler():
                out.append("no C++ compiler found for inductor's CPU code (set CXX or install g++)")
            elif _TORCH >= Version("2.6"):
                out.extend(_cpu_kernel_reasons(facts.head_dim, facts.kv_len))
            if facts.in_graph and _TORCH < Version("2.13"):
                out.append(
                    f"inside a torch.compile graph on CPU, torch {torch.__version__}'s inductor cannot lower flex when "
                    "query/key/value share a buffer (a fused qkv projection); torch >= 2.13 can"
                )
            elif facts.in_graph and facts.has_mask:
                # inductor's CPU flex lowering asserts when score_mod/mask_mod read a tensor computed
                # inside the same graph (a bias from a rel-pos table, say): torch 2.14 limitation
                out.append("attn_mask inside a torch.compile graph on CPU (inductor cannot lower it for flex)")
        elif facts.device_type == "cuda" and not _has_triton():
            out.append("flex_attention on CUDA needs triton (pip install triton)")
        return out

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p:
            raise BackendRefused("flex_attention has no dropout")
        gqa = enable_gqa or key.size(-3) != query.size(-3)
        if not torch.compiler.is_compiling():
            key, value = _distinct(query, key, value)
        if is_causal:
            variant, extra = _causal, ()
        elif attn_mask is None:
            variant, extra = _plain, ()
        elif isinstance(attn_mask, DecomposedRelPos):
            b, h, lq = query.size(0), query.size(1), query.size(2)
            rows = lq - attn_mask.prefix
            rel_h, rel_w = (
                f.to(query.dtype).expand(b, h, rows, f.size(-1)) for f in (attn_mask.rel_h, attn_mask.rel_w)
            )
            variant, extra = _with_decomposed, (rel_h, rel_w, attn_mask.prefix)
        elif isinstance(attn_mask, WindowedBias):
            table, index = attn_mask.table()
            dtype = attn_mask.dtype  # timm adds bias and mask in their promoted dtype
            variant, extra = _with_windows, (table.to(dtype), index, attn_mask.mask.to(dtype))
        elif isinstance(attn_mask, TableGather):
            variant, extra = _with_table, (attn_mask.table.to(query.dtype), attn_mask.index, attn_mask.prefix)
        else:
            b, h, lq, lk = query.size(0), query.size(1), query.size(2), key.size(2)
            mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            if mask.dtype == torch.bool:
                variant, extra = _with_bool_mask, (mask,)
            else:
                variant, extra = _with_bias, (mask.to(query.dtype).expand(b, h, lq, lk),)
        if torch.compiler.is_compiling():
            return variant(query, key, value, *extra, scale, gqa)
        sig = (variant.__name__, scale, gqa, torch.is_grad_enabled()) + tuple(
            (t.device, t.dtype, tuple(t.shape), t.stride(), t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in (query, key, value, *extra)
        )
        fn = self._compiled.get(sig)
        if fn is not None:
            self._compiled.move_to_end(sig)
            return fn(query, key, value, *extra, scale, gqa)
        with self._lock:
            self._tags += 1
            fn = torch.compile(_own_code_copy(variant, self._tags), dynamic=False, fullgraph=True)
        try:
            out = fn(query, key, value, *extra, scale, gqa)
        except Exception as exc:  # compilation is the first call; its failure is a refusal, not a crash
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BackendRefused(f"flex_attention could not compile this call: {type(exc).__name__}: {first}") from None
        with self._lock:
            self._compiled[sig] = fn
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return out

    def compiled_signatures(self) -> int:
        """How many call signatures have a compiled kernel in the cache."""
        return len(self._compiled)


#: the key-sequence tile of inductor's CPU q·kᵀ micro-kernel (``GemmBlocking(1, 16, 1)``)
_QK_TILE = 16


def cpu_kernel_miscomputes(head_dim: int, kv_len: int, lanes: int) -> bool:
    """Whether inductor's CPU flex kernel computes this call's scores wrongly (torch 2.7 to 2.14 at least).

    The kernel multiplies q by kᵀ in tiles of 16 keys (``CppMicroGemmFP32Vec`` with a
    transposed B, ``torch/_inductor/codegen/cpp_micro_gemm.py``). For a head dim that is a
    multiple of the vector width and below 24 it takes a path written for whole 16-key tiles,
    and it also takes that path for the last, partial tile whenever the tile's width is a
    multiple of the vector width. With vectors of 16 floats (AVX-512) no partial tile qualifies;
    with fewer (AVX2: 8, NEON: 4) a tail of 8 keys (or 4, 8, 12) reads past the keys and writes
    scores past the row it belongs to: wrong values or NaN, varying with whatever memory follows.
    Key blocks are whole multiples of 16 (one block without a block mask, 128 with one), so the
    partial tile is ``kv_len % 16`` wide.

    Measured (torch 2.14.1, ``ATEN_CPU_CAPABILITY=avx2``, ``tests/backends/flex_kernel_sweep.py``):
    every head dim 1..40, 48, 56, 64 against kv lengths 1..40, 47, 48, 63, 64, 65, 130 and query
    lengths 1, 5, 17; wrong exactly at head dims 8 and 16 with kv_len 8, 24, 40. With AVX-512,
    none wrong.
    """
    if lanes >= _QK_TILE:
        return False
    tail = kv_len % _QK_TILE
    return head_dim % lanes == 0 and head_dim < 24 and tail != 0 and tail % lanes == 0


def _cpu_kernel_reasons(head_dim: int, kv_len: int) -> list[str]:
    isa = cpu_vector_isa()
    if isa is not None and isa[1] == 0:
        return [
            "inductor finds no SIMD instruction set it can compile CPU kernels for (ATEN_CPU_CAPABILITY=default?), "
            "so flex has no CPU kernel here"
        ]
    # unknown instruction set: assume the narrow widths the rule is known for
    name, widths = (isa[0], (isa[1],)) if isa is not None else ("unknown vector unit", (4, 8))
    bad = [w for w in widths if cpu_kernel_miscomputes(head_dim, kv_len, w)]
    if not bad:
        return []
    return [
        f"head_dim {head_dim} with kv_len {kv_len} on a CPU with {bad[0]}-float vectors ({name}): inductor's CPU "
        f"flex kernel computes wrong scores there (its q·kᵀ micro-kernel overruns the last {kv_len % _QK_TILE} keys; "
        "see attnswap.backends.flex.cpu_kernel_miscomputes)"
    ]


@functools.lru_cache(maxsize=None)
def cpu_vector_isa() -> tuple[str, int] | None:
    """The vector instruction set inductor compiles CPU kernels for, and its floats per vector
    (0: none, so no CPU flex kernel); None when it cannot be asked. The first call compiles a probe
    (seconds), as inductor's first compile would."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
        return (str(isa), int(isa.nelements(torch.float32))) if isa else ("none", 0)
    except Exception:  # a private API: any change in it means "unknown", judged conservatively
        return None


@functools.lru_cache(maxsize=None)
def _cpp_compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
