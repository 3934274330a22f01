"""The small per-layer kernels of a decode step, fused: RoPE + KV-cache write, residual add + RMSNorm, SwiGLU.

A decode step of a small model is launch-bound: in a CUDA graph every kernel still costs a launch however
little it does. In torch, RoPE on q and k is eight kernels (multiply, copy, roll, multiply-add, twice)
plus the cache write, the residual add is a kernel of its own before each RMSNorm, and SwiGLU is two. Here each
of those groups is one kernel, computed in float32 and rounded once, so the results are as close to float64 as
the dtype allows (torch's op-by-op versions round after every op).

Every kernel takes raw addresses (``data_ptr()``) and sizes, launched through ``runtime.launch`` (no per-array
wrapping on eager steps). They move *items* of 16 bytes (``_item_codec``: 8 fp16/bf16 or 4 fp32 values) when
every row is made of whole, 16-byte aligned items, else items of one 32-bit word: at 8,192 prefill tokens the
word-sized loads left the norm, SwiGLU and RoPE at a sixth, a half and a third of the memory bandwidth. RoPE
and the norm run one block per token, SwiGLU a row of blocks per token; the comment above each names its grid,
thread roles, addresses and indices.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from . import validation as V
from .common import DTYPE_NAMES, THREADS, word_codec
from .ptx import as_f32, f32_bits, ld_i32_at, ld_i64_at, ld_v4_at, st_u32_at, st_v4_at
from .runtime import launch, simulator_enabled

NORM_THREADS = 1024  # at most; a power of two >= 32 (whole warps): one 16-byte item each up to 16-bit hidden 8,192
NORM_WARPS = NORM_THREADS // 32
_JIT = dict(cache=not simulator_enabled())


@functools.lru_cache(maxsize=None)
def _item_codec(dtype: torch.dtype, words: int):
    """(load(address, values, i), store(address, values, i), E) for items of ``words`` (4 or 1) 32-bit words:
    load widens the item at ``address`` into ``values[i:i + E]`` (float32), store narrows them back."""
    two_byte = dtype != torch.float32
    lo, hi, pack = word_codec(DTYPE_NAMES[dtype])
    E = words * (2 if two_byte else 1)
    if words == 4:
        @cuda.jit(device=True, inline=True)
        def load(address, values, i):
            w = ld_v4_at(address)
            for k in range(4):
                if two_byte:
                    values[i + 2 * k] = lo(w[k])
                    values[i + 2 * k + 1] = hi(w[k])
                else:
                    values[i + k] = as_f32(w[k])

        if two_byte:
            @cuda.jit(device=True, inline=True)
            def store(address, values, i):
                st_v4_at(address, pack(values[i], values[i + 1]), pack(values[i + 2], values[i + 3]),
                         pack(values[i + 4], values[i + 5]), pack(values[i + 6], values[i + 7]))
        else:
            @cuda.jit(device=True, inline=True)
            def store(address, values, i):
                st_v4_at(address, f32_bits(values[i]), f32_bits(values[i + 1]), f32_bits(values[i + 2]),
                         f32_bits(values[i + 3]))
        return load, store, E

    @cuda.jit(device=True, inline=True)
    def load_word(address, values, i):
        w = ld_i32_at(address)
        if two_byte:
            values[i] = lo(w)
            values[i + 1] = hi(w)
        else:
            values[i] = as_f32(w)

    @cuda.jit(device=True, inline=True)
    def store_word(address, values, i):
        st_u32_at(address, pack(values[i], values[i + 1]) if two_byte else f32_bits(values[i]))
    return load_word, store_word, E


def _item_words(row_bytes: int, *tensors: torch.Tensor) -> int:
    """4 (16-byte items) when rows of ``row_bytes`` split into whole items and every tensor starts 16-byte
    aligned, else 1."""
    return 4 if row_bytes % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors) else 1


# ---------------------------------------------------------------------------------------------------------------
# rope_write_kv: rotate q and k (RoPE, "rotate-half" layout: dim i pairs with dim i + D/2), store q, store the
# rotated k and v at the token's cache slot.
#
# grid   : (num_tokens,)            one block per token t
# threads: one per item (up to 1024) item i = tid, tid + blockDim, ... over the token's work; an item is E dims
#                                   moved by 16-byte loads (E = 8 fp16/bf16, 4 fp32) where every row allows them,
#                                   else by 32-bit words (E = 2 fp16/bf16, 1 fp32): at 8,192 prefill tokens the
#                                   word-sized kernel ran at a third of the memory bandwidth
#   items [0, (H + KH) * P)         rotation: head h = i // P (q heads 0..H-1, then k heads), item p = i % P of
#                                   the head's first half, P = D / (2E): dims e .. e + E - 1 (e = E p), each dim
#                                   d of them with its partner d + D/2:
#                                       x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin   (angle of dim d)
#   items [.., + KH * D / E)        v: item j = i - (H + KH) P of the token's KH * D values, copied
# q_ptr + t * q_stride + h * D * S  head h of token t's query (S bytes per element; rows may be slices of qkv)
# out_ptr + (t * H + h) * D * S     the rotated query, [num_tokens, H, D] dense
# cache + slot * KH * D * S         token t's row in a key/value cache ([num_blocks, block_size] flattened);
#                                   slot = slot_mapping[t] (int64), -1 or past the cache: k and v are not stored
# cos/sin + (t * D/2 + e) * 4       float32 [num_tokens, D/2]: cos/sin of position * inv_freq[e]
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _rope_write_kv_kernel(dtype: torch.dtype, words: int):
    load, store, E = _item_codec(dtype, words)
    load_f32, _, EF = _item_codec(torch.float32, words)  # cos and sin are float32 whatever the model's dtype
    S = dtype.itemsize
    B = E * S

    @cuda.jit(**_JIT)
    def kernel(q_ptr, q_stride, k_ptr, k_stride, v_ptr, v_stride, cos_ptr, sin_ptr, out_ptr, key_cache_ptr,
               value_cache_ptr, slot_mapping_ptr, num_slots, num_heads, num_kv_heads, head_dim):
        t = cuda.blockIdx.x
        half = head_dim // 2
        per_half = half // E
        slot = ld_i64_at(slot_mapping_ptr + 8 * t)
        store_kv = 0 <= slot < num_slots
        row_bytes = num_kv_heads * head_dim * S
        rotations = (num_heads + num_kv_heads) * per_half
        x1 = cuda.local.array(E, np.float32)
        x2 = cuda.local.array(E, np.float32)
        cs = cuda.local.array(E, np.float32)
        sn = cuda.local.array(E, np.float32)
        for i in range(cuda.threadIdx.x, rotations + num_kv_heads * head_dim // E, cuda.blockDim.x):
            if i >= rotations:  # v: copied as it is
                offset = (i - rotations) * B
                if store_kv:
                    load(v_ptr + t * v_stride + offset, x1, 0)
                    store(value_cache_ptr + slot * row_bytes + offset, x1, 0)
                continue
            h = i // per_half
            e = (i % per_half) * E
            if h < num_heads:
                src = q_ptr + t * q_stride + h * head_dim * S
                dst = out_ptr + (t * num_heads + h) * head_dim * S
            elif store_kv:
                src = k_ptr + t * k_stride + (h - num_heads) * head_dim * S
                dst = key_cache_ptr + slot * row_bytes + (h - num_heads) * head_dim * S
            else:
                continue
            load(src + e * S, x1, 0)
            load(src + (e + half) * S, x2, 0)
            for c in range(0, E, EF):
                load_f32(cos_ptr + (t * half + e + c) * 4, cs, c)
                load_f32(sin_ptr + (t * half + e + c) * 4, sn, c)
            for j in range(E):
                a, b = x1[j], x2[j]
                x1[j] = a * cs[j] - b * sn[j]
                x2[j] = b * cs[j] + a * sn[j]
            store(dst + e * S, x1, 0)
            store(dst + (e + half) * S, x2, 0)
    return kernel


def _check_words(**tensors: torch.Tensor) -> None:
    """The kernels move 32-bit words: every tensor, and every row of a strided one, must start on a 4-byte
    boundary (a view at an odd fp16/bf16 offset would fault the GPU)."""
    for name, t in tensors.items():
        V.check_aligned(name, t, 4)
        if t.dim() > 1 and t.stride(0) * t.element_size() % 4:
            raise ValueError(f"{name}'s rows must start on 4-byte boundaries (row stride {t.stride(0)} elements "
                             f"of {t.element_size()} bytes)")


def check_rope_inputs(query, key, value, cos, sin, key_cache, value_cache, slot_mapping):
    """``rope_write_kv``'s arguments (see it); returns ``(num_tokens, num_heads, num_kv_heads, head_dim)``."""
    V.check_cache(key_cache, value_cache)
    _, _, num_kv_heads, head_dim = key_cache.shape
    V.check_tensor("query", query, ndim=3, dtype=key_cache.dtype, contiguous=False)
    num_tokens, num_heads = query.shape[:2]
    if num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query num_heads (dim 1) = {num_heads} must be a positive multiple of num_kv_heads = "
                         f"{num_kv_heads}")
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 (pairs of dims rotate with their partners), got {head_dim}")
    for name, t, heads in (("query", query, num_heads), ("key", key, num_kv_heads), ("value", value, num_kv_heads)):
        V.check_tensor(name, t, ndim=3, dtype=key_cache.dtype, contiguous=False)
        if tuple(t.shape) != (num_tokens, heads, head_dim):
            raise ValueError(f"{name} must be [{num_tokens}, {heads}, {head_dim}], got {tuple(t.shape)}")
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"{name} must have dense [heads, head_dim] rows (strides (*, {head_dim}, 1)), "
                             f"got strides {t.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        V.check_tensor(name, t, ndim=2, dtype=torch.float32)
        if tuple(t.shape) != (num_tokens, head_dim // 2):
            raise ValueError(f"{name} must be [{num_tokens}, {head_dim // 2}], got {tuple(t.shape)}")
    V.check_tensor("slot_mapping", slot_mapping, ndim=1, dtype=torch.int64)
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must have num_tokens = {num_tokens} entries, got {slot_mapping.shape[0]}")
    tensors = dict(query=query, key=key, value=value, cos=cos, sin=sin, key_cache=key_cache, value_cache=value_cache,
                   slot_mapping=slot_mapping)
    V.check_device(**tensors)
    _check_words(**tensors)
    return num_tokens, num_heads, num_kv_heads, head_dim


def rope_item_words(query, key, value, cos, sin, key_cache, value_cache, out) -> int:
    """4 (16-byte items) when every row and every half head of the arguments starts on a 16-byte boundary, else 1
    (32-bit words; ``check_rope_inputs`` has made sure those line up)."""
    half_bytes = query.shape[-1] // 2 * query.element_size()
    rows = all(t.stride(0) * t.element_size() % 16 == 0 for t in (query, key, value, cos, sin))
    return 4 if rows and _item_words(half_bytes, query, key, value, cos, sin, key_cache, value_cache, out) == 4 else 1


def rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping, out=None):
    """Rotate ``query [n, H, D]`` and ``key [n, KH, D]`` by RoPE (dim i with dim i + D/2, angles from float32
    ``cos``/``sin [n, D/2]``), store the rotated key and ``value [n, KH, D]`` at ``slot_mapping`` (int64 ``[n]``,
    -1 = don't store) in the caches ``[num_blocks, block_size, KH, D]``; returns the rotated query (dense, in
    ``out`` if given). query/key/value rows may be slices of a fused qkv tensor (each head's D values dense).
    Graph-capturable: no host-device synchronisation."""
    num_tokens, num_heads, num_kv_heads, head_dim = check_rope_inputs(query, key, value, cos, sin, key_cache,
                                                                      value_cache, slot_mapping)
    out = V.output(out, (num_tokens, num_heads, head_dim), query)
    V.check_device(query=query, out=out)
    _check_words(out=out)
    if num_tokens == 0:
        return out
    item = query.element_size()
    words = rope_item_words(query, key, value, cos, sin, key_cache, value_cache, out)
    E = _item_codec(query.dtype, words)[2]
    items = (num_heads + num_kv_heads) * (head_dim // (2 * E)) + num_kv_heads * (head_dim // E)
    threads = min(1024, -(-items // 32) * 32)  # one item per thread: a token's work in one round of loads
    launch(_rope_write_kv_kernel(query.dtype, words), (num_tokens,), threads, query.data_ptr(), query.stride(0) * item,
           key.data_ptr(), key.stride(0) * item, value.data_ptr(), value.stride(0) * item, cos.data_ptr(),
           sin.data_ptr(), out.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), slot_mapping.data_ptr(),
           key_cache.shape[0] * key_cache.shape[1], num_heads, num_kv_heads, head_dim)
    return out


# ---------------------------------------------------------------------------------------------------------------
# add_rms_norm_: residual <- residual + x;  x <- RMSNorm(residual) * weight   (both in place)
#
# grid   : (num_tokens,)            one block per token t
# threads: the power of two >= the row's items in [32, NORM_THREADS]: thread j handles items j, j + threads, ...
#                                   of the token's row; an item is B = 16 bytes (E = 8 fp16/bf16 or 4 fp32
#                                   values) or, where rows do not split into aligned 16-byte items, one word
# x_ptr / residual_ptr + t * hidden * S   the token's rows; item i at + i * B; weight_ptr: [hidden], same dtype
# Two passes over the row: the first sums the squares of the (rounded) sums, reduced over each warp with xor
# shuffles and over the warps through shared memory (one barrier); the second writes each sum and its normalised
# value. A thread's first item (its only one while the row has at most `threads` items: 16-byte items and 1,024
# threads cover hidden 8,192) stays in registers across the barrier, with its weights loaded in the first pass:
# the second pass then waits on no load. Further items are reloaded and recomputed. Each thread rewrites only
# the items it read, so no value is read after another thread has written it.
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _add_rms_norm_kernel(dtype: torch.dtype, words: int):
    load, store, E = _item_codec(dtype, words)
    rounded = _rounding(dtype)
    S = dtype.itemsize
    B = 4 * words

    @cuda.jit(**_JIT)
    def kernel(x_ptr, residual_ptr, weight_ptr, hidden, eps):
        squares = cuda.shared.array(NORM_WARPS, np.float32)
        t = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        items = hidden * S // B
        x_row = x_ptr + t * hidden * S
        r_row = residual_ptr + t * hidden * S
        xs = cuda.local.array(E, np.float32)
        rs = cuda.local.array(E, np.float32)
        ws = cuda.local.array(E, np.float32)
        sums = cuda.local.array(E, np.float32)             # the first item's rounded sums
        weights = cuda.local.array(E, np.float32)          # and its weights
        total = np.float32(0.0)
        if tid < items:
            load(x_row + tid * B, xs, 0)
            load(r_row + tid * B, rs, 0)
            load(weight_ptr + tid * B, weights, 0)
            for e in range(E):
                sums[e] = rounded(xs[e] + rs[e])
                total += sums[e] * sums[e]
        for j in range(tid + threads, items, threads):
            load(x_row + j * B, xs, 0)
            load(r_row + j * B, rs, 0)
            for e in range(E):
                v = rounded(xs[e] + rs[e])
                total += v * v
        for offset in (16, 8, 4, 2, 1):                    # the warp's sum, in every lane
            total += cuda.shfl_xor_sync(0xFFFFFFFF, total, offset)
        if tid % 32 == 0:
            squares[tid // 32] = total
        cuda.syncthreads()
        total = np.float32(0.0)
        for w in range(threads // 32):                     # every thread adds the warps' sums itself
            total += squares[w]
        scale = np.float32(1.0 / math.sqrt(total / hidden + eps))
        if tid < items:
            for e in range(E):
                xs[e] = sums[e] * scale * weights[e]
            store(r_row + tid * B, sums, 0)
            store(x_row + tid * B, xs, 0)
        for j in range(tid + threads, items, threads):
            load(x_row + j * B, xs, 0)
            load(r_row + j * B, rs, 0)
            load(weight_ptr + j * B, ws, 0)
            for e in range(E):
                rs[e] = rounded(xs[e] + rs[e])
                xs[e] = rs[e] * scale * ws[e]
            store(r_row + j * B, rs, 0)
            store(x_row + j * B, xs, 0)
    return kernel


@functools.lru_cache(maxsize=None)
def _rounding(dtype: torch.dtype):
    """float32 -> the same value rounded to ``dtype`` (what storing and reloading it would give)."""
    if dtype == torch.float32:
        @cuda.jit(device=True, inline=True)
        def same(a):
            return a
        return same
    lo, _, pack = word_codec(DTYPE_NAMES[dtype])

    @cuda.jit(device=True, inline=True)
    def rounded(a):
        return lo(pack(a, a))
    return rounded


def add_rms_norm_(x, residual, weight, eps: float):
    """In place: ``residual += x``, then ``x = rms_norm(residual) * weight``; returns ``(x, residual)``.
    ``x``, ``residual`` ``[num_tokens, hidden]`` dense, ``weight [hidden]``, one dtype."""
    V.check_tensor("x", x, ndim=2, dtypes=V.SUPPORTED_DTYPES)
    num_tokens, hidden = x.shape
    V.check_tensor("residual", residual, ndim=2, dtype=x.dtype)
    V.check_tensor("weight", weight, ndim=1, dtype=x.dtype)
    if residual.shape != x.shape:
        raise ValueError(f"residual must be {list(x.shape)} like x, got {list(residual.shape)}")
    if weight.shape[0] != hidden:
        raise ValueError(f"weight must be [{hidden}] (x's hidden size), got {list(weight.shape)}")
    if hidden % 2:
        raise ValueError(f"hidden size must be even (the kernel moves pairs), got {hidden}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    V.check_device(x=x, residual=residual, weight=weight)
    _check_words(x=x, residual=residual, weight=weight)
    if num_tokens:
        words = _item_words(hidden * x.element_size(), x, residual, weight)
        items = hidden * x.element_size() // (4 * words)
        threads = min(NORM_THREADS, max(32, 1 << (items - 1).bit_length()))
        launch(_add_rms_norm_kernel(x.dtype, words), (num_tokens,), threads, x.data_ptr(), residual.data_ptr(),
               weight.data_ptr(), hidden, np.float32(eps))
    return x, residual


# ---------------------------------------------------------------------------------------------------------------
# silu_and_mul: out = silu(gate) * up, where gate_up = [gate | up] along the last dim (the fused projection)
#
# grid   : (num_tokens, ceil(items / 128))  block (t, c) for token t's output items [c * 128, (c + 1) * 128)
# threads: 128                      thread i handles output item j = c * 128 + i: B bytes (16, or one word where
#                                   rows do not split into aligned 16-byte items) of gate, of up and of out, so a
#                                   single token's row is spread over many SMs (a block per token left one SM
#                                   looping over a batch-1 row of ~2,400 pairs, 7 us)
# gate_up_ptr + t * 2 * size * S    the token's row: gate values, then up values; out_ptr + t * size * S its output
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _silu_and_mul_kernel(dtype: torch.dtype, words: int):
    load, store, E = _item_codec(dtype, words)
    S = dtype.itemsize
    B = 4 * words

    @cuda.jit(**_JIT)
    def kernel(gate_up_ptr, out_ptr, size):
        t = cuda.blockIdx.x
        j = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if j < size * S // B:
            gate = cuda.local.array(E, np.float32)
            up = cuda.local.array(E, np.float32)
            row = gate_up_ptr + t * 2 * size * S
            load(row + j * B, gate, 0)
            load(row + size * S + j * B, up, 0)
            for e in range(E):
                gate[e] = silu(gate[e]) * up[e]
            store(out_ptr + t * size * S + j * B, gate, 0)
    return kernel


@cuda.jit(device=True, inline=True)
def silu(x):
    """x * sigmoid(x), with exp of a non-positive argument only (no overflow for very negative x)."""
    e = math.exp(-abs(x))
    return x / (np.float32(1.0) + e) if x >= 0 else x * e / (np.float32(1.0) + e)


def silu_and_mul(gate_up, out=None):
    """``gate_up [num_tokens, 2 * size]`` (dense) -> ``silu(gate_up[:, :size]) * gate_up[:, size:]``."""
    V.check_tensor("gate_up", gate_up, ndim=2, dtypes=V.SUPPORTED_DTYPES)
    num_tokens, width = gate_up.shape
    if width % 4:
        raise ValueError(f"gate_up's last dim must be 2 * an even size, got {width}")
    size = width // 2
    out = V.output(out, (num_tokens, size), gate_up)
    V.check_device(gate_up=gate_up, out=out)
    _check_words(gate_up=gate_up, out=out)
    if num_tokens:
        words = _item_words(size * gate_up.element_size(), gate_up, out)
        items = size * gate_up.element_size() // (4 * words)
        launch(_silu_and_mul_kernel(gate_up.dtype, words), (num_tokens, -(-items // THREADS)), THREADS,
               gate_up.data_ptr(), out.data_ptr(), size)
    return out
