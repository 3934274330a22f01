"""Paged prefill attention: the new tokens of many sequences attend causally over the paged KV cache.

Used for plain prefill, for prompts whose prefix is already cached (prefix caching), for chunked prefill and
for recomputation after preemption. Sequence ``i`` contributes ``q_len_i`` new tokens, packed into ``query``
at rows ``cu_seqlens_q[i] .. cu_seqlens_q[i+1]``; they are the *last* ``q_len_i`` of its ``context_lens[i]``
tokens, whose K/V are already in the cache. Query row ``r`` of the sequence sits at absolute position
``context_len - q_len + r`` and sees cache positions ``<=`` that (causal with an offset).

fp16 and bf16 run on the tensor cores (``mma.sync.m16n8k16`` through inline PTX, FlashAttention-2 style);
fp32 runs a simple CUDA-core kernel (one thread block per query row and head). Under Numba's CUDA simulator,
which cannot run inline PTX, the warp-wide intrinsics are replaced by plain-Python versions that compute the
same fragments, so the tests run the real kernel code.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch
from numba import cuda

from . import ptx
from .runtime import as_kernel_array, current_stream, simulator_enabled
from .validation import (check_block_tables, check_cache, check_context_lens, check_device, check_out,
                         check_query, check_scale, check_tensor)

WARPS = (4, 8)      # warps per block of the tensor-core kernel (16 query rows each); see choose_warps
PREFETCH = True     # load the next K/V tile into registers while the current one is multiplied
FP32_THREADS = 64   # threads per block of the fp32 kernel (one key each per step)
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
LOG2E = 1.4426950408889634
# Shared-memory indices are cast to unsigned: Numba then skips the negative-index wrap-around test, which
# otherwise costs ~6 instructions per shared load in the inner loops.
unsigned = np.uint64
MASK32 = 0xFFFFFFFF  # 32-bit words are stored as uint32 whatever sign the helpers return them with


def keys_per_tile(head_dim: int) -> int:
    """K/V rows staged in shared memory per step. BN * head_dim <= 4096 keeps each warp's work per tile at 64
    mma instructions, which the compiler unrolls completely: every register array is then indexed by constants
    and stays in registers (a larger tile leaves a loop rolled and spills the accumulators to local memory)."""
    return min(64, 4096 // head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Warp-level matrix multiply-accumulate: D[16x8] = A[16x16] @ B[16x8] + C, fp32 accumulators.
#
# Fragment layout (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs); lane = 4 * g + t, g = lane // 4, t = lane % 4:
#   A (row-major 16x16, 4 words): a[0] = A[g, 2t:2t+2]   a[1] = A[g+8, 2t:2t+2]
#                                 a[2] = A[g, 2t+8:2t+10] a[3] = A[g+8, 2t+8:2t+10]
#   B (16x8 given as 8 columns, 2 words): b[0] = B[2t:2t+2, g]   b[1] = B[2t+8:2t+10, g]
#   C, D (16x8 fp32, 4 floats):   c[0], c[1] = C[g, 2t], C[g, 2t+1]   c[2], c[3] = C[g+8, 2t], C[g+8, 2t+1]
# A word holds two 16-bit values, the lower-indexed one in the low half.
# ---------------------------------------------------------------------------------------------------------------
if simulator_enabled():
    _lane = np.arange(32)
    _g, _t = _lane // 4, _lane % 4
    _half = np.arange(2)
    _reg4, _reg2 = np.arange(4), np.arange(2)
    # [lane, register, half] -> row/column of A and B; [lane, register] -> row/column of C.
    _A_ROW = (_g[:, None, None] + 8 * (_reg4[None, :, None] & 1)) + 0 * _half
    _A_COL = 2 * _t[:, None, None] + _half[None, None, :] + 8 * (_reg4[None, :, None] >> 1)
    _B_ROW = 2 * _t[:, None, None] + _half[None, None, :] + 8 * _reg2[None, :, None]
    _B_COL = _g[:, None, None] + 0 * _B_ROW
    _C_ROW = _g[:, None] + 8 * (_reg4[None, :] >> 1)
    _C_COL = 2 * _t[:, None] + (_reg4[None, :] & 1)

    class _SimWarp:
        """One simulated warp's rendezvous: every lane deposits its operands, the last to arrive computes the
        warp-wide result (the barrier's action), then each lane takes its part. Two slots alternate so a fast
        lane's next deposit never overwrites operands of the current one."""

        def __init__(self):
            self.barrier = threading.Barrier(32, action=self._combine, timeout=120.0)
            self.operands = ([None] * 32, [None] * 32)
            self.results = [None, None]
            self.phase = [0] * 32
            self.current = 0
            self.combine = None

        def _combine(self):
            self.results[self.current] = self.combine(self.operands[self.current])

    _sim_lock = threading.Lock()

    def _warp_collective(operands, combine):
        thread = threading.current_thread()
        manager = thread._manager  # the simulator's BlockManager, one per running block
        warp_id, lane = divmod(thread.thread_id, 32)
        with _sim_lock:
            warps = manager.__dict__.setdefault("_prefill_mma_warps", {})
            warp = warps.setdefault(warp_id, _SimWarp())
        slot = warp.phase[lane]
        warp.phase[lane] ^= 1
        warp.operands[slot][lane] = operands
        warp.current, warp.combine = slot, combine
        warp.barrier.wait()
        return warp.results[slot][lane]

    def _unpack(words: np.ndarray, bf16: bool) -> np.ndarray:
        """uint32 words [...] -> float32 [..., 2] (low half first)."""
        if bf16:
            return np.stack([(words << 16).view(np.float32), (words & 0xFFFF0000).view(np.float32)], axis=-1)
        return words.view(np.float16).reshape(*words.shape, 2).astype(np.float32)

    def _mma_combine(bf16: bool):
        def combine(per_lane):
            words = np.array([[int(x) & 0xFFFFFFFF for x in ops[:6]] for ops in per_lane], dtype=np.uint32)
            halves = _unpack(words, bf16)                     # [32 lanes, 6 registers, 2 halves]
            a = np.zeros((16, 16), np.float64)
            b = np.zeros((16, 8), np.float64)
            c = np.zeros((16, 8), np.float64)
            a[_A_ROW, _A_COL] = halves[:, :4]
            b[_B_ROW, _B_COL] = halves[:, 4:]
            c[_C_ROW, _C_COL] = np.array([ops[6:] for ops in per_lane], np.float64)
            d = (a @ b + c).astype(np.float32)
            return [tuple(d[_C_ROW[lane], _C_COL[lane]]) for lane in range(32)]

        return combine

    _combine_f16, _combine_bf16 = _mma_combine(False), _mma_combine(True)

    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _warp_collective((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), _combine_f16)

    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _warp_collective((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), _combine_bf16)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _mma(ab_type: str):
        asm = (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab_type}.{ab_type}.f32 "
               "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            words, accs = (a0, a1, a2, a3, b0, b1), (c0, c1, c2, c3)
            if not (all(isinstance(x, types.Integer) for x in words)
                    and all(isinstance(x, types.Float) for x in accs)):
                return None
            sig = types.UniTuple(types.float32, 4)(*words, *accs)

            def codegen(context, builder, sig, args):
                ins = [context.cast(builder, v, ty, types.uint32) for v, ty in zip(args[:6], sig.args[:6])]
                ins += [context.cast(builder, v, ty, types.float32) for v, ty in zip(args[6:], sig.args[6:])]
                f32, i32 = ir.FloatType(), ir.IntType(32)
                fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
                ret = builder.call(ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f"), ins)
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, i) for i in range(4)])

            return sig, codegen

        return mma

    mma_f16, mma_bf16 = _mma("f16"), _mma("bf16")


