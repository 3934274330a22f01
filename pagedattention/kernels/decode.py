"""``paged_attention``: decode attention over the paged KV cache, dispatching to the V1 or V2 Numba kernel.

V2 runs on the CUDA cores (paged_attention_v2.py) or, for wide GQA groups and split launches in fp16/bf16,
on the tensor cores (paged_attention_tc.py); ``tc_config`` decides. Both end with the same split-KV merge,
done by the last partition block of each sequence to finish (``paged_attention_v2.build_partition_merge``).
``rope_paged_attention`` is the model's decode call: RoPE and the new token's cache write folded into the
tensor-core kernel (one launch per layer fewer), or ``layer_ops.rope_write_kv`` first where that kernel does not
serve the shape.

Host side of the kernels: validation, the split-KV plan (how many partitions per sequence), scratch buffers and
the launches on torch's current stream. With ``max_context_len`` given nothing here reads a GPU tensor, so a
call can be captured in a CUDA graph and replayed after ``context_lens``/``block_tables`` change in place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from . import validation as V
from .common import DTYPE_NAMES, THREADS, num_sms
from .layer_ops import check_rope_inputs, rope_write_kv
from .paged_attention_v1 import build_v1_kernel
from .paged_attention_v2 import build_v2_kernel
from .paged_attention_tc import build_tc_kernel, tc_supported
from .runtime import as_kernel_array, current_stream, simulator_enabled

#: Shortest split-KV partition: a block that covers fewer tokens costs more in its launch and merge than it saves.
MIN_PARTITION = 128
MAX_GRID_Z = 65535     # partitions are the grid's z index (launched last: blocks past a context exit at once)


def v2_config(group: int, cap: int = V.MAX_GROUP_PER_BLOCK):
    """(query heads per block, tokens per group per iteration, register cap) for a GQA group size.

    From the H100 sweep in benchmarks/kernel_notes.md: 4 heads x 4 tokens under a 128-register cap (4 blocks
    per SM) beat 8 heads per block and every uncapped layout at 32/8 and 64/8 heads; a group of 7 is fastest
    served whole (7 heads x 2 tokens) rather than one head per block; single heads want 8 tokens in flight.
    """
    divisors = [d for d in range(1, min(group, cap) + 1) if group % d == 0]
    small = [d for d in divisors if d <= 4]
    heads = small[-1] if small[-1] > 1 or group == 1 else divisors[-1]
    if heads <= 2:
        return heads, 8, 128
    if heads <= 4:
        return heads, 4, 128
    return heads, 2, None


def blocks_per_sm(max_registers) -> int:
    """Blocks of 128 threads per SM that the split plan counts on: what fits under a register cap (65536
    registers per SM), else 2 (the wide CUDA-core layouts use about 230 registers; the uncapped tensor-core
    ones 167-183, where 3 fit, but the 2-per-SM plan measured best at B4 ctx32768)."""
    return 65536 // (128 * max_registers) if max_registers else 2


def tc_config(dtype_name: str, head_dim: int, group: int, num_units: int, max_context_len: int, num_sms: int):
    """(16-token chunks per warp per iteration, register cap) of the tensor-core kernel, or None where the
    CUDA-core kernel is used instead; ``num_units`` = sequences x KV heads.

    From the H200 runs (benchmarks/results/kernels_tune_h200.log, decode_ab_h200.log, decode_group4_h200.log):
    tensor cores for groups of 5-8, for a group of 4 at head_dim 64, and at head_dim 128 for a group of 4 when
    the launch is split over the context or the contexts reach 2,048; one chunk per warp.
    head_dim 64 runs under a 128-register cap (four blocks per SM): at 14/2 bf16, B256 ctx1024, 0.040 ms (80% of
    copy) against 0.147 on the CUDA cores; at 32/8 (Llama-3.2-1B), B256 ctx900 0.131 ms (84%) against 0.178,
    B64 ctx2048 0.072 against 0.096, never slower from B1 to B256 and ctx 128 to 4096. head_dim 128 runs pipelined
    and uncapped: B64 ctx4096 32/8 0.266 ms against 0.285 capped (not pipelined) and 0.332 on the CUDA cores, B4
    ctx32768 0.142.
    """
    if not tc_supported(dtype_name, head_dim, group) or group < 4:
        return None
    registers = 128 if head_dim == 64 else None
    split = split_plan(num_units, max_context_len, num_sms, blocks_per_sm(registers))[1] > 1
    if group == 4 and head_dim == 128 and not split and max_context_len < 2048:
        return None  # four heads padded to the MMA's 16 rows: B256 ctx128 d128 took 0.094 ms against 0.061
    return 1, registers


def split_plan(num_units: int, max_context_len: int, num_sms: int, per_sm: int = 4) -> tuple[int, int]:
    """(shortest partition in tokens, partitions in the grid) for ``num_units`` (sequence, head block) pairs whose
    contexts are at most ``max_context_len``; each sequence then splits by its own length
    (``common.sequence_partition``).

    One wave holds ``num_sms * per_sm`` resident blocks. When the units alone fill most of it, no split (a
    merge would only add work); otherwise as many partitions as fit in that one wave, never more, since a
    few blocks spilling into a second wave cost a whole extra round (measured on the H100 at B=4 x 8 KV heads,
    32k tokens: 16 partitions of 2048 beat 17 of 1952 clearly). Sizing each sequence by its own context
    matters inside CUDA graphs, whose bound is the longest context allowed: a plan sized by the bound gave a
    sequence of 900 tokens two busy partitions of 512 where four of 256 fit in the wave.
    """
    wave = num_sms * per_sm
    parts = min(wave // max(num_units, 1), -(-max_context_len // MIN_PARTITION))
    if 4 * num_units >= 3 * wave or parts < 2:
        return max_context_len, 1
    return MIN_PARTITION, parts


def _words(t: torch.Tensor):
    """Flat int32 word view of a contiguous tensor (zero-copy)."""
    return as_kernel_array(t.view(torch.int32).view(-1))


@functools.lru_cache(maxsize=None)
def _unused_scratch(device: torch.device):
    """Placeholder partial-result and arrival arrays for launches without a split (never touched)."""
    t = torch.empty(1, dtype=torch.float32, device=device)
    return (as_kernel_array(t),) * 3 + (as_kernel_array(t.view(torch.int32)),)


#: Arrival counters allocated at least this many at a time: every automatic split plan fits (it splits only while
#: sequences x head blocks stay under one wave of resident blocks).
MIN_ARRIVALS = 4096
_arrivals: dict = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters, one per unit of work that several blocks share (a (sequence, head block) of a split
    decode launch, a row of the sampling kernel), kept for the device's lifetime: the last block of each unit
    sets its counter back to 0, so launches and graph replays share them without a memset. Launches on one
    device must not run concurrently (one stream, as the engine's layers run)."""
    counters = _arrivals.get(device)
    if counters is None or counters.numel() < count:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"a launch of {count} units during CUDA graph capture needs its arrival counters "
                               f"first made by a launch outside capture")
        counters = torch.zeros(max(MIN_ARRIVALS, 1 << (count - 1).bit_length()), dtype=torch.int32, device=device)
        _arrivals[device] = counters
    return counters


