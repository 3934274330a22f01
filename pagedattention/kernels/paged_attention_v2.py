"""PagedAttention V2: one pass over the paged cache with online softmax, GQA sharing and split-KV.

Grid and threads::

    grid    (num_kv_heads * head_blocks, num_seqs, num_partitions)
            block (u, s, p) handles tokens [p*P, min((p+1)*P, context_len)) of sequence s, P =
            common.sequence_partition (the sequence's own context over the grid's partitions, at least the
            launch's partition_size), for query heads
            head0 .. head0+GB-1, which all read KV head u // head_blocks: each K/V byte is read once per
            sequence, not once per query head. GB = query heads per block, a divisor of the GQA group chosen
            by ``decode.v2_config`` (at most 4 under a 128-register cap, or a whole group of 5-8 without
            a small divisor); head_blocks = group // GB blocks share a KV head (re-reading it from L2).
    threads 128 = NUM_GROUPS thread groups of TG lanes. A group works on one token at a time; its TG lanes
            split the token's head_dim: lane r loads 16-byte vectors r, r+TG, ... of the K and V rows.
            Each iteration a group takes N tokens (N independent K loads and N V loads in flight per lane);
            the block covers TILE = NUM_GROUPS * N consecutive tokens, group g taking tokens
            base + n*NUM_GROUPS + g, n < N.

Data (all tensors as flat 32-bit words; W = head_dim * itemsize / 4 words per head row)::

    query_w                                            row (s, h) at s*q_row_words + h*W (q_row_words =
                                                       num_heads*W for a dense query; more for a slice of qkv)
    key_w, value_w [num_blocks * block_size * num_kv_heads * W]
        token j of sequence s: block = block_tables[s, j // block_size],
                               row = (block*block_size + j % block_size)*num_kv_heads + kv_head
        (block_size is a power of two, passed as block_shift = log2(block_size))

Per group and query head the lanes keep the FlashAttention state of the tokens they saw: running max m,
running sum l of exp(logit - m) and the accumulator acc = sum exp(logit - m) * v (fp32, the lane's slice of
head_dim), rescaled by exp(m_old - m_new) whenever the max grows. Logits are reduced over the group's lanes
with xor shuffles so every lane holds them. At the end the NUM_GROUPS states are merged through shared memory;
with one partition the block writes the normalised output, otherwise (m, l, acc / l) go to fp32 scratch and
the last partition block of the sequence to finish combines them (``build_partition_merge``). Tokens past the
context are masked (their loads are clamped to the last real token, their weight set to 0); partitions past it
return at once and the merge never reads them, so one grid sized by an upper bound serves every shorter
context (CUDA-graph replay). The partition is the grid's slowest index because blocks are scheduled in x, y, z
order: the blocks with no work then come after every working one instead of taking SM slots between them.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, uint32

from .common import NEG_BIG, THREADS, max_registers_option, sequence_partition, word_codec
from .ptx import f32_bits, ld_f32_cg, ld_v4


@functools.lru_cache(maxsize=None)
def v2_shape(dtype_name: str, head_dim: int, heads_per_block: int, tokens: int):
    """Thread layout for a configuration: (TG lanes per token, NUM_GROUPS, N tokens per group, TILE)."""
    itemsize = 4 if dtype_name == "float32" else 2
    vectors = head_dim * itemsize // 16            # 16-byte vectors per head row
    lanes = min(32, vectors)
    groups = THREADS // lanes
    return lanes, groups, tokens, groups * tokens


@functools.lru_cache(maxsize=None)
def build_v2_kernel(dtype_name: str, head_dim: int, heads_per_block: int, tokens: int,
                    max_registers: int | None = None):
    """The V2 attention kernel for one (dtype, head_dim, query heads per block, tokens per group and
    iteration); ``max_registers`` caps registers (for occupancy)."""
    pairs = dtype_name != "float32"
    epw = 2 if pairs else 1                               # elements per 32-bit word
    lo, hi, pack = word_codec(dtype_name)
    GB = heads_per_block
    TG, NUM_GROUPS, N, TILE = v2_shape(dtype_name, head_dim, heads_per_block, tokens)
    W = head_dim * (2 if pairs else 4) // 4               # words per head row
    VPL = W // 4 // TG                                     # 16-byte vectors per lane
    EL = VPL * 4 * epw                                     # head_dim elements per lane
    D = head_dim
    # Array shapes must be compile-time constants.
    Q_LEN = GB * EL
    KV_LEN = N * VPL * 4
    S_LEN = N * GB
    GROUP_HEADS = (NUM_GROUPS, GB)
    GROUP_HEADS_DIM = (NUM_GROUPS, GB, D)
    STATS = (2, GB)
    merge_if_last = build_partition_merge(dtype_name, head_dim)

    @cuda.jit(fastmath=True, **max_registers_option(max_registers))
    def kernel(out_w, part_m, part_l, part_o, arrivals, query_w, q_row_words, key_w, value_w, block_tables,
               context_lens, num_heads, num_kv_heads, max_blocks, block_shift, partition_size, num_partitions, scale,
               new_k_w, k_row_words, new_v_w, v_row_words, cos_w, sin_w, slot_mapping, num_slots):
        # (the arguments after ``scale`` serve the tensor-core kernel's RoPE fusion: one launch for both kernels)
        unit = cuda.blockIdx.x
        seq = cuda.blockIdx.y
        part = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        group = tid // TG                                  # which thread group (token stream) in the block
        lane = tid % TG                                    # which slice of head_dim inside the group
        heads_per_kv = num_heads // num_kv_heads
        head_blocks = heads_per_kv // GB
        kv_head = unit // head_blocks
        head0 = kv_head * heads_per_kv + (unit % head_blocks) * GB  # first query head of this block

        context_len, size = sequence_partition(context_lens, seq, max_blocks << block_shift, partition_size,
                                               num_partitions)
        start = part * size
        if start >= context_len:
            return                                         # partition past this sequence's context: no work
        end = min(start + size, context_len)

        # Query slices of the GB heads, fp32, pre-scaled. Element e of the lane: vector r + (e // (4*epw))*TG.
        q = cuda.local.array(Q_LEN, float32)
        for gh in range(GB):
            row = seq * q_row_words + (head0 + gh) * W
            for i in range(VPL):
                w0, w1, w2, w3 = ld_v4(query_w, row + (lane + i * TG) * 4)
                e = gh * EL + i * 4 * epw
                if pairs:
                    q[e + 0] = lo(w0) * scale
                    q[e + 1] = hi(w0) * scale
                    q[e + 2] = lo(w1) * scale
                    q[e + 3] = hi(w1) * scale
                    q[e + 4] = lo(w2) * scale
                    q[e + 5] = hi(w2) * scale
                    q[e + 6] = lo(w3) * scale
                    q[e + 7] = hi(w3) * scale
                else:
                    q[e + 0] = lo(w0) * scale
                    q[e + 1] = lo(w1) * scale
                    q[e + 2] = lo(w2) * scale
                    q[e + 3] = lo(w3) * scale

        m = cuda.local.array(GB, float32)
        l = cuda.local.array(GB, float32)
        acc = cuda.local.array(Q_LEN, float32)
        for gh in range(GB):
            m[gh] = NEG_BIG
            l[gh] = 0.0
        for e in range(GB * EL):
            acc[e] = 0.0

        kw = cuda.local.array(KV_LEN, uint32)
        vw = cuda.local.array(KV_LEN, uint32)
        s = cuda.local.array(S_LEN, float32)
        table = seq * max_blocks
        block_mask = (1 << block_shift) - 1
        for base in range(start, end, TILE):
            # Issue every load of the tile first: N tokens x VPL vectors of K and of V per lane.
            for n in range(N):
                token = min(base + n * NUM_GROUPS + group, end - 1)  # clamped: masked below, never read past
                block = block_tables[table + (token >> block_shift)]   # block_size = 1 << block_shift
                row = (((block << block_shift) + (token & block_mask)) * num_kv_heads + kv_head) * W
                for i in range(VPL):
                    at = row + (lane + i * TG) * 4
                    x = (n * VPL + i) * 4
                    kw[x], kw[x + 1], kw[x + 2], kw[x + 3] = ld_v4(key_w, at)
                    vw[x], vw[x + 1], vw[x + 2], vw[x + 3] = ld_v4(value_w, at)
            # Logits: the lane's partial dot products, summed over the TG lanes of the group.
            for n in range(N):
                for gh in range(GB):
                    dot = float32(0.0)
                    for w in range(VPL * 4):
                        word = kw[n * VPL * 4 + w]
                        if pairs:
                            dot += q[gh * EL + 2 * w] * lo(word) + q[gh * EL + 2 * w + 1] * hi(word)
                        else:
                            dot += q[gh * EL + w] * lo(word)
                    s[n * GB + gh] = dot
            offset = TG // 2
            while offset > 0:
                for x in range(N * GB):
                    s[x] += cuda.shfl_xor_sync(0xFFFFFFFF, s[x], offset)
                offset //= 2
            # Online softmax over the tile's N tokens, then the weighted V rows.
            for gh in range(GB):
                m_new = m[gh]
                for n in range(N):
                    if base + n * NUM_GROUPS + group < end:
                        m_new = max(m_new, s[n * GB + gh])
                alpha = math.exp(m[gh] - m_new)
                m[gh] = m_new
                l[gh] *= alpha
                for e in range(EL):
                    acc[gh * EL + e] *= alpha
                for n in range(N):
                    p = float32(0.0)
                    if base + n * NUM_GROUPS + group < end:
                        p = math.exp(s[n * GB + gh] - m_new)
                    l[gh] += p
                    for w in range(VPL * 4):
                        word = vw[n * VPL * 4 + w]
                        if pairs:
                            acc[gh * EL + 2 * w] += p * lo(word)
                            acc[gh * EL + 2 * w + 1] += p * hi(word)
                        else:
                            acc[gh * EL + w] += p * lo(word)

        # Merge the NUM_GROUPS group states of each head through shared memory.
        sm_m = cuda.shared.array(GROUP_HEADS, float32)
        sm_l = cuda.shared.array(GROUP_HEADS, float32)
        sm_acc = cuda.shared.array(GROUP_HEADS_DIM, float32)
        for gh in range(GB):
            if lane == 0:
                sm_m[group, gh] = m[gh]
                sm_l[group, gh] = l[gh]
            for i in range(VPL):
                for w in range(4):
                    for h in range(epw):
                        sm_acc[group, gh, ((lane + i * TG) * 4 + w) * epw + h] = acc[gh * EL + (i * 4 + w) * epw + h]
        cuda.syncthreads()
        sm_scale = cuda.shared.array(GROUP_HEADS, float32)  # exp(m_g - M) / L per group and head
        sm_stat = cuda.shared.array(STATS, float32)             # the merged (M, L) per head
        if tid < GB:
            big = float32(NEG_BIG)
            for g in range(NUM_GROUPS):
                big = max(big, sm_m[g, tid])
            total = float32(0.0)
            for g in range(NUM_GROUPS):
                weight = math.exp(sm_m[g, tid] - big)
                sm_scale[g, tid] = weight
                total += sm_l[g, tid] * weight
            for g in range(NUM_GROUPS):
                sm_scale[g, tid] /= total
            sm_stat[0, tid] = big
            sm_stat[1, tid] = total
        cuda.syncthreads()
        # The sequence's only partition writes the output, no merge (its length is read again: cheaper than
        # a register held through the loop).
        context_len, size = sequence_partition(context_lens, seq, max_blocks << block_shift, partition_size,
                                               num_partitions)
        direct = size >= context_len
        # Thread t writes output words t, t+128, ... of the GB x W block of words.
        for x in range(tid, GB * W, THREADS):
            gh = x // W
            w = x % W
            o0 = float32(0.0)
            o1 = float32(0.0)
            for g in range(NUM_GROUPS):
                o0 += sm_acc[g, gh, w * epw] * sm_scale[g, gh]
                if pairs:
                    o1 += sm_acc[g, gh, w * epw + 1] * sm_scale[g, gh]
            head = head0 + gh
            if direct:
                if pairs:
                    out_w[(seq * num_heads + head) * W + w] = pack(o0, o1)
                else:
                    out_w[(seq * num_heads + head) * W + w] = f32_bits(o0)
            else:
                row = (seq * num_heads + head) * num_partitions + part
                part_o[row * D + w * epw] = o0
                if pairs:
                    part_o[row * D + w * epw + 1] = o1
                if w == 0:
                    part_m[row] = sm_stat[0, gh]
                    part_l[row] = sm_stat[1, gh]
        if not direct:
            merge_if_last(out_w, part_m, part_l, part_o, arrivals, seq * cuda.gridDim.x + unit, seq, head0, GB,
                          num_heads, num_partitions, (context_len + size - 1) // size, tid)

    return kernel


#: Partitions whose partial rows the merge loads at once. On the H200 (benchmarks/results/decode_ab_h200.log, 14/2
#: d64 fused with RoPE) one at a time took 8.7-11.3 us at B1, 10.0 at B4, 14.5 at B32 and 15.7 at B64; four, 7.6-10.1,
#: 8.9, 13.5 and 15.5; eight, 7.7-9.4, 8.4, 12.9 but 16.1 at B64 (four partitions: half its loads wasted).
MERGE_LOADS = 4


@functools.lru_cache(maxsize=None)
def build_partition_merge(dtype_name: str, head_dim: int):
    """``merge_if_last``, the split-KV merge as the decode kernels' last step (V2 and tensor-core alike).

    Every block of a split sequence calls it, with all its threads, once its (m, l, o) rows are written. The
    block counts itself in ``arrivals[counter]`` (one counter per sequence and head block); the last of the
    ``used`` partitions that did work to arrive combines them: partition p's weight is l_p * exp(m_p - M), M the
    largest m_p, and the output sum_p weight_p * o_p / sum_p weight_p. It then sets the counter back to 0, so the
    next launch (a graph replay too) starts from zero without a memset. A separate merge kernel cost a launch
    per layer, 4-5 us of a 15-20 us attention step at batch 1-64 on the H200. Ordering: each block's threads
    fence their writes before the count; the last block reads the rows at L2 (``ld_f32_cg``), past an L1 that
    may hold lines read before they were written.

    Threads: thread i computes output words i, i + 128, ... of the block's heads head0 .. head0 + heads - 1
    (W words each, their rows in ``out_w`` consecutive).
    """
    pairs = dtype_name != "float32"
    epw = 2 if pairs else 1
    _, _, pack = word_codec(dtype_name)
    W = head_dim * (2 if pairs else 4) // 4
    D = head_dim

    @cuda.jit(device=True, inline=True)
    def merge_if_last(out_w, part_m, part_l, part_o, arrivals, counter, seq, head0, heads, num_heads,
                      num_partitions, used, tid):
        last = cuda.shared.array(1, int32)
        cuda.threadfence()                                 # this block's rows, visible GPU-wide before it counts
        cuda.syncthreads()
        if tid == 0:
            last[0] = 1 if cuda.atomic.add(arrivals, counter, 1) == used - 1 else 0
        cuda.syncthreads()
        if last[0] == 0:
            return
        cuda.threadfence()
        if tid == 0:
            arrivals[counter] = 0
        for x in range(tid, heads * W, THREADS):
            w = x % W
            first = (seq * num_heads + head0 + x // W) * num_partitions   # row of partition 0
            # MERGE_LOADS partitions at a time, their loads issued together (the index clamped to the last
            # partition, the extra rows weighted 0): a load at a time, each waiting for the one before, cost a
            # round trip per partition.
            big = float32(NEG_BIG)
            for p0 in range(0, used, MERGE_LOADS):
                for j in range(MERGE_LOADS):
                    big = max(big, ld_f32_cg(part_m, first + min(p0 + j, used - 1)))
            total = float32(0.0)
            o0 = float32(0.0)
            o1 = float32(0.0)
            for p0 in range(0, used, MERGE_LOADS):
                for j in range(MERGE_LOADS):
                    p = min(p0 + j, used - 1)
                    weight = ld_f32_cg(part_l, first + p) * math.exp(ld_f32_cg(part_m, first + p) - big)
                    if p0 + j >= used:
                        weight = float32(0.0)
                    total += weight
                    o0 += weight * ld_f32_cg(part_o, (first + p) * D + w * epw)
                    if pairs:
                        o1 += weight * ld_f32_cg(part_o, (first + p) * D + w * epw + 1)
            inv_total = float32(1.0) / total
            if pairs:
                out_w[(seq * num_heads + head0) * W + x] = pack(o0 * inv_total, o1 * inv_total)
            else:
                out_w[(seq * num_heads + head0) * W + x] = f32_bits(o0 * inv_total)

    return merge_if_last