if simulator_enabled():
    def _quad(reduce):
        def combine(values):
            return [reduce(values[lane & ~3:(lane & ~3) + 4]) for lane in range(32)]
        return lambda x: _warp_collective(x, combine)

    quad_max = _quad(max)
    quad_sum = _quad(lambda v: np.float32(sum(v)))
else:
    @cuda.jit(device=True, inline=True)
    def quad_max(x):
        """Max over the 4 lanes (t = 0..3) that share a fragment row."""
        x = max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 1))
        return max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 2))

    @cuda.jit(device=True, inline=True)
    def quad_sum(x):
        """Sum over the 4 lanes that share a fragment row."""
        x += cuda.shfl_xor_sync(0xFFFFFFFF, x, 1)
        return x + cuda.shfl_xor_sync(0xFFFFFFFF, x, 2)


# Loads and stores at raw global addresses. The tensor-core kernel takes ``tensor.data_ptr()`` integers rather
# than arrays: a launch with seven array arguments costs about half a millisecond of host time in Numba, one
# with scalars a small fraction of that. ``ld_i32_at`` and ``ld_v4_at`` read through the read-only path (the
# kernel never writes what it reads); addresses of 16-byte loads must be multiples of 16.
if simulator_enabled():
    import ctypes

    def ld_i32_at(address):
        return ctypes.c_int32.from_address(int(address)).value

    def ld_v4_at(address):
        return tuple((ctypes.c_uint32 * 4).from_address(int(address)))

    def st_u32_at(address, value):
        ctypes.c_uint32.from_address(int(address)).value = int(value) & 0xFFFFFFFF