def _validate(query, key_cache, value_cache, block_tables, context_lens, scale, out, max_context_len):
    _, block_size, num_kv_heads, head_dim = V.check_cache(key_cache, value_cache)
    num_seqs, num_heads = V.check_query(query, num_kv_heads, head_dim, key_cache.dtype)
    V.check_device(query=query, key_cache=key_cache, value_cache=value_cache)
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        V.check_aligned(name, t)
    max_blocks, scale, max_context_len = _check_step(query, block_tables, context_lens, block_size, scale, out,
                                                     max_context_len)
    return num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale, max_context_len


def _check_step(query, block_tables, context_lens, block_size, scale, out, max_context_len):
    """The checks every decode call shares, after the query's and the caches' own; returns
    ``(max_blocks_per_seq, scale, max_context_len)``."""
    num_seqs, _, head_dim = query.shape
    max_blocks = V.check_block_tables(block_tables, num_seqs)
    V.check_context_lens(context_lens, num_seqs)
    V.check_device(query=query, block_tables=block_tables, context_lens=context_lens)
    if query.dtype == torch.bfloat16 and not simulator_enabled():
        major, _ = torch.cuda.get_device_capability(query.device)
        if major < 8:
            raise TypeError("bfloat16 needs a GPU of compute capability 8.0 or newer")
    scale = V.check_scale(scale, head_dim)
    if out is not None:
        V.check_out(out, query)
    if max_context_len is None:
        max_context_len = V.check_context_lens_values(context_lens, block_size, max_blocks)
    else:
        max_context_len = V.check_max_context_len(max_context_len, block_size, max_blocks)
    return max_blocks, scale, max_context_len


