"""Argument checks shared by the Numba kernels' public functions.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, device,
layout or range) whose message names the argument and what was expected. Checks only read tensor metadata,
never tensor contents, so they cost no host-device synchronisation; the one exception,
:func:`check_context_lens_values`, is called only when the caller did not bound the context lengths itself.
"""
from __future__ import annotations

import torch

from .runtime import simulator_enabled

#: Head sizes the kernels are built for: a key row must split into 16-byte pieces over a power-of-two lane group.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
#: Tokens per cache block; any power of two in this range works (vLLM compiles 8, 16 and 32).
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
#: Cache and query dtypes. bf16 is converted bit-wise inside the kernels.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The largest query-head group one V2 thread block serves; wider groups are split over several blocks (which
#: find their KV head in L2 once one has read it). More heads per block cost registers, hence occupancy.
MAX_GROUP_PER_BLOCK = 8


def check_tensor(name: str, t, *, ndim: int | None = None, dtype=None, dtypes=None, contiguous: bool = True):
    """Common checks: a torch tensor with the given rank/dtype, densely laid out."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have one of the dtypes {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def check_aligned(name: str, t: torch.Tensor, alignment: int = 16):
    """The kernels read rows with 16-byte vector loads, so a tensor must start on a 16-byte boundary (a fresh
    allocation always does; a view with an odd offset may not)."""
    if t.data_ptr() % alignment != 0:
        raise ValueError(f"{name} must start on a {alignment}-byte boundary (got a view at offset "
                         f"{t.storage_offset()} elements); pass a fresh or .clone()d tensor")


def check_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device where the kernels run: CUDA, or the CPU under the simulator."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, d in devices.items():
        if d != device:
            raise ValueError(f"{name} is on {d} but {first_name} is on {device}; all arguments must share a device")
    if simulator_enabled():
        if device.type != "cpu":
            raise ValueError(f"{first_name} is on {device}; under the CUDA simulator the kernels take CPU tensors")
    elif device.type != "cuda":
        raise ValueError(f"{first_name} is on {device}; the kernels need CUDA tensors (use the torch reference on CPU)")
    return device



def check_cache(key_cache, value_cache):
    """Paged K/V caches ``[num_blocks, block_size, num_kv_heads, head_dim]``; returns those four sizes."""
    check_tensor("key_cache", key_cache, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=SUPPORTED_DTYPES)
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} must equal key_cache shape "
                         f"{tuple(key_cache.shape)} [num_blocks, block_size, num_kv_heads, head_dim]")
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"value_cache dtype {value_cache.dtype} must equal key_cache dtype {key_cache.dtype}")
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"key_cache block_size (dim 1) must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"key_cache head_dim (dim 3) must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if num_blocks < 1 or num_kv_heads < 1:
        raise ValueError(f"key_cache needs at least one block and one KV head, got shape {tuple(key_cache.shape)}")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_query(query, num_kv_heads: int, head_dim: int, dtype: torch.dtype, name: str = "query"):
    """``query [num_tokens, num_heads, head_dim]`` in the caches' dtype with whole GQA groups; returns
    ``(num_tokens, num_heads)``."""
    check_tensor(name, query, ndim=3)
    if query.dtype != dtype:
        raise TypeError(f"{name} dtype {query.dtype} must equal the caches' dtype {dtype}")
    num_tokens, num_heads, qdim = query.shape
    if qdim != head_dim:
        raise ValueError(f"{name} head_dim (dim 2) must be the caches' head_dim {head_dim}, got {qdim}")
    if num_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{name} num_heads (dim 1) = {num_heads} must be a positive multiple of "
                         f"num_kv_heads = {num_kv_heads}")
    return num_tokens, num_heads


def check_block_tables(block_tables, num_seqs: int):
    """int32 ``[num_seqs, max_blocks_per_seq]``; returns max_blocks_per_seq."""
    check_tensor("block_tables", block_tables, ndim=2, dtype=torch.int32)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have num_seqs = {num_seqs} rows, got shape {tuple(block_tables.shape)}")
    if block_tables.shape[1] < 1:
        raise ValueError(f"block_tables needs at least one column, got shape {tuple(block_tables.shape)}")
    return block_tables.shape[1]


def check_context_lens(context_lens, num_seqs: int):
    """int32 ``[num_seqs]``."""
    check_tensor("context_lens", context_lens, ndim=1, dtype=torch.int32)
    if context_lens.shape[0] != num_seqs:
        raise ValueError(f"context_lens must have num_seqs = {num_seqs} entries, got shape "
                         f"{tuple(context_lens.shape)}")


def check_max_context_len(max_context_len, block_size: int, max_blocks_per_seq: int) -> int:
    """A host int in ``[1, max_blocks_per_seq * block_size]`` (the most tokens a block table row can address)."""
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, int):
        raise TypeError(f"max_context_len must be a Python int, got {type(max_context_len).__name__}")
    capacity = max_blocks_per_seq * block_size
    if not 1 <= max_context_len <= capacity:
        raise ValueError(f"max_context_len must be in [1, {capacity}] (block_tables columns x block_size), "
                         f"got {max_context_len}")
    return max_context_len


def check_context_lens_values(context_lens, block_size: int, max_blocks_per_seq: int) -> int:
    """Reads the lengths (one device sync): each in ``[1, max_blocks_per_seq * block_size]``; returns the max."""
    if context_lens.numel() == 0:
        return 1
    lo, hi = (int(x) for x in torch.aminmax(context_lens))
    capacity = max_blocks_per_seq * block_size
    if lo < 1 or hi > capacity:
        raise ValueError(f"context_lens must lie in [1, {capacity}] (block_tables columns x block_size), "
                         f"got values in [{lo}, {hi}]")
    return hi


def check_scale(scale, head_dim: int) -> float:
    """A finite positive float; defaults to ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return scale


def output(out, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """``out`` checked to be a dense ``shape`` tensor of ``like``'s dtype, or (None) a new one on ``like``'s device."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_tensor("out", out, ndim=len(shape), dtype=like.dtype)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must be [{', '.join(map(str, shape))}], got {tuple(out.shape)}")
    return out


def check_out(out, like: torch.Tensor):
    """An output tensor shaped, typed and placed like ``like``."""
    check_tensor("out", out, ndim=like.dim(), dtype=like.dtype)
    if out.shape != like.shape:
        raise ValueError(f"out must have shape {tuple(like.shape)}, got {tuple(out.shape)}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but query is on {like.device}")
