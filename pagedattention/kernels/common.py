"""What the kernels share: block sizes, the stand-ins for minus infinity, log2(e), the SM count, and the
conversions between a cache dtype's 32-bit words and float32.

The constants keep the Python types the kernels were written with: Numba types a module-level Python float as
float64 and an ``np.float32`` as float32, so changing one changes the generated code.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from numba import cuda, float32

from . import ptx
from .runtime import simulator_enabled

#: Threads per block of the decode kernels (V1, V2, tensor-core V2), of copy_blocks and of the fused
#: per-layer ops (write_kv: at most).
THREADS = 128

#: The names the kernel builders take for the cache dtypes.
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

#: Minus infinity for the prefill kernel's masked scores and running maxima (a row with no visible key yet is
#: recognised by ``m == NEG_INF``).
NEG_INF = np.float32(-np.inf)
#: The decode kernels' "minus infinity" (V2, tensor-core V2, their split-KV merge): finite, because fastmath
#: assumes no infinities and ``m_old - m_new`` must not overflow.
NEG_BIG = -1.0e30
#: V1's starting maximum (plain float32 arithmetic, no fastmath): a finite float32 below every logit.
NEG_BIG_F32 = float32(-3.0e38)

#: log2(e): kernels that use exp2 fold it into the softmax scale.
LOG2E = 1.4426950408889634

#: SM count assumed under the simulator, which has none: the H100's, so simulated launches are planned (split-KV
#: partitions, prefill warps) as on the card the kernels are tuned for.
SIMULATOR_SMS = 132


def num_sms(device_index: int | None = None) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (None: the current device)."""
    if simulator_enabled():
        return SIMULATOR_SMS
    return _device_sms(torch.cuda.current_device() if device_index is None else device_index)


@functools.lru_cache(maxsize=None)
def _device_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def word_codec(dtype_name: str):
    """``(lo, hi, pack)`` device functions for 32-bit words of ``dtype_name`` ("float16", "bfloat16", "float32").

    ``lo(word)`` / ``hi(word)`` widen the word's first / second 16-bit value to float32; ``pack(a, b)`` rounds two
    float32 values into one word (``a`` first). A float32 word holds one value: ``lo`` and ``hi`` both return it,
    ``pack`` is None and stores go through ``ptx.f32_bits``.
    """
    if dtype_name == "float16":
        return ptx.lo_f16, ptx.hi_f16, ptx.pack_f16x2
    if dtype_name == "bfloat16":
        return ptx.lo_bf16, ptx.hi_bf16, ptx.pack_bf16x2
    if dtype_name == "float32":
        return ptx.as_f32, ptx.as_f32, None
    raise ValueError(f"dtype_name must be 'float16', 'bfloat16' or 'float32', got {dtype_name!r}")


def max_registers_option(max_registers: int | None) -> dict:
    """``cuda.jit`` keyword arguments for a register cap (None: no cap; the simulator takes none)."""
    return {} if max_registers is None or simulator_enabled() else {"max_registers": max_registers}


@cuda.jit(device=True, inline=True)
def sequence_partition(context_lens, seq, max_tokens, min_partition, num_partitions):
    """(context length, tokens per split-KV partition) of sequence ``seq``. The length is cut to ``max_tokens``
    (what its block table covers: a caller's broken promise is never overrun); the partition spreads it evenly
    over the grid's ``num_partitions``, never fewer than ``min_partition`` tokens. Every block of a decode kernel
    computes it alike (the merge counts the working partitions from it), so a grid sized for an upper bound (a
    CUDA graph's) splits each sequence by its own length; a sequence uses ceil(context_len / size) <=
    num_partitions partitions."""
    context_len = min(context_lens[seq], max_tokens)
    return context_len, max((context_len + num_partitions - 1) // num_partitions, min_partition)
