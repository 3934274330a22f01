"""Paged prefill attention: the new tokens of many sequences attend causally over the paged KV cache.

Used for plain prefill, for prompts whose prefix is already cached (prefix caching), for chunked prefill and
for recomputation after preemption. Sequence ``i`` contributes ``q_len_i`` new tokens, packed into ``query``
at rows ``cu_seqlens_q[i] .. cu_seqlens_q[i+1]``; they are the *last* ``q_len_i`` of its ``context_lens[i]``
tokens, whose K/V are already in the cache. Query row ``r`` of the sequence sits at absolute position
``context_len - q_len + r`` and sees cache positions ``<=`` that (causal with an offset).

fp16 and bf16 run on the tensor cores (FlashAttention-2 style: ``mma.sync.m16n8k16``, ``ldmatrix`` and
``cp.async`` through inline PTX, see ``mma.py``); fp32 runs a simple CUDA-core kernel::

    tensor cores  grid (num_q_tiles, num_seqs, num_heads)  block (x, s, h): 16 * warps query rows of sequence s,
                                                            head h, the last rows first
                  threads 32 * warps (4 or 8)              warp w: 16 query rows (one mma A tile); lane 4g + t:
                                                            rows g, g + 8 and columns 2t, 2t + 1 of each C tile
    fp32          grid (max_q_len, num_seqs, num_heads)    block (r, s, h): query row r of sequence s, head h
                  threads 64                               thread i: key n0 + i of each step, then output
                                                            elements i, i + 64, ...

The comment above each kernel draws its tiles, cache indexing and the causal offset in full. Under Numba's CUDA
simulator the PTX intrinsics are replaced by plain-Python twins, so the tests run the real kernel code.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from .common import LOG2E, NEG_INF, max_registers_option, num_sms, word_codec
from .mma import (SMEM_ALIGN, cp_async16, cp_async_wait_all, ldmatrix_x4, ldmatrix_x4_trans, mma_bf16, mma_f16,
                  quad_max, quad_sum)
from .ptx import ld_i32_at, st_u32_at
from .runtime import as_kernel_array, current_stream, launch
from .validation import (check_block_tables, check_cache, check_context_lens, check_device, check_out,
                         check_query, check_scale, check_tensor)

WARPS = (4, 8)      # warps per block of the tensor-core kernel (16 query rows each); see choose_warps
FP32_THREADS = 64   # threads per block of the fp32 kernel (one key each per step)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
MASK32 = 0xFFFFFFFF  # 32-bit words are stored as uint32 whatever sign the helpers return them with


def keys_per_tile(head_dim: int) -> int:
    """K/V rows staged in shared memory per step. BN * head_dim <= 4096 keeps each warp's work per tile at 64
    mma instructions, which the compiler unrolls completely: every register array is then indexed by constants
    and stays in registers (a larger tile leaves a loop rolled and spills the accumulators to local memory).
    It also keeps the two double-buffered K and V tiles within the 48 KB of static shared memory."""
    return min(64, 4096 // head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Tensor-core kernel (fp16 / bf16)
#
#   grid    (num_q_tiles, num_seqs, num_heads)  block (x, s, h) computes query rows m0 .. m0 + BM - 1 of sequence
#           s for query head h (BM = 16 * warps), where m0 = BM * (num_q_tiles - 1 - x): the last tiles, which
#           see the most keys, start first. A block whose m0 >= q_len (a shorter sequence) returns at once.
#   threads 32 * warps; warp w owns query rows m0 + 16w .. m0 + 16w + 15 (one mma A tile); inside a warp,
#           lane = 4g + t holds rows g and g + 8 of that tile, and columns 2t, 2t + 1 of every 8-wide C tile.
#
#   query, out       [total_q_tokens, num_heads, W]       W = head_dim / 2 32-bit words (two 16-bit values each)
#   key/value_cache  [num_blocks, block_size, num_kv_heads, W]
#   (all seven tensors arrive as data_ptr() byte addresses; the int32 ones are read with ld_i32_at)
#   cache position j of sequence s:  block_tables[s, j // block_size], offset j % block_size
#   kv_head = h // (num_heads // num_kv_heads)
#
#   query row r (0 <= r < q_len) = packed token cu_seqlens_q[s] + r, absolute position pos = offset + r with
#   offset = context_len - q_len; it sees keys j <= pos. The block needs keys 0 .. kv_end - 1,
#   kv_end = offset + min(m0 + BM, q_len), walked in tiles of BN keys (keys_per_tile).
#
# Per K/V tile, in shared memory, two buffers each (tile n0 / BN uses buffer (n0 / BN) % 2):
#   k_tile, v_tile [BN keys][W + 4 words]: the cache rows as they are. The +4 word padding puts the 8 rows
#   an ldmatrix phase reads (consecutive keys, 16 bytes each) on 8 distinct groups of 4 banks.
#   1. fetch: thread tid copies 16-byte pieces c = tid, tid + NT, .. of the *next* tile straight to shared
#      memory with cp.async (key c // (W / 4), bytes 16 * (c % (W / 4)) ..; one block-table read serves the
#      K and the V piece). Keys >= kv_end are zero-filled, so no stale NaN of the cache can leak into P V.
#      The copies fly while the current tile's math runs; each thread waits for its own at the end of the
#      tile, and the tile's one barrier publishes them (and frees the buffer just read for the next fetch).
#   2. each warp whose rows see any key of the tile computes S = Q K^T (BN / 8 C tiles, head_dim / 16 mma each,
#      Q kept in registers as A fragments for the whole kernel; one ldmatrix.x4 gives the B fragments of two
#      8-key C tiles), masks keys j > pos on tiles crossing the diagonal, and updates the online softmax in
#      base 2 (scale * log2(e) folded in): row max m (shared by the 4 lanes of a row through two shuffles),
#      running sum l (per lane, reduced at the end), O *= 2^(m_old - m).
#   3. O += P V: the S accumulators become A fragments as they are (C tiles 2k, 2k+1 = A tile k, rounded to
#      16 bits); one ldmatrix.x4.trans of V rows gives the B fragments of two 8-dim C tiles of O.
#   ldmatrix lane roles (lane l gives the address of one 16-byte row; see mma.py):
#      K: key n = 16 * pair + 8 * (l // 16) + l % 8, dims 16 * ks + 8 * ((l // 8) % 2) ..  -> b0, b1 of C tile
#         2 * pair, then b0, b1 of C tile 2 * pair + 1
#      V: key n = 16 * kp + 8 * ((l // 8) % 2) + l % 8, dims 8 * (2 * pair + l // 16) ..  -> b0, b1 of O tile
#         2 * pair, then b0, b1 of O tile 2 * pair + 1
# Tiles entirely above a warp's diagonal are skipped by that warp; the block still passes the barriers.
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def build_tensor_core_kernel(head_dim: int, block_size: int, bf16: bool, warps: int,
                             max_registers: int | None = None):
    BM = 16 * warps               # query rows per block
    NT = 32 * warps               # threads per block
    W = head_dim // 2             # 32-bit words per row
    BN = keys_per_tile(head_dim)  # keys per K/V tile
    ROW = W + 4                   # shared words per key row
    TILE = BN * ROW               # shared words per tile buffer
    KS = head_dim // 16           # mma k-steps of S = Q K^T
    NS = BN // 8                  # 8-key C tiles of S
    KP = BN // 16                 # mma k-steps of O += P V
    NO = head_dim // 8            # 8-column C tiles of O
    CHUNKS = W // 4               # 16-byte pieces per key row
    JOBS = BN * CHUNKS            # pieces per K (or V) tile
    STEPS = -(-JOBS // NT)        # pieces per thread
    # array sizes must be compile-time constants
    Q_WORDS, S_FLOATS, O_FLOATS, BUFFERS = KS * 4, NS * 4, NO * 4, 2 * TILE
    mma = mma_bf16 if bf16 else mma_f16
    _, _, pack = word_codec("bfloat16" if bf16 else "float16")

    @cuda.jit(device=True, inline=True)
    def fetch(k_tile, v_tile, buf, key_cache, value_cache, table_row, row_bytes, n0, kv_end, tid):
        """Start copying keys n0 .. n0 + BN - 1 (zeros past kv_end) into shared buffer ``buf``."""
        for i in range(STEPS):
            job = i * NT + tid
            if JOBS % NT == 0 or job < JOBS:
                key = job // CHUNKS
                j = n0 + key
                src = min(j, kv_end - 1)          # a zero-filled piece still names a valid address
                block = ld_i32_at(table_row + 4 * (src // block_size))
                offset = (block * block_size + src % block_size) * row_bytes + 16 * (job % CHUNKS)
                nbytes = 16 if j < kv_end else 0
                dst = buf * TILE + key * ROW + 4 * (job % CHUNKS)
                cp_async16(k_tile, dst, key_cache + offset, nbytes)
                cp_async16(v_tile, dst, value_cache + offset, nbytes)

    @cuda.jit(fastmath=True, **max_registers_option(max_registers))
    def kernel(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out,
               max_blocks, num_heads, num_kv_heads, scale_log2):
        k_tile = cuda.shared.array(BUFFERS, np.uint32, alignment=SMEM_ALIGN)  # two buffers: one read while
        v_tile = cuda.shared.array(BUFFERS, np.uint32, alignment=SMEM_ALIGN)  # the other is filled
        q_frag = cuda.local.array(Q_WORDS, np.uint32)    # A fragments of this lane's two query rows
        s = cuda.local.array(S_FLOATS, np.float32)       # S (then P) C fragments of the current tile
        o = cuda.local.array(O_FLOATS, np.float32)       # O C fragments

        seq = cuda.blockIdx.y
        head = cuda.blockIdx.z
        q_start = ld_i32_at(cu_seqlens_q + 4 * seq)
        q_len = ld_i32_at(cu_seqlens_q + 4 * seq + 4) - q_start
        m0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x) * BM
        if m0 >= q_len:
            return
        offset = ld_i32_at(context_lens + 4 * seq) - q_len
        kv_end = offset + min(m0 + BM, q_len)
        kv_head = head // (num_heads // num_kv_heads)
        table_row = block_tables + 4 * seq * max_blocks
        row_bytes = num_kv_heads * 4 * W                  # bytes per token in the cache
        key_cache += 4 * W * kv_head
        value_cache += 4 * W * kv_head
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4
        t = lane % 4
        k_lane = (lane % 8 + 8 * (lane // 16)) * ROW + 4 * ((lane // 8) % 2)   # ldmatrix row of this lane
        v_lane = (lane % 8 + 8 * ((lane // 8) % 2)) * ROW + 4 * (lane // 16)

        # Start the first tile's copies, then load Q while they fly.
        fetch(k_tile, v_tile, 0, key_cache, value_cache, table_row, row_bytes, 0, kv_end, tid)
        w0 = m0 + 16 * warp                  # first query row of this warp
        warp_active = w0 < q_len
        warp_last_pos = offset + min(w0 + 15, q_len - 1)
        row_g = w0 + g
        row_g8 = row_g + 8
        pos_g = offset + row_g if row_g < q_len else -1      # -1: padding row, sees nothing
        pos_g8 = offset + row_g8 if row_g8 < q_len else -1
        q_g = 4 * ((q_start + row_g) * num_heads + head) * W    # byte offsets of the two rows
        q_g8 = 4 * ((q_start + row_g8) * num_heads + head) * W
        for ks in range(KS):
            for half in range(2):
                word = ks * 8 + half * 4 + t
                q_frag[ks * 4 + half * 2] = (ld_i32_at(query + q_g + 4 * word) if row_g < q_len else 0) & MASK32
                q_frag[ks * 4 + half * 2 + 1] = (ld_i32_at(query + q_g8 + 4 * word) if row_g8 < q_len else 0) & MASK32
        for i in range(O_FLOATS):
            o[i] = ZERO
        m_g = NEG_INF
        m_g8 = NEG_INF
        l_g = ZERO
        l_g8 = ZERO
        cp_async_wait_all()
        cuda.syncthreads()

        for n0 in range(0, kv_end, BN):
            # 1. tile n0 is in buffer cur; start copying the next one into the other buffer
            cur = (n0 // BN) % 2
            if n0 + BN < kv_end:
                fetch(k_tile, v_tile, 1 - cur, key_cache, value_cache, table_row, row_bytes, n0 + BN, kv_end, tid)
            k_base = cur * TILE + k_lane
            v_base = cur * TILE + v_lane

            if warp_active and n0 <= warp_last_pos:
                # 2. S = Q K^T, scaled to base 2
                for pair in range(NS // 2):
                    c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = ZERO
                    for ks in range(KS):
                        b0, b1, b2, b3 = ldmatrix_x4(k_tile, k_base + pair * 16 * ROW + ks * 8)
                        c0, c1, c2, c3 = mma(q_frag[ks * 4], q_frag[ks * 4 + 1], q_frag[ks * 4 + 2],
                                             q_frag[ks * 4 + 3], b0, b1, c0, c1, c2, c3)
                        d0, d1, d2, d3 = mma(q_frag[ks * 4], q_frag[ks * 4 + 1], q_frag[ks * 4 + 2],
                                             q_frag[ks * 4 + 3], b2, b3, d0, d1, d2, d3)
                    s[pair * 8] = c0 * scale_log2
                    s[pair * 8 + 1] = c1 * scale_log2
                    s[pair * 8 + 2] = c2 * scale_log2
                    s[pair * 8 + 3] = c3 * scale_log2
                    s[pair * 8 + 4] = d0 * scale_log2
                    s[pair * 8 + 5] = d1 * scale_log2
                    s[pair * 8 + 6] = d2 * scale_log2
                    s[pair * 8 + 7] = d3 * scale_log2
                if n0 + BN - 1 > offset + w0:  # the tile crosses this warp's diagonal
                    for nt in range(NS):
                        j = n0 + nt * 8 + 2 * t
                        if j > pos_g:
                            s[nt * 4] = NEG_INF
                        if j + 1 > pos_g:
                            s[nt * 4 + 1] = NEG_INF
                        if j > pos_g8:
                            s[nt * 4 + 2] = NEG_INF
                        if j + 1 > pos_g8:
                            s[nt * 4 + 3] = NEG_INF
                # online softmax
                mx_g = m_g
                mx_g8 = m_g8
                for nt in range(NS):
                    mx_g = max(mx_g, max(s[nt * 4], s[nt * 4 + 1]))
                    mx_g8 = max(mx_g8, max(s[nt * 4 + 2], s[nt * 4 + 3]))
                mx_g = quad_max(mx_g)
                mx_g8 = quad_max(mx_g8)
                base_g = mx_g if mx_g > NEG_INF else ZERO     # a row with no visible key yet keeps P = 0
                base_g8 = mx_g8 if mx_g8 > NEG_INF else ZERO
                alpha_g = math.exp2(m_g - base_g)
                alpha_g8 = math.exp2(m_g8 - base_g8)
                m_g = mx_g
                m_g8 = mx_g8
                l_g *= alpha_g
                l_g8 *= alpha_g8
                for nt in range(NO):
                    o[nt * 4] *= alpha_g
                    o[nt * 4 + 1] *= alpha_g
                    o[nt * 4 + 2] *= alpha_g8
                    o[nt * 4 + 3] *= alpha_g8
                for nt in range(NS):
                    s[nt * 4] = math.exp2(s[nt * 4] - base_g)
                    s[nt * 4 + 1] = math.exp2(s[nt * 4 + 1] - base_g)
                    s[nt * 4 + 2] = math.exp2(s[nt * 4 + 2] - base_g8)
                    s[nt * 4 + 3] = math.exp2(s[nt * 4 + 3] - base_g8)
                    l_g += s[nt * 4] + s[nt * 4 + 1]
                    l_g8 += s[nt * 4 + 2] + s[nt * 4 + 3]

                # 3. O += P V
                for kp in range(KP):
                    p0 = pack(s[kp * 8], s[kp * 8 + 1])
                    p1 = pack(s[kp * 8 + 2], s[kp * 8 + 3])
                    p2 = pack(s[kp * 8 + 4], s[kp * 8 + 5])
                    p3 = pack(s[kp * 8 + 6], s[kp * 8 + 7])
                    for pair in range(NO // 2):
                        b0, b1, b2, b3 = ldmatrix_x4_trans(v_tile, v_base + kp * 16 * ROW + pair * 8)
                        nt = 2 * pair
                        o[nt * 4], o[nt * 4 + 1], o[nt * 4 + 2], o[nt * 4 + 3] = mma(
                            p0, p1, p2, p3, b0, b1, o[nt * 4], o[nt * 4 + 1], o[nt * 4 + 2], o[nt * 4 + 3])
                        o[nt * 4 + 4], o[nt * 4 + 5], o[nt * 4 + 6], o[nt * 4 + 7] = mma(
                            p0, p1, p2, p3, b2, b3, o[nt * 4 + 4], o[nt * 4 + 5], o[nt * 4 + 6], o[nt * 4 + 7])
            cp_async_wait_all()
            cuda.syncthreads()  # the next tile is in place, and no one reads this buffer any more

        if warp_active:
            l_g = quad_sum(l_g)
            l_g8 = quad_sum(l_g8)
            if row_g < q_len:
                inv = ONE / l_g
                for nt in range(NO):
                    st_u32_at(out + q_g + 4 * (nt * 4 + t), pack(o[nt * 4] * inv, o[nt * 4 + 1] * inv) & MASK32)
            if row_g8 < q_len:
                inv = ONE / l_g8
                for nt in range(NO):
                    st_u32_at(out + q_g8 + 4 * (nt * 4 + t),
                              pack(o[nt * 4 + 2] * inv, o[nt * 4 + 3] * inv) & MASK32)

    return kernel


# ---------------------------------------------------------------------------------------------------------------
# fp32 kernel (CUDA cores)
#
#   grid    (max_q_len, num_seqs, num_heads)  block (r, s, h) computes query row r of sequence s for head h
#           (returns at once if r >= q_len); threads 64.
#   Steps of 64 keys: thread i scores key n0 + i against the pre-scaled query row (kept in shared memory),
#   the block takes the step's max from the shared scores, rescales, and thread i then accumulates output
#   elements d = i, i + 64, ... over the step's keys (coalesced V reads).
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def build_fp32_kernel(head_dim: int, block_size: int):
    D = head_dim
    PER_THREAD = (D + FP32_THREADS - 1) // FP32_THREADS

    @cuda.jit
    def kernel(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out,
               num_heads, num_kv_heads, scale):
        q_row = cuda.shared.array(D, np.float32)
        p = cuda.shared.array(FP32_THREADS, np.float32)          # scores, then probabilities, of one step
        base = cuda.shared.array(FP32_THREADS, np.int64)         # cache offset of each key of the step
        acc = cuda.local.array(PER_THREAD, np.float32)

        row = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        head = cuda.blockIdx.z
        q_start = cu_seqlens_q[seq]
        q_len = cu_seqlens_q[seq + 1] - q_start
        if row >= q_len:
            return
        pos = context_lens[seq] - q_len + row               # sees keys 0 .. pos
        kv_head = head // (num_heads // num_kv_heads)
        tid = cuda.threadIdx.x
        q_off = ((q_start + row) * num_heads + head) * D
        for d in range(tid, D, FP32_THREADS):
            q_row[d] = query[q_off + d] * scale
        for i in range(PER_THREAD):
            acc[i] = ZERO
        m = NEG_INF
        l = ZERO
        cuda.syncthreads()

        for n0 in range(0, pos + 1, FP32_THREADS):
            j = n0 + tid
            score = NEG_INF
            if j <= pos:
                block = block_tables[seq, j // block_size]
                kb = ((block * block_size + j % block_size) * num_kv_heads + kv_head) * D
                base[tid] = kb
                score = ZERO
                for d in range(D):
                    score += q_row[d] * key_cache[kb + d]
            p[tid] = score
            cuda.syncthreads()
            m_new = m
            for i in range(FP32_THREADS):
                m_new = max(m_new, p[i])
            cuda.syncthreads()  # all reads of the scores precede their replacement
            p[tid] = math.exp(score - m_new)
            alpha = math.exp(m - m_new)
            m = m_new
            cuda.syncthreads()
            n = min(FP32_THREADS, pos + 1 - n0)
            l *= alpha
            for i in range(n):
                l += p[i]
            for i in range(PER_THREAD):
                d = tid + i * FP32_THREADS
                if d < D:
                    a = acc[i] * alpha
                    for jj in range(n):
                        a += p[jj] * value_cache[base[jj] + d]
                    acc[i] = a
            cuda.syncthreads()  # the step's probabilities are consumed before the next step

        for i in range(PER_THREAD):
            d = tid + i * FP32_THREADS
            if d < D:
                out[q_off + d] = acc[i] / l

    return kernel


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------
def _check_lengths(cu_seqlens_q, context_lens, num_tokens: int, capacity: int) -> int:
    """Reads cu_seqlens_q and context_lens (one device sync), checks them, returns the longest q_len."""
    values = torch.cat([cu_seqlens_q, context_lens]).tolist()
    num_seqs = context_lens.shape[0]
    cu, ctx = values[:num_seqs + 1], values[num_seqs + 1:]
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at total_q_tokens = {num_tokens}, "
                         f"got {cu[0]} .. {cu[-1]}")
    q_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in q_lens):
        raise ValueError("cu_seqlens_q must be non-decreasing")
    for i, (n, c) in enumerate(zip(q_lens, ctx)):
        if not 1 <= c <= capacity:
            raise ValueError(f"context_lens[{i}] = {c} must lie in [1, {capacity}] "
                             f"(block_tables columns x block_size)")
        if n > c:
            raise ValueError(f"sequence {i} has q_len {n} > context_lens[{i}] = {c}; the new tokens must "
                             f"already be in the cache")
    return max(q_lens, default=0)


def paged_prefill_attention(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, *,
                            scale=None, out=None, max_q_len=None):
    """Causal attention of packed new tokens over the paged KV cache.

    query ``[total_q_tokens, num_heads, head_dim]``: the new tokens of all sequences, sequence i at rows
    ``cu_seqlens_q[i] .. cu_seqlens_q[i+1]`` (int32 ``[num_seqs + 1]``); they are the last ``q_len_i`` of the
    ``context_lens[i]`` tokens (int32 ``[num_seqs]``) whose K/V are already in ``key_cache``/``value_cache``
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` through ``block_tables`` (int32
    ``[num_seqs, max_blocks_per_seq]``). Returns ``[total_q_tokens, num_heads, head_dim]`` in the query's dtype
    (written into ``out`` if given). ``scale`` defaults to ``head_dim ** -0.5``.

    Without ``max_q_len`` (a host int, the longest q_len), the lengths are read back and checked (one device
    sync); with it nothing is read back and the caller vouches for ``cu_seqlens_q`` and ``context_lens``.
    """
    _, block_size, num_kv_heads, head_dim = check_cache(key_cache, value_cache)
    num_tokens, num_heads = check_query(query, num_kv_heads, head_dim, key_cache.dtype)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtype=torch.int32)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have num_seqs + 1 >= 1 entries, got shape (0,)")
    num_seqs = cu_seqlens_q.shape[0] - 1
    max_blocks = check_block_tables(block_tables, num_seqs)
    check_context_lens(context_lens, num_seqs)
    check_device(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                 cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    scale = check_scale(scale, head_dim)
    if out is None:
        out = torch.empty_like(query)
    else:
        check_out(out, query)
    if max_q_len is None:
        max_q_len = _check_lengths(cu_seqlens_q, context_lens, num_tokens, max_blocks * block_size)
    elif isinstance(max_q_len, bool) or not isinstance(max_q_len, int):
        raise TypeError(f"max_q_len must be a Python int, got {type(max_q_len).__name__}")
    elif not 0 <= max_q_len <= num_tokens:
        raise ValueError(f"max_q_len must lie in [0, total_q_tokens = {num_tokens}], got {max_q_len}")
    if num_seqs == 0 or max_q_len == 0:
        return out
    if query.is_cuda and query.device.index != torch.cuda.current_device():
        with torch.cuda.device(query.device):  # the kernel reads raw addresses of this device
            return launch_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out,
                                  scale, max_q_len)
    return launch_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out,
                          scale, max_q_len)


def choose_warps(max_q_len: int, num_seqs: int, num_heads: int) -> int:
    """Warps per block, for the current device. 8 warps (128 query rows per block) halve the K/V staging per
    row and measured faster on the H100 whenever their blocks filled at least half the SMs; with fewer (a
    512-token chunk of 14 heads: 56 blocks) 4 warps and twice the blocks were slightly faster. (Measured when
    tiles were staged through registers; benchmarks/prefill_notes.md lists the variants to re-measure.)"""
    blocks_of_8 = -(-max_q_len // 128) * num_seqs * num_heads
    return WARPS[1] if 2 * blocks_of_8 >= num_sms() else WARPS[0]


def launch_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out, scale: float,
                   max_q_len: int, warps: int | None = None, max_registers: int | None = None):
    """The launch alone, on validated arguments. ``warps`` (None: :func:`choose_warps`) and ``max_registers``
    select variants of the tensor-core kernel."""
    num_seqs = context_lens.shape[0]
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = query.shape[1]
    if query.dtype == torch.float32:
        kernel = build_fp32_kernel(head_dim, block_size)
        flat = [as_kernel_array(t.reshape(-1)) for t in (query, key_cache, value_cache, out)]
        kernel[(max_q_len, num_seqs, num_heads), FP32_THREADS, current_stream()](
            flat[0], flat[1], flat[2], as_kernel_array(block_tables), as_kernel_array(cu_seqlens_q),
            as_kernel_array(context_lens), flat[3], num_heads, num_kv_heads, np.float32(scale))
    else:
        warps = warps or choose_warps(max_q_len, num_seqs, num_heads)
        kernel = build_tensor_core_kernel(head_dim, block_size, query.dtype == torch.bfloat16, warps, max_registers)
        grid = ((max_q_len + 16 * warps - 1) // (16 * warps), num_seqs, num_heads)
        launch(kernel, grid, 32 * warps,
               query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr(),
               cu_seqlens_q.data_ptr(), context_lens.data_ptr(), out.data_ptr(), block_tables.shape[1],
               num_heads, num_kv_heads, np.float32(scale * LOG2E))
    return out