else:
    _i32, _i64 = ir.IntType(32), ir.IntType(64)

    # side_effect=True: a guarded load must never be hoisted above its guard
    @intrinsic
    def ld_i32_at(typingctx, address):
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.int64)
            asm = ir.InlineAsm(ir.FunctionType(_i32, [_i64]), "ld.global.nc.u32 $0, [$1];", "=r,l", side_effect=True)
            return builder.call(asm, [addr])

        return types.int32(address), codegen

    @intrinsic
    def ld_v4_at(typingctx, address):
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.int64)
            asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([_i32] * 4), [_i64]),
                               "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", side_effect=True)
            ret = builder.call(asm, [addr])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, i) for i in range(4)])

        return types.UniTuple(types.uint32, 4)(address), codegen

    @intrinsic
    def st_u32_at(typingctx, address, value):
        if not (isinstance(address, types.Integer) and isinstance(value, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.int64)
            val = context.cast(builder, args[1], sig.args[1], types.uint32)
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_i64, _i32]), "st.global.u32 [$0], $1;",
                               "l,r,~{memory}", side_effect=True)
            builder.call(asm, [addr, val])
            return context.get_dummy_value()

        return types.void(address, value), codegen


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
# Per K/V tile, in shared memory (two buffers each, indexed by the tile's parity):
#   k_tile [BN keys][W + 4 words]         key n, words of head_dim: what S = Q K^T reads as B (8 keys x 16 dims)
#   v_tile [head_dim][BN / 2 + 4 words]   dim d, word p = {V[2p][d], V[2p + 1][d]}: what O += P V reads as B
#   (the +4 word padding makes every fragment read hit 32 distinct banks)
#   1. fetch: each thread loads its 16-byte pieces of the *next* tile into registers (kr, vr) before the
#      current tile's math, so the loads' latency (block-table read, then the row) hides behind it; stash then
#      writes them into the other buffer, and one barrier per tile publishes it. K: job c -> key c // (W / 4),
#      bytes 16 * (c % (W / 4)) .. (consecutive lanes read consecutive bytes of a row). V: job c -> key pair
#      p = c % (BN / 2), dims 8 * (c // (BN / 2)) .. + 7; the two rows' 16-bit values are interleaved into
#      8 words of v_tile. Keys >= kv_end are stored as zeros, so no stale NaN of the cache can leak into P V.
#      (prefetch=False: fetch, stash and a barrier at the top of each tile, one buffer; for comparison.)
#   2. each warp whose rows see any key of the tile computes S = Q K^T (BN / 8 C tiles, head_dim / 16 mma each,
#      Q kept in registers as A fragments for the whole kernel), masks keys j > pos on tiles crossing the
#      diagonal, and updates the online softmax in base 2 (scale * log2(e) folded in): row max m (shared by
#      the 4 lanes of a row through two shuffles), running sum l (per lane, reduced at the end), O *= 2^(m_old-m).
#   3. O += P V: the S accumulators become A fragments as they are (C tiles 2k, 2k+1 = A tile k, rounded to
#      16 bits); each V fragment word is one shared load.
# Tiles entirely above a warp's diagonal are skipped by that warp; the block still passes the barriers.
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def build_tensor_core_kernel(head_dim: int, block_size: int, bf16: bool, warps: int, prefetch: bool = PREFETCH,
                             max_registers: int | None = None):
    BM = 16 * warps               # query rows per block
    NT = 32 * warps               # threads per block
    W = head_dim // 2             # 32-bit words per row
    BN = keys_per_tile(head_dim)  # keys per K/V tile
    K_ROW = W + 4                 # k_tile words per key
    V_ROW = BN // 2 + 4           # v_tile words per head-dim element
    KS = head_dim // 16           # mma k-steps of S = Q K^T
    NS = BN // 8                  # 8-key C tiles of S
    KP = BN // 16                 # mma k-steps of O += P V
    NO = head_dim // 8            # 8-column C tiles of O
    CHUNKS = W // 4               # 16-byte chunks per key row
    K_JOBS, V_JOBS = BN * CHUNKS, BN // 2 * CHUNKS
    K_STEPS, V_STEPS = -(-K_JOBS // NT), -(-V_JOBS // NT)
    # array sizes must be compile-time constants
    K_WORDS, V_WORDS, Q_WORDS, S_FLOATS, O_FLOATS = BN * K_ROW, head_dim * V_ROW, KS * 4, NS * 4, NO * 4
    KR_WORDS, VR_WORDS, K_BUFFERS, V_BUFFERS = K_STEPS * 4, V_STEPS * 8, 2 * K_WORDS, 2 * V_WORDS
    mma = mma_bf16 if bf16 else mma_f16
    pack = ptx.pack_bf16x2 if bf16 else ptx.pack_f16x2

    @cuda.jit(device=True, inline=True)
    def key_address(cache, table_row, row_bytes, j):
        """Byte address of key j's head row: the block from the table, then the offset inside it."""
        block = ld_i32_at(table_row + 4 * (j // block_size))
        return cache + (block * block_size + j % block_size) * row_bytes

    @cuda.jit(device=True, inline=True)
    def fetch(kr, vr, key_cache, value_cache, table_row, row_bytes, n0, kv_end, tid):
        """This thread's 16-byte pieces of keys n0 .. n0 + BN - 1 into registers (zeros past kv_end)."""
        for i in range(K_STEPS):
            job = i * NT + tid
            j = n0 + job // CHUNKS
            w0 = w1 = w2 = w3 = 0
            if job < K_JOBS and j < kv_end:
                w0, w1, w2, w3 = ld_v4_at(key_address(key_cache, table_row, row_bytes, j) + 16 * (job % CHUNKS))
            kr[i * 4] = w0 & MASK32
            kr[i * 4 + 1] = w1 & MASK32
            kr[i * 4 + 2] = w2 & MASK32
            kr[i * 4 + 3] = w3 & MASK32
        for i in range(V_STEPS):
            job = i * NT + tid
            j = n0 + 2 * (job % (BN // 2))
            chunk = 16 * (job // (BN // 2))
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = 0
            if job < V_JOBS and j < kv_end:
                a0, a1, a2, a3 = ld_v4_at(key_address(value_cache, table_row, row_bytes, j) + chunk)
            if job < V_JOBS and j + 1 < kv_end:
                b0, b1, b2, b3 = ld_v4_at(key_address(value_cache, table_row, row_bytes, j + 1) + chunk)
            vr[i * 8] = a0 & MASK32
            vr[i * 8 + 1] = a1 & MASK32
            vr[i * 8 + 2] = a2 & MASK32
            vr[i * 8 + 3] = a3 & MASK32
            vr[i * 8 + 4] = b0 & MASK32
            vr[i * 8 + 5] = b1 & MASK32
            vr[i * 8 + 6] = b2 & MASK32
            vr[i * 8 + 7] = b3 & MASK32

    @cuda.jit(device=True, inline=True)
    def stash(kr, vr, k_tile, v_tile, buf, tid):
        """The fetched pieces into shared buffer ``buf``: K rows as they are, V transposed into key-pair words."""
        for i in range(K_STEPS):
            job = i * NT + tid
            if job < K_JOBS:
                dst = buf * K_WORDS + (job // CHUNKS) * K_ROW + (job % CHUNKS) * 4
                k_tile[unsigned(dst)] = kr[i * 4]
                k_tile[unsigned(dst + 1)] = kr[i * 4 + 1]
                k_tile[unsigned(dst + 2)] = kr[i * 4 + 2]
                k_tile[unsigned(dst + 3)] = kr[i * 4 + 3]
        for i in range(V_STEPS):
            job = i * NT + tid
            if job < V_JOBS:
                dst = buf * V_WORDS + 8 * (job // (BN // 2)) * V_ROW + job % (BN // 2)  # dims 8c .. 8c+7, pair p
                for w in range(4):
                    a = vr[i * 8 + w]          # dims 8c + 2w (low half), 8c + 2w + 1 (high half) of key 2p
                    b = vr[i * 8 + 4 + w]      # the same dims of key 2p + 1
                    v_tile[unsigned(dst + 2 * w * V_ROW)] = (a & 0xFFFF) | ((b & 0xFFFF) << 16)
                    v_tile[unsigned(dst + (2 * w + 1) * V_ROW)] = (a >> 16) | (b & 0xFFFF0000)

    options = {} if max_registers is None else {"max_registers": max_registers}

    @cuda.jit(fastmath=True, **options)
    def kernel(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out,
               max_blocks, num_heads, num_kv_heads, scale_log2):
        k_tile = cuda.shared.array(K_BUFFERS, np.uint32)  # two buffers: one read while the other is filled
        v_tile = cuda.shared.array(V_BUFFERS, np.uint32)
        q_frag = cuda.local.array(Q_WORDS, np.uint32)    # A fragments of this lane's two query rows
        s = cuda.local.array(S_FLOATS, np.float32)       # S (then P) C fragments of the current tile
        o = cuda.local.array(O_FLOATS, np.float32)       # O C fragments
        kr = cuda.local.array(KR_WORDS, np.uint32)       # this thread's share of the next K/V tile
        vr = cuda.local.array(VR_WORDS, np.uint32)

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
        g = (tid % 32) // 4
        t = tid % 4

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

        if prefetch:
            fetch(kr, vr, key_cache, value_cache, table_row, row_bytes, 0, kv_end, tid)
            stash(kr, vr, k_tile, v_tile, 0, tid)
            cuda.syncthreads()
        for n0 in range(0, kv_end, BN):
            # 1. stage K rows and V columns of keys n0 .. n0 + BN - 1. With prefetch the tile is already in
            #    buffer cur, and the loads of the next tile are issued now so that their latency hides behind
            #    this tile's math; they go to the other buffer after it, and one barrier per tile suffices.
            cur = (n0 // BN) & 1 if prefetch else 0
            if not prefetch:
                fetch(kr, vr, key_cache, value_cache, table_row, row_bytes, n0, kv_end, tid)
                stash(kr, vr, k_tile, v_tile, 0, tid)
                cuda.syncthreads()
            elif n0 + BN < kv_end:
                fetch(kr, vr, key_cache, value_cache, table_row, row_bytes, n0 + BN, kv_end, tid)
            k_base = cur * K_WORDS
            v_base = cur * V_WORDS

            if warp_active and n0 <= warp_last_pos:
                # 2. S = Q K^T, scaled to base 2
                for nt in range(NS):
                    c0 = c1 = c2 = c3 = ZERO
                    kb = k_base + (nt * 8 + g) * K_ROW + t
                    for ks in range(KS):
                        c0, c1, c2, c3 = mma(q_frag[ks * 4], q_frag[ks * 4 + 1], q_frag[ks * 4 + 2],
                                             q_frag[ks * 4 + 3], k_tile[unsigned(kb + ks * 8)],
                                             k_tile[unsigned(kb + ks * 8 + 4)],
                                             c0, c1, c2, c3)
                    s[nt * 4] = c0 * scale_log2
                    s[nt * 4 + 1] = c1 * scale_log2
                    s[nt * 4 + 2] = c2 * scale_log2
                    s[nt * 4 + 3] = c3 * scale_log2
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
                    vb = v_base + g * V_ROW + kp * 8 + t  # keys kp*16 + 2t, +1 (and +8, +9) of dim nt*8 + g
                    for nt in range(NO):
                        o[nt * 4], o[nt * 4 + 1], o[nt * 4 + 2], o[nt * 4 + 3] = mma(
                            p0, p1, p2, p3, v_tile[unsigned(vb + nt * 8 * V_ROW)],
                            v_tile[unsigned(vb + nt * 8 * V_ROW + 4)],
                            o[nt * 4], o[nt * 4 + 1], o[nt * 4 + 2], o[nt * 4 + 3])
            if prefetch and n0 + BN < kv_end:
                stash(kr, vr, k_tile, v_tile, 1 - cur, tid)
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


@functools.lru_cache(maxsize=None)
def _num_sms() -> int:
    if simulator_enabled():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def choose_warps(max_q_len: int, num_seqs: int, num_heads: int) -> int:
    """8 warps (128 query rows per block) halve the K/V staging per row and were faster on the H100 whenever
    their blocks filled at least half the SMs (128 blocks: 15% faster than 4 warps); with fewer (a 512-token
    chunk of 14 heads: 56 blocks) 4 warps and twice the blocks were slightly faster."""
    blocks_of_8 = -(-max_q_len // 128) * num_seqs * num_heads
    return WARPS[1] if 2 * blocks_of_8 >= _num_sms() else WARPS[0]


def launch_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out, scale: float,
                   max_q_len: int, warps: int | None = None, prefetch: bool = PREFETCH,
                   max_registers: int | None = None):
    """The launch alone, on validated arguments. ``warps`` (None: :func:`choose_warps`), ``prefetch`` and
    ``max_registers`` select variants of the tensor-core kernel."""
    num_seqs = context_lens.shape[0]
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = query.shape[1]
    stream = current_stream()
    if query.dtype == torch.float32:
        kernel = build_fp32_kernel(head_dim, block_size)
        flat = [as_kernel_array(t.reshape(-1)) for t in (query, key_cache, value_cache, out)]
        kernel[(max_q_len, num_seqs, num_heads), FP32_THREADS, stream](
            flat[0], flat[1], flat[2], as_kernel_array(block_tables), as_kernel_array(cu_seqlens_q),
            as_kernel_array(context_lens), flat[3], num_heads, num_kv_heads, np.float32(scale))
    else:
        warps = warps or choose_warps(max_q_len, num_seqs, num_heads)
        kernel = build_tensor_core_kernel(head_dim, block_size, query.dtype == torch.bfloat16, warps, prefetch,
                                          max_registers)
        grid = ((max_q_len + 16 * warps - 1) // (16 * warps), num_seqs, num_heads)
        kernel[grid, 32 * warps, stream](
            query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr(),
            cu_seqlens_q.data_ptr(), context_lens.data_ptr(), out.data_ptr(), block_tables.shape[1],
            num_heads, num_kv_heads, np.float32(scale * LOG2E))
    return out
