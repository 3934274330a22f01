"""PagedAttention V2 on the tensor cores: decode for fp16/bf16 with head_dim 64 or 128.

A GQA group's query heads all read the same K/V rows, so per cache byte the CUDA-core kernel
(paged_attention_v2.py) does GB multiply-adds per element for QK and as many for PV; at 7 heads on a 64-wide
head that is more instruction issue than the memory system needs time. Here the group's heads are the rows of
an ``mma.m16n8k16`` A operand (rows >= GB are zero padding), so one instruction scores 8 tokens for all heads.

Grid and threads::

    grid    (num_kv_heads, num_seqs, num_partitions)
            block (u, s, p) handles tokens [p*P, min((p+1)*P, context_len)) of sequence s, P =
            common.sequence_partition (the sequence's own context over the grid's partitions, at least the
            launch's partition_size), for query heads
            u*GB .. u*GB + GB - 1 (GB = the whole group, at most 8), which all read KV head u.
    threads 128 = 4 warps. Each iteration the block covers TILE = 4 * CH * 16 tokens from ``base``; warp w
            takes the CH chunks of 16 tokens starting at base + (c*4 + w)*16, c < CH. Lane = 4g + t
            (g = lane // 4, t = lane % 4) owns query head g (fragment row g; rows g + 8 are padding).
            At head_dim 128 (one chunk) the loads run one tile ahead: tile i + 1's K rows are issued once
            tile i's S is computed, its V rows once tile i's P V is (``build_tc_kernel``).

Per 16-token chunk (tokens j = 0..15 from the chunk start), with W = head_dim / 2 32-bit words per row:

    S[head, j] = Q K^T:  B fragment of n-tile n (tokens 8n .. 8n + 7): lane (g, t) loads token 8n + g, words
            t*W/4 .. t*W/4 + W/4 - 1 (16-byte loads). The k dimension is permuted, identically for Q and K, so that
            these contiguous words are what the fragments need: k-step k, logical columns 2t, 2t+1 <-> word
            t*W/4 + 2k and columns 2t+8, 2t+9 <-> word t*W/4 + 2k + 1. The C fragment gives lane (g, t)
            S[g, 8n + 2t] and S[g, 8n + 2t + 1].
    O[head, :] += P V:   A fragment = P of the 16 tokens in 16-bit (from the C fragments as they are),
            B fragment of n-tile d (8 output columns): lane (g, t) loads tokens 2t, 2t+1, 2t+8, 2t+9, words
            g*W/8 .. g*W/8 + W/8 - 1, and ``interleave_lo/hi`` (prmt) pairs the two tokens' values of one dim.
            Column n of n-tile d is head_dim element 2*(n*W/8 + d//2) + d%2; the C fragment gives lane (g, t)
            O[g, column 2t] and O[g, column 2t + 1].

Softmax state per lane for head g (base 2, ``scale * log2(e)`` folded into S): m is the same on the 4 lanes of
a row (two shuffles per tile), l is the lane's partial sum (summed over the 4 lanes at the end), acc are its
O columns. Tokens past the context are masked (loads clamped to the last real token, P = 0). At the end the
4 warps' states are merged through shared memory; with one partition the block writes the normalised output,
otherwise (m, l, O / l) go to fp32 scratch and the last partition block of the sequence to finish combines them
(``paged_attention_v2.build_partition_merge``).

With ``rope`` the kernel also does ``layer_ops.rope_write_kv``'s work for the step's new token (one launch per
layer fewer): q arrives before RoPE (rows of the qkv projection, ``q_row_words`` apart) and each lane rotates the
words it loads (word x pairs with word x ^ W/2, the rotate-half partner, angles from float32 ``cos``/``sin``
``[num_seqs, D/2]``). The block that holds the sequence's last position (``end == context_len``) rotates the
new k and stores it and v at ``slot_mapping[seq]`` (threads 0 .. W/4 - 1 four k words each, the next W/4 four v
words each) before its first tile, and meets a barrier before it loads its last tile (the one holding that
position); no other block reads it. The K/V loads take the coherent path (``ld_v4_coherent``): the read-only one
may not serve words written during the launch.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, uint32

from .common import LOG2E, NEG_BIG, THREADS, max_registers_option, sequence_partition, word_codec
from .mma import interleave_hi, interleave_lo, mma_bf16, mma_f16
from .paged_attention_v2 import build_partition_merge
from .ptx import as_f32, ld_v4, ld_v4_coherent, st_v4

WARPS = THREADS // 32


def tc_supported(dtype_name: str, head_dim: int, group: int) -> bool:
    """Whether the tensor-core kernel serves this configuration (wider heads would not fit in registers)."""
    return dtype_name in ("float16", "bfloat16") and head_dim in (64, 128) and 1 <= group <= 8


def tc_tile(chunks: int) -> int:
    """Tokens per block iteration."""
    return WARPS * 16 * chunks


@functools.lru_cache(maxsize=None)
def build_tc_kernel(dtype_name: str, head_dim: int, chunks: int, max_registers: int | None = None,
                    rope: bool = False):
    """The tensor-core decode kernel for one (dtype, head_dim, 16-token chunks per warp and iteration); with
    ``rope``, fused with RoPE and the new token's cache write (module docstring).

    Software pipeline, at head_dim 128 with one chunk: each tile's K and V rows are loaded one tile ahead, each
    load refilling the buffer just consumed, so they travel while the tile before computes; loading a tile at
    the top of its own iteration left the block waiting a whole memory round trip per tile. On the H200
    (benchmarks/decode_ab.py, results/decode_ab_h200.log) it took B64 ctx4096 32/8 fp16 from 324 to 266 us
    (95% of copy) and B4 ctx32768 from 151 to 142 us, uncapped (202 registers). At head_dim 64 under the
    128-register cap the longer-lived registers cost more than the overlap gains (B256 ctx1024 14/2: 40.1
    against 39.2 us), and two chunks at head_dim 128 would spill."""
    mma = mma_bf16 if dtype_name == "bfloat16" else mma_f16
    lo, hi, pack = word_codec(dtype_name)
    kv_load = ld_v4_coherent if rope else ld_v4
    D = head_dim
    W = D // 2            # words per head row
    HALF = W // 2         # RoPE: word x pairs with word x ^ HALF (dims 2x, 2x+1 with 2x +- D/2)
    KS = D // 16          # k-steps of S = Q K^T
    KW = W // 4           # K words per lane and token (KW // 4 16-byte loads)
    VW = W // 8           # V words per lane and token (VW // 4 16-byte loads)
    NO = D // 8           # n-tiles of O
    CH = chunks
    TILE = tc_tile(chunks)
    K_LEN, V_LEN, S_LEN = CH * 2 * KW, CH * 4 * VW, CH * 4
    KB_LEN, VB_LEN = CH * 2, CH * 4
    Q_LEN, ACC_LEN = 2 * KS, 2 * NO
    WARP_HEADS, WARP_HEADS_DIM, STATS = (WARPS, 8), (WARPS, 8, D), (2, 8)
    PIPELINED = head_dim == 128 and chunks == 1
    merge_if_last = build_partition_merge(dtype_name, head_dim)

    @cuda.jit(device=True, inline=True)
    def rotate_word(w, partner, c0, c1, s0, s1, sign):
        """RoPE of word ``w``'s two values: x cos - partner sin in the first half of the row, + in the second
        (``sign``), rounded once, as rope_write_kv does; c and s are float32 bits. (The mask keeps the word
        unsigned in the simulator, whose ``pack`` returns it signed; compiled, it is a no-op.)"""
        return uint32(pack(lo(w) * as_f32(c0) + sign * (lo(partner) * as_f32(s0)),
                           hi(w) * as_f32(c1) + sign * (hi(partner) * as_f32(s1))) & 0xFFFFFFFF)

    @cuda.jit(device=True, inline=True)
    def rotate4(words, row, x, w0, w1, w2, w3, cos_w, sin_w, seq):
        """RoPE of words x .. x + 3 (w0 .. w3, x a multiple of 4) of the head row at ``words[row]``."""
        p0, p1, p2, p3 = ld_v4(words, row + (x ^ HALF))
        angle = seq * W + 2 * (x & (HALF - 1))           # cos/sin rows hold D/2 = W floats
        c0, c1, c2, c3 = ld_v4(cos_w, angle)
        c4, c5, c6, c7 = ld_v4(cos_w, angle + 4)
        s0, s1, s2, s3 = ld_v4(sin_w, angle)
        s4, s5, s6, s7 = ld_v4(sin_w, angle + 4)
        sign = float32(-1.0) if x < HALF else float32(1.0)
        return (rotate_word(w0, p0, c0, c1, s0, s1, sign), rotate_word(w1, p1, c2, c3, s2, s3, sign),
                rotate_word(w2, p2, c4, c5, s4, s5, sign), rotate_word(w3, p3, c6, c7, s6, s7, sign))

    @cuda.jit(device=True, inline=True)
    def k_token(base, end, warp, g, c, n):
        """The token whose K row lane (g, *) of ``warp`` loads for n-tile n of chunk c of the tile at ``base``
        (clamped to the last real token: masked in S)."""
        return min(base + (c * WARPS + warp) * 16 + 8 * n + g, end - 1)

    @cuda.jit(device=True, inline=True)
    def v_token(base, end, warp, t, c, r):
        """The token whose V row lane (*, t) of ``warp`` loads as row r (tokens 2t, 2t+1, 2t+8, 2t+9) of chunk c."""
        return min(base + (c * WARPS + warp) * 16 + 2 * t + (r & 1) + 8 * (r >> 1), end - 1)

    @cuda.jit(device=True, inline=True)
    def look_up(kb, vb, block_tables, table, base, end, warp, g, t, block_shift):
        """The physical blocks of the tokens whose rows the lane loads for the tile at ``base``. Pipelined, they
        are looked up a tile ahead, so that a tile's K/V loads wait on no block-table read (B64 ctx4096 32/8
        fp16: 271.5 -> 266.5 us, B4 ctx32768 143.2 -> 140.7 us; benchmarks/results/decode_ab_h200.log)."""
        for c in range(CH):
            for n in range(2):
                kb[c * 2 + n] = block_tables[table + (k_token(base, end, warp, g, c, n) >> block_shift)]
            for r in range(4):
                vb[c * 4 + r] = block_tables[table + (v_token(base, end, warp, t, c, r) >> block_shift)]

    @cuda.jit(device=True, inline=True)
    def row_word(block, token, block_shift, num_kv_heads, kv_head):
        """The first 32-bit word of ``token``'s row for ``kv_head`` in a cache, ``block`` its physical block."""
        return (((block << block_shift) + (token & ((1 << block_shift) - 1))) * num_kv_heads + kv_head) * W

    @cuda.jit(device=True, inline=True)
    def load_k(kw, kb, key_w, base, end, warp, g, t, kv_head, num_kv_heads, block_shift):
        """The K words of the tile at ``base`` that lane (g, t) of ``warp`` holds (B fragments of S = Q K^T)."""
        for c in range(CH):
            for n in range(2):
                token = k_token(base, end, warp, g, c, n)
                row = row_word(kb[c * 2 + n], token, block_shift, num_kv_heads, kv_head) + t * KW
                for i in range(KW // 4):
                    x = (c * 2 + n) * KW + 4 * i
                    kw[x], kw[x + 1], kw[x + 2], kw[x + 3] = kv_load(key_w, row + 4 * i)

    @cuda.jit(device=True, inline=True)
    def load_v(vw, vb, value_w, base, end, warp, g, t, kv_head, num_kv_heads, block_shift):
        """The V words of the tile at ``base`` that lane (g, t) of ``warp`` holds (B fragments of O += P V)."""
        for c in range(CH):
            for r in range(4):
                token = v_token(base, end, warp, t, c, r)
                row = row_word(vb[c * 4 + r], token, block_shift, num_kv_heads, kv_head) + g * VW
                for i in range(VW // 4):
                    x = (c * 4 + r) * VW + 4 * i
                    vw[x], vw[x + 1], vw[x + 2], vw[x + 3] = kv_load(value_w, row + 4 * i)

    @cuda.jit(fastmath=True, **max_registers_option(max_registers))
    def kernel(out_w, part_m, part_l, part_o, arrivals, query_w, q_row_words, key_w, value_w, block_tables,
               context_lens, num_heads, num_kv_heads, max_blocks, block_shift, partition_size, num_partitions, scale,
               new_k_w, k_row_words, new_v_w, v_row_words, cos_w, sin_w, slot_mapping, num_slots):
        kv_head = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp = tid // 32
        g = (tid % 32) // 4                                # fragment row: query head head0 + g
        t = tid % 4
        group = num_heads // num_kv_heads
        head0 = kv_head * group

        context_len, size = sequence_partition(context_lens, seq, max_blocks << block_shift, partition_size,
                                               num_partitions)
        start = part * size
        if start >= context_len:
            return                                         # partition past this sequence's context: no work
        end = min(start + size, context_len)
        scale_log2 = scale * float32(LOG2E)

        # A fragments of Q (rows g; rows g + 8 are zero): k-step k holds words t*KW + 2k and t*KW + 2k + 1.
        # Loaded before the cache write below, so that the two rounds of loads travel together.
        q = cuda.local.array(Q_LEN, uint32)
        q_row = seq * q_row_words + (head0 + g) * W
        for i in range(KW // 4):
            w0 = w1 = w2 = w3 = uint32(0)
            if g < group:
                x = t * KW + 4 * i
                w0, w1, w2, w3 = ld_v4(query_w, q_row + x)
                if rope:
                    w0, w1, w2, w3 = rotate4(query_w, q_row, x, w0, w1, w2, w3, cos_w, sin_w, seq)
            q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3] = w0, w1, w2, w3
        writer = rope and end == context_len
        if writer:  # the new token's k (rotated) and v into the cache, by the block that reads that position
            if tid < W // 2:
                slot = slot_mapping[seq]                   # loaded alongside the words, stored only if valid
                x = 4 * (tid % (W // 4))
                if tid < W // 4:
                    row = seq * k_row_words + kv_head * W
                    w0, w1, w2, w3 = ld_v4(new_k_w, row + x)
                    w0, w1, w2, w3 = rotate4(new_k_w, row, x, w0, w1, w2, w3, cos_w, sin_w, seq)
                else:
                    w0, w1, w2, w3 = ld_v4(new_v_w, seq * v_row_words + kv_head * W + x)
                if slot >= 0 and slot < num_slots:
                    cache = key_w if tid < W // 4 else value_w
                    st_v4(cache, (slot * num_kv_heads + kv_head) * W + x, w0, w1, w2, w3)

        acc = cuda.local.array(ACC_LEN, float32)
        for i in range(ACC_LEN):
            acc[i] = 0.0
        m = float32(NEG_BIG)
        l = float32(0.0)

        kw = cuda.local.array(K_LEN, uint32)              # [chunk][n-tile][KW words]
        vw = cuda.local.array(V_LEN, uint32)              # [chunk][token 2t, 2t+1, 2t+8, 2t+9][VW words]
        s = cuda.local.array(S_LEN, float32)              # [chunk][n-tile][2]
        kb = cuda.local.array(KB_LEN, int32)              # physical blocks of the K rows of the next loads
        vb = cuda.local.array(VB_LEN, int32)              # and of their V rows
        table = seq * max_blocks
        # PIPELINED: the first tile is loaded here, each next one while the tile before computes (see the
        # builder's docstring), and the blocks of the tile after that are looked up behind its loads; otherwise
        # each tile's blocks are looked up and its rows loaded at the top of its iteration (looking them up a
        # tile ahead made head_dim 64 under its register cap 4-8% slower). A writer block meets a barrier before
        # it loads its last tile, the one holding the stored token: the store's round trip overlaps the tiles
        # before.
        for base in range(start, end, TILE):
            if base == start or not PIPELINED:
                if writer and base + TILE >= end:
                    cuda.syncthreads()
                look_up(kb, vb, block_tables, table, base, end, warp, g, t, block_shift)
                load_k(kw, kb, key_w, base, end, warp, g, t, kv_head, num_kv_heads, block_shift)
                load_v(vw, vb, value_w, base, end, warp, g, t, kv_head, num_kv_heads, block_shift)
                if PIPELINED:
                    look_up(kb, vb, block_tables, table, base + TILE, end, warp, g, t, block_shift)
            following = PIPELINED and base + TILE < end
            # S = Q K^T in base 2, masked past the end.
            for c in range(CH):
                first = base + (c * WARPS + warp) * 16
                for n in range(2):
                    c0 = c1 = c2 = c3 = float32(0.0)
                    for k in range(KS):
                        x = (c * 2 + n) * KW + 2 * k
                        c0, c1, c2, c3 = mma(q[2 * k], uint32(0), q[2 * k + 1], uint32(0), kw[x], kw[x + 1],
                                             c0, c1, c2, c3)
                    token = first + 8 * n + 2 * t
                    s[(c * 2 + n) * 2] = c0 * scale_log2 if token < end else NEG_BIG
                    s[(c * 2 + n) * 2 + 1] = c1 * scale_log2 if token + 1 < end else NEG_BIG
            if following:
                if writer and base + 2 * TILE >= end:
                    cuda.syncthreads()
                load_k(kw, kb, key_w, base + TILE, end, warp, g, t, kv_head, num_kv_heads, block_shift)
            # Online softmax over the tile (row max shared by the 4 lanes of the row).
            m_new = m
            for x in range(S_LEN):
                m_new = max(m_new, s[x])
            m_new = max(m_new, cuda.shfl_xor_sync(0xFFFFFFFF, m_new, 1))
            m_new = max(m_new, cuda.shfl_xor_sync(0xFFFFFFFF, m_new, 2))
            alpha = math.exp2(m - m_new)
            m = m_new
            l *= alpha
            for i in range(ACC_LEN):
                acc[i] *= alpha
            for x in range(S_LEN):
                p = float32(0.0)
                if s[x] > float32(NEG_BIG):
                    p = math.exp2(s[x] - m_new)
                s[x] = p
                l += p
            # O += P V, one k-step of 16 tokens per chunk.
            for c in range(CH):
                a0 = pack(s[c * 4], s[c * 4 + 1])
                a2 = pack(s[c * 4 + 2], s[c * 4 + 3])
                for d in range(NO):
                    x = c * 4 * VW + d // 2
                    if d % 2 == 0:
                        b0 = interleave_lo(vw[x], vw[x + VW])
                        b1 = interleave_lo(vw[x + 2 * VW], vw[x + 3 * VW])
                    else:
                        b0 = interleave_hi(vw[x], vw[x + VW])
                        b1 = interleave_hi(vw[x + 2 * VW], vw[x + 3 * VW])
                    acc[2 * d], acc[2 * d + 1], _, _ = mma(a0, uint32(0), a2, uint32(0), b0, b1,
                                                           acc[2 * d], acc[2 * d + 1], float32(0.0), float32(0.0))
            if following:
                load_v(vw, vb, value_w, base + TILE, end, warp, g, t, kv_head, num_kv_heads, block_shift)
                look_up(kb, vb, block_tables, table, base + 2 * TILE, end, warp, g, t, block_shift)
        l += cuda.shfl_xor_sync(0xFFFFFFFF, l, 1)
        l += cuda.shfl_xor_sync(0xFFFFFFFF, l, 2)

        # Merge the 4 warps' states of each head through shared memory.
        sm_m = cuda.shared.array(WARP_HEADS, float32)
        sm_l = cuda.shared.array(WARP_HEADS, float32)
        sm_acc = cuda.shared.array(WARP_HEADS_DIM, float32)
        if t == 0:
            sm_m[warp, g] = m
            sm_l[warp, g] = l
        for d in range(NO):
            for h in range(2):
                sm_acc[warp, g, 2 * ((2 * t + h) * VW + d // 2) + d % 2] = acc[2 * d + h]
        cuda.syncthreads()
        sm_scale = cuda.shared.array(WARP_HEADS, float32)  # exp(m_w - M) / L per warp and head
        sm_stat = cuda.shared.array(STATS, float32)        # the merged (M, L) per head
        if tid < group:
            big = float32(NEG_BIG)
            for w in range(WARPS):
                big = max(big, sm_m[w, tid])
            total = float32(0.0)
            for w in range(WARPS):
                weight = math.exp2(sm_m[w, tid] - big)
                sm_scale[w, tid] = weight
                total += sm_l[w, tid] * weight
            for w in range(WARPS):
                sm_scale[w, tid] /= total
            sm_stat[0, tid] = big / float32(LOG2E)           # the merge works in base e
            sm_stat[1, tid] = total
        cuda.syncthreads()
        # The sequence's only partition writes the output, no merge (its length is read again: cheaper than
        # a register held through the loop).
        context_len, size = sequence_partition(context_lens, seq, max_blocks << block_shift, partition_size,
                                               num_partitions)
        direct = size >= context_len
        # Thread i writes output words i, i+128, ... of the group x W block of words.
        for x in range(tid, group * W, THREADS):
            gh = x // W
            w = x % W
            o0 = float32(0.0)
            o1 = float32(0.0)
            for wp in range(WARPS):
                o0 += sm_acc[wp, gh, 2 * w] * sm_scale[wp, gh]
                o1 += sm_acc[wp, gh, 2 * w + 1] * sm_scale[wp, gh]
            head = head0 + gh
            if direct:
                out_w[(seq * num_heads + head) * W + w] = pack(o0, o1)
            else:
                row = (seq * num_heads + head) * num_partitions + part
                part_o[row * D + 2 * w] = o0
                part_o[row * D + 2 * w + 1] = o1
                if w == 0:
                    part_m[row] = sm_stat[0, gh]
                    part_l[row] = sm_stat[1, gh]
        if not direct:
            merge_if_last(out_w, part_m, part_l, part_o, arrivals, seq * num_kv_heads + kv_head, seq, head0, group,
                          num_heads, num_partitions, (context_len + size - 1) // size, tid)

    return kernel
