"""PagedAttention V1: the plain two-pass decode kernel, written to be read.

One new query token per sequence attends over that sequence's cached tokens, found through its block table::

    grid    (num_heads, num_seqs)            one thread block per (query head h, sequence s)
    threads 128                              thread t handles tokens t, t+128, t+256, ... in pass 1,
                                             and output words t, t+128, ... in pass 2

    query   [num_seqs, num_heads, W]          W = head_dim * itemsize / 4 (32-bit words; fp16/bf16 pack two
    key/value_cache [num_blocks, block_size,  values per word, element 2w in the low half)
                     num_kv_heads, W]
    logits  [num_seqs, num_heads, max_context_len]   fp32 scratch in global memory (no context-length cap)

    token j of sequence s lives at  cache[block_tables[s, j // block_size], j % block_size, kv_head, :]
                                          \\___ physical block ___/         \\ offset /
    kv_head = h // (num_heads // num_kv_heads)       (GQA: a group of query heads shares one KV head)

Pass 1: logits[j] = scale * q . k_j for every token j, and their maximum (a block-wide tree reduction in shared
memory). Pass 2: p_j = exp(logits[j] - max) (stored back), their sum, and then each thread accumulates
sum_j p_j * v_j for its output words and divides by the sum. fp32 arithmetic throughout.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32

from .common import NEG_BIG_F32, THREADS, word_codec
from .ptx import f32_bits

MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def build_v1_kernel(dtype_name: str):
    """The V1 kernel for one cache dtype ("float16", "bfloat16" or "float32")."""
    pairs = dtype_name != "float32"  # two 16-bit values per 32-bit word
    lo, hi, pack = word_codec(dtype_name)

    @cuda.jit(device=True, inline=True)
    def reduce(buf, value, use_max):
        """Block-wide max (or sum) of one value per thread, through a shared buffer of THREADS floats."""
        tid = cuda.threadIdx.x
        buf[tid] = value
        cuda.syncthreads()
        stride = THREADS // 2
        while stride > 0:
            if tid < stride:
                if use_max:
                    buf[tid] = max(buf[tid], buf[tid + stride])
                else:
                    buf[tid] = buf[tid] + buf[tid + stride]
            cuda.syncthreads()
            stride //= 2
        result = buf[0]
        cuda.syncthreads()  # everyone has read buf[0] before it is reused
        return result

    @cuda.jit
    def kernel(out, query, key_cache, value_cache, block_tables, context_lens, logits, scale):
        head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        num_words = query.shape[2]                      # 32-bit words per head
        block_size = key_cache.shape[1]
        group = query.shape[1] // key_cache.shape[2]    # query heads per KV head
        kv_head = head // group
        # Lengths past the scratch row or the table (a caller's broken promise) are cut, never overrun.
        context_len = min(context_lens[seq], logits.shape[2], block_tables.shape[1] * block_size)

        # The query, widened to fp32 and pre-scaled, shared by all threads.
        q = cuda.shared.array(MAX_HEAD_DIM, float32)
        for w in range(tid, num_words, THREADS):
            word = query[seq, head, w]
            if pairs:
                q[2 * w] = lo(word) * scale
                q[2 * w + 1] = hi(word) * scale
            else:
                q[w] = lo(word) * scale
        cuda.syncthreads()

        # Pass 1: every logit, through the block table.
        thread_max = NEG_BIG_F32
        for j in range(tid, context_len, THREADS):
            block = block_tables[seq, j // block_size]  # physical block of token j
            offset = j % block_size                      # token j's row inside that block
            dot = float32(0.0)
            for w in range(num_words):
                word = key_cache[block, offset, kv_head, w]
                if pairs:
                    dot += q[2 * w] * lo(word) + q[2 * w + 1] * hi(word)
                else:
                    dot += q[w] * lo(word)
            logits[seq, head, j] = dot
            thread_max = max(thread_max, dot)
        red = cuda.shared.array(THREADS, float32)
        logit_max = reduce(red, thread_max, True)

        # Pass 2a: softmax numerators (kept in the scratch row) and their sum.
        thread_sum = float32(0.0)
        for j in range(tid, context_len, THREADS):
            p = math.exp(logits[seq, head, j] - logit_max)
            logits[seq, head, j] = p
            thread_sum += p
        inv_sum = float32(1.0) / reduce(red, thread_sum, False)  # the reduction's barriers publish the p_j

        # Pass 2b: thread t owns output word t (two values for fp16/bf16): sum_j p_j * v_j / sum.
        for w in range(tid, num_words, THREADS):
            acc0 = float32(0.0)
            acc1 = float32(0.0)
            for j in range(context_len):
                block = block_tables[seq, j // block_size]
                word = value_cache[block, j % block_size, kv_head, w]
                p = logits[seq, head, j]
                acc0 += p * lo(word)
                if pairs:
                    acc1 += p * hi(word)
            if pairs:
                out[seq, head, w] = pack(acc0 * inv_sum, acc1 * inv_sum)
            else:
                out[seq, head, w] = f32_bits(acc0 * inv_sum)

    return kernel