def paged_attention(query, key_cache, value_cache, block_tables, context_lens, *, scale=None, version="v2",
                    out=None, max_context_len=None):
    """Attention of one new token per sequence over its cached tokens.

    query ``[num_seqs, num_heads, head_dim]``; caches ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    block_tables int32 ``[num_seqs, max_blocks_per_seq]``; context_lens int32 ``[num_seqs]`` (each >= 1).
    Returns ``[num_seqs, num_heads, head_dim]`` in the query's dtype (written into ``out`` if given).
    ``max_context_len``: a host-side upper bound on ``context_lens``; with it the call never synchronises.
    """
    if version == "v1":
        return decode_v1(query, key_cache, value_cache, block_tables, context_lens, scale=scale, out=out,
                                  max_context_len=max_context_len)
    if version == "v2":
        return decode_v2(query, key_cache, value_cache, block_tables, context_lens, scale=scale, out=out,
                                  max_context_len=max_context_len)
    raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")


def decode_v1(query, key_cache, value_cache, block_tables, context_lens, *, scale=None, out=None,
                       max_context_len=None):
    """The two-pass kernel (see paged_attention_v1.py); logits go to an fp32 scratch of max_context_len."""
    num_seqs, num_heads, _, _, _, _, scale, max_context_len = _validate(
        query, key_cache, value_cache, block_tables, context_lens, scale, out, max_context_len)
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    logits = torch.empty(num_seqs, num_heads, max_context_len, dtype=torch.float32, device=query.device)
    kernel = build_v1_kernel(DTYPE_NAMES[query.dtype])
    word = lambda t: as_kernel_array(t.view(torch.int32))  # noqa: E731  (zero-copy word views)
    kernel[(num_heads, num_seqs), THREADS, current_stream()](
        word(out), word(query), word(key_cache), word(value_cache), as_kernel_array(block_tables),
        as_kernel_array(context_lens), as_kernel_array(logits), np.float32(scale))
    return out


def decode_v2(query, key_cache, value_cache, block_tables, context_lens, *, scale=None, out=None,
              max_context_len=None, partition_size=None, tokens_per_group=None, max_registers=None,
              max_heads_per_block=V.MAX_GROUP_PER_BLOCK, tensor_cores=None):
    """The one-pass kernel (see paged_attention_v2.py, and paged_attention_tc.py for the tensor-core variant
    used where ``tc_config`` picks it). ``partition_size`` (tokens) overrides the split-KV plan; the other
    keyword arguments after it are tuning knobs for benchmarks (``tensor_cores``: None = automatic, or a
    (chunks, register cap) pair to force the tensor-core kernel, False to force the CUDA-core one)."""
    num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale, max_context_len = _validate(
        query, key_cache, value_cache, block_tables, context_lens, scale, out, max_context_len)
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    launch = _plan(query, num_kv_heads, max_context_len, partition_size, tokens_per_group, max_registers,
                   max_heads_per_block, tensor_cores)
    _launch(launch, out, query, _row_words_stride(query), key_cache, value_cache, block_tables, context_lens,
            num_kv_heads, block_size, scale, _no_rope(query.device))
    return out


