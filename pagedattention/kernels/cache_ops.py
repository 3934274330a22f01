"""Cache maintenance kernels: storing a step's new K/V (``write_kv``) and copy-on-write of blocks (``copy_blocks``).

Both move raw bytes (32-bit words in write_kv, 16-byte vectors in copy_blocks), so one kernel serves fp16, bf16
and fp32, zero-copy::

    write_kv     grid (num_tokens,)                one block per new token
                 threads min(128, words per token)  thread i copies words i, i + blockDim, ... of its row
    copy_blocks  grid (2 * num_layers, num_pairs)  one block per (cache, (src, dst) pair)
                 threads 128                       thread i copies 16-byte pieces i, i + 128, ... of the block

The comment above each kernel names its addresses and indices.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import cuda

from . import validation as V
from .common import THREADS
from .ptx import ld_i32_at, ld_i64_at, ld_v4_at, st_u32_at, st_v4_at
from .runtime import as_kernel_array, current_stream, launch, simulator_enabled

# ---------------------------------------------------------------------------------------------------------------
# write_kv
#
# grid   : (num_tokens,)             one thread block per new token
# threads: min(128, words per token) each thread copies 32-bit words w, w + blockDim, ... of the token's row
# Arguments are byte addresses (``data_ptr()``) and byte strides, so the launch skips Numba's per-array
# wrapping (see runtime.launch): this kernel runs eagerly once per layer of every prefill step.
# key_ptr + t * key_stride          : token t's K row, num_kv_heads * head_dim values (rows may be slices of a
#                                     fused qkv tensor, hence the stride), token_bytes long
# key_cache_ptr + slot * token_bytes: the cache row of a slot ([num_blocks, block_size] flattened: slot = block_id *
#                                     block_size + offset)
# slot_mapping_ptr + 8 t            : token t's slot (int64), or -1 (padding token: nothing is written). A slot past
#                                     the cache is skipped too, so a stale mapping can never write outside the cache.
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit(cache=not simulator_enabled())
def _write_kv_kernel(key_ptr, value_ptr, key_stride, value_stride, key_cache_ptr, value_cache_ptr,
                     slot_mapping_ptr, token_bytes, num_slots):
    token = cuda.blockIdx.x
    slot = ld_i64_at(slot_mapping_ptr + 8 * token)
    if slot < 0 or slot >= num_slots:
        return
    src_k = key_ptr + token * key_stride
    src_v = value_ptr + token * value_stride
    dst_k = key_cache_ptr + slot * token_bytes
    dst_v = value_cache_ptr + slot * token_bytes
    for byte in range(4 * cuda.threadIdx.x, token_bytes, 4 * cuda.blockDim.x):
        st_u32_at(dst_k + byte, ld_i32_at(src_k + byte))
        st_u32_at(dst_v + byte, ld_i32_at(src_v + byte))


def write_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Store ``key/value [num_tokens, num_kv_heads, head_dim]`` at ``slot_mapping`` (int64; -1 = skip).

    Graph-capturable: no host-device synchronisation, no allocation.
    """
    V.check_cache(key_cache, value_cache)
    _, _, num_kv_heads, head_dim = key_cache.shape
    for name, t in (("key", key), ("value", value)):
        V.check_tensor(name, t, ndim=3, dtype=key_cache.dtype, contiguous=False)
        if tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}] (the caches' num_kv_heads, "
                             f"head_dim), got {tuple(t.shape)}")
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"{name} must have dense [num_kv_heads, head_dim] rows (strides (*, {head_dim}, 1)), "
                             f"got strides {t.stride()}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    V.check_tensor("slot_mapping", slot_mapping, ndim=1, dtype=torch.int64)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must have num_tokens = {key.shape[0]} entries, got {slot_mapping.shape[0]}")
    V.check_device(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    token_bytes = num_kv_heads * head_dim * key.element_size()
    threads = min(THREADS, (token_bytes // 4 + 31) // 32 * 32)
    item = key.element_size()
    if (key.data_ptr() | value.data_ptr() | key.stride(0) * item | value.stride(0) * item) % 4:
        raise ValueError("key and value rows must start on 4-byte boundaries (the kernel moves 32-bit words)")
    launch(_write_kv_kernel, (num_tokens,), threads, key.data_ptr(), value.data_ptr(), key.stride(0) * item,
           value.stride(0) * item, key_cache.data_ptr(), value_cache.data_ptr(), slot_mapping.data_ptr(),
           token_bytes, key_cache.shape[0] * key_cache.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# copy_blocks
#
# grid   : (2 * num_layers, num_pairs)   x: which cache (layer l's K is 2l, its V is 2l+1), y: which (src, dst) pair
# threads: 128                           each moves 16 bytes per step through the block's bytes
# cache_ptrs[c]   : base address of cache c (the caches are separate allocations, so one launch needs their
#                   addresses; every cache has the same shape, hence the same block_bytes)
# src_to_dst[p]   : (source block, destination block)
# ---------------------------------------------------------------------------------------------------------------


@cuda.jit(cache=not simulator_enabled())
def _copy_blocks_kernel(cache_ptrs, src_to_dst, block_bytes):
    base = cache_ptrs[cuda.blockIdx.x]
    pair = cuda.blockIdx.y
    src = base + np.uint64(src_to_dst[pair, 0] * block_bytes)
    dst = base + np.uint64(src_to_dst[pair, 1] * block_bytes)
    for byte in range(cuda.threadIdx.x * 16, block_bytes, cuda.blockDim.x * 16):
        a, b, c, d = ld_v4_at(src + np.uint64(byte))
        st_v4_at(dst + np.uint64(byte), a, b, c, d)


_pointer_tables: dict = {}


def _cache_pointer_table(caches: list[torch.Tensor]):
    """The caches' base addresses as a device array, built once per set of caches (they live for the engine)."""
    key = tuple(c.data_ptr() for c in caches)
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) > 16:
            _pointer_tables.clear()
        table = np.array(key, dtype=np.uint64)
        if not simulator_enabled():
            table = cuda.to_device(table, stream=current_stream())
        _pointer_tables[key] = table
    return table


def copy_blocks(key_caches, value_caches, src_to_dst) -> None:
    """Copy whole blocks ``src -> dst`` in every layer's K and V cache in one launch.

    ``src_to_dst`` int64 ``[num_pairs, 2]`` (CPU or the caches' device); block ids must lie in ``[0, num_blocks)``
    and destinations must not also be sources (pairs run in parallel).
    """
    for name, caches in (("key_caches", key_caches), ("value_caches", value_caches)):
        if not isinstance(caches, (list, tuple)) or len(caches) == 0:
            raise TypeError(f"{name} must be a non-empty list of per-layer cache tensors")
    if len(key_caches) != len(value_caches):
        raise ValueError(f"key_caches has {len(key_caches)} layers but value_caches has {len(value_caches)}")
    for layer, (k, v) in enumerate(zip(key_caches, value_caches)):
        try:
            V.check_cache(k, v)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {layer}: {e}") from None
        if k.shape != key_caches[0].shape or k.dtype != key_caches[0].dtype:
            raise ValueError(f"layer {layer}'s caches are {tuple(k.shape)} {k.dtype}, layer 0's are "
                             f"{tuple(key_caches[0].shape)} {key_caches[0].dtype}; all layers must match")
        V.check_device(key_caches=key_caches[0], **{f"key_caches[{layer}]": k, f"value_caches[{layer}]": v})
    V.check_tensor("src_to_dst", src_to_dst, ndim=2, dtype=torch.int64)
    if src_to_dst.shape[1] != 2:
        raise ValueError(f"src_to_dst must be [num_pairs, 2], got {tuple(src_to_dst.shape)}")
    device = key_caches[0].device
    if src_to_dst.device not in (device, torch.device("cpu")):
        raise ValueError(f"src_to_dst is on {src_to_dst.device}; expected the CPU or {device}")
    num_pairs = src_to_dst.shape[0]
    if num_pairs == 0:
        return
    num_blocks = key_caches[0].shape[0]
    lo, hi = (int(x) for x in torch.aminmax(src_to_dst))
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"src_to_dst block ids must lie in [0, {num_blocks}), got values in [{lo}, {hi}]")
    pairs = src_to_dst.to(device, non_blocking=True)
    caches = [c for kv in zip(key_caches, value_caches) for c in kv]
    block_bytes = key_caches[0][0].numel() * key_caches[0].element_size()
    _copy_blocks_kernel[(len(caches), num_pairs), THREADS, current_stream()](
        _cache_pointer_table(caches), as_kernel_array(pairs), block_bytes)