@dataclass(frozen=True)
class _Launch:
    kernel: object
    num_units: int       # blocks per (sequence, partition): KV heads x head blocks
    partition_size: int
    num_partitions: int
    tensor_cores: tuple | None


def _plan(query, num_kv_heads, max_context_len, partition_size=None, tokens_per_group=None, max_registers=None,
          max_heads_per_block=V.MAX_GROUP_PER_BLOCK, tensor_cores=None, rope=False) -> _Launch:
    """The kernel, grid and split-KV plan of a V2 launch (``decode_v2``'s tuning knobs; ``rope``: the
    tensor-core kernel fused with RoPE and the cache write, which the caller has checked is the one planned)."""
    num_seqs, num_heads, head_dim = query.shape
    dtype_name = DTYPE_NAMES[query.dtype]
    sms = num_sms(query.device.index)
    group = num_heads // num_kv_heads
    tc = tensor_cores
    if tc is None:
        tc = tc_config(dtype_name, head_dim, group, num_seqs * num_kv_heads, max_context_len, sms)
    if tc and not tc_supported(dtype_name, head_dim, group):
        raise ValueError(f"tensor_cores: no tensor-core kernel for {dtype_name}, head_dim {head_dim}, "
                         f"group {group}")
    if tc:
        chunks, registers = tc
        registers = registers if max_registers is None else (max_registers or None)
        num_units = num_kv_heads
        kernel = build_tc_kernel(dtype_name, head_dim, chunks, registers, rope)
    else:
        heads, tokens, registers = v2_config(group, max_heads_per_block)
        tokens = tokens_per_group or tokens
        registers = registers if max_registers is None else (max_registers or None)  # 0: no cap
        num_units = num_kv_heads * (group // heads)
        kernel = build_v2_kernel(dtype_name, head_dim, heads, tokens, registers)
    if partition_size is None:
        partition_size, num_partitions = split_plan(num_seqs * num_units, max_context_len, sms,
                                                    blocks_per_sm(registers))
    elif isinstance(partition_size, bool) or not isinstance(partition_size, int) or partition_size < 1:
        raise ValueError(f"partition_size must be a positive int, got {partition_size!r}")
    else:
        num_partitions = -(-max_context_len // partition_size)
        if num_partitions > MAX_GRID_Z:
            raise ValueError(f"partition_size {partition_size} splits max_context_len {max_context_len} into "
                             f"{num_partitions} partitions; the grid holds at most {MAX_GRID_Z}")
    return _Launch(kernel, num_units, partition_size, num_partitions, tc or None)


def _launch(plan: _Launch, out, query, q_row_words, key_cache, value_cache, block_tables, context_lens, num_kv_heads,
            block_size, scale, rope_args):
    """Launch a planned V2 kernel on torch's stream (scratch for a split; ``rope_args``: the fused kernel's
    new k/v rows, cos, sin and slot mapping, or placeholders)."""
    num_seqs, num_heads, head_dim = out.shape
    device = query.device
    if plan.num_partitions > 1:
        rows = num_seqs * num_heads * plan.num_partitions
        part_m = torch.empty(rows, dtype=torch.float32, device=device)
        part_l = torch.empty(rows, dtype=torch.float32, device=device)
        part_o = torch.empty(rows * head_dim, dtype=torch.float32, device=device)
        arrivals = arrival_counters(device, num_seqs * plan.num_units)
        scratch = tuple(as_kernel_array(t) for t in (part_m, part_l, part_o, arrivals))
    else:
        scratch = _unused_scratch(device)
    plan.kernel[(plan.num_units, num_seqs, plan.num_partitions), THREADS, current_stream()](
        _words(out), *scratch, _row_words(query), q_row_words, _words(key_cache), _words(value_cache),
        as_kernel_array(block_tables.view(-1)), as_kernel_array(context_lens), num_heads, num_kv_heads,
        block_tables.shape[1], block_size.bit_length() - 1, plan.partition_size, plan.num_partitions,
        np.float32(scale), *rope_args)


def _row_words_stride(t: torch.Tensor) -> int:
    """32-bit words from one row (dim 0) of ``t`` to the next."""
    return t.stride(0) * t.element_size() // 4


def _row_words(t: torch.Tensor):
    """Flat int32 word view of a tensor whose rows (dim 0) may lie apart (a slice of a fused projection): from
    its first word to the last word of its last row, zero-copy."""
    if t.is_contiguous():
        return _words(t)
    span = (t.shape[0] - 1) * t.stride(0) + t[0].numel()
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return as_kernel_array(flat.view(torch.int32))


@functools.lru_cache(maxsize=None)
def _no_rope(device: torch.device):
    """Placeholder arguments of a kernel launched without RoPE fusion (never read)."""
    words = as_kernel_array(torch.zeros(4, dtype=torch.int32, device=device))
    slots = as_kernel_array(torch.full((1,), -1, dtype=torch.int64, device=device))
    return words, 0, words, 0, words, words, slots, 0


def rope_paged_attention(query, key, value, cos, sin, key_cache, value_cache, slot_mapping, block_tables,
                         context_lens, *, scale=None, out=None, max_context_len=None, partition_size=None):
    """A decode step's attention with RoPE and the new tokens' cache write: ``layer_ops.rope_write_kv`` then
    ``paged_attention``, in one launch where the tensor-core kernel serves the shape (``tc_config``) and every
    row allows 16-byte loads, else in those two.

    query/key/value ``[num_seqs, H or KH, D]`` before RoPE, row i the new token of sequence i (rows may be slices
    of the fused qkv projection); cos/sin float32 ``[num_seqs, D/2]``; slot_mapping int64 ``[num_seqs]`` (-1:
    don't store); caches, block_tables, context_lens and the keywords as for ``decode_v2``. A stored token
    must be its sequence's last cached position (``context_lens[i] - 1`` through ``block_tables``), as in every
    decode step: the fused kernel stores it from the block that reads that position, and no other block sees it.
    Returns the attention output ``[num_seqs, H, D]`` (dense, in ``out`` if given)."""
    num_seqs, num_heads, num_kv_heads, head_dim = check_rope_inputs(query, key, value, cos, sin, key_cache,
                                                                    value_cache, slot_mapping)
    block_size = key_cache.shape[1]
    _, scale, max_context_len = _check_step(query, block_tables, context_lens, block_size, scale, out,
                                            max_context_len)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
    if num_seqs == 0:
        return out
    plan = _plan(query, num_kv_heads, max_context_len, partition_size, rope=True)
    if plan.tensor_cores is not None and all(_vector_rows(t) for t in (query, key, value, cos, sin)):
        rope_args = (_row_words(key), _row_words_stride(key), _row_words(value), _row_words_stride(value),
                     _words(cos), _words(sin), as_kernel_array(slot_mapping), key_cache.shape[0] * block_size)
    else:  # rotate and store first, then the planned kernel (unfused) on the rotated, dense query
        query = rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)
        if plan.tensor_cores is not None:
            plan = _plan(query, num_kv_heads, max_context_len, partition_size)
        rope_args = _no_rope(query.device)
    _launch(plan, out, query, _row_words_stride(query), key_cache, value_cache, block_tables, context_lens,
            num_kv_heads, block_size, scale, rope_args)
    return out


def _vector_rows(t: torch.Tensor) -> bool:
    """Whether every row (dim 0) of ``t`` starts on a 16-byte boundary (the fused kernel's loads)."""
    return t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
