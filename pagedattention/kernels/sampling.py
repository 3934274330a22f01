"""Sampling a token per row in one launch over the logits: greedy argmax or a draw from softmax(x / T), with the
chosen token's log-probability.

A draw is inverse-CDF sampling: one uniform u per row, and the token is the first column whose cumulative
weight exp((x - max) / T) passes u times the row's total weight. A single read of the logits gives every
block's part of the totals; only the 1,024 columns that hold the crossing are read again. Per logit that is two
exponentials (the weight, and exp(x - max) for the log-probability's log-sum-exp) and no random bits, where a
Gumbel-max draw needs a hash and two logarithms per logit. Torch needs about eight passes over the
[rows, vocab] logits for the same (softmax, exponential draw, divide, argmax, log_softmax, gather).

u is counter-based: the top 23 bits of a hash of (key, counter), so no random state lives on the device and a
row's draw depends on its key and counter only: a seeded request uses its seed as key and its number of
generated tokens as counter, so its tokens do not depend on its batch-mates. The sums that locate the crossing
are made per fixed segment of 1,024 columns, each in one fixed order, and merged in column order, so a row's
token does not depend on how many rows or blocks share the launch either.

The logits are float32, bfloat16 or float16, read as they are (no float32 copy): a 2-byte logit widens to
float32 exactly and is summed in the same order, so a row gives the same token and log-probability as its
float32 conversion.

grid (rows, splits), block WARPS warps        block (row, split): warp w takes the row's segments
                                               split * WARPS + w, then + splits * WARPS, ... (``num_splits``
                                               gives enough blocks to cover every SM a few times)
segment (1,024 columns): lane l of the warp    32 columns of the segment, as four units of 8 starting at
                                               columns 8 l, + 256, + 512, + 768 (one 16-byte load for 2-byte
                                               logits, two for float32, when the row is 16-byte aligned, so
                                               each load of the warp reads 512 contiguous bytes; else one load
                                               per column). A unit
                                               raises the lane's running max m once, then adds its 8 weights:
                                               s += exp(x - m), t += exp((x - m) / T); a greedy row keeps the
                                               first column of the max instead of t
                                               the 32 lanes merge (xor butterfly) into the segment's record
                                               [m, s, t or column, bad] (16 bytes at records[row, segment])
the row's last block to finish (an arrival     warp 0 merges the row's records in column order: lane l takes a
counter per row, reset to 0 by that block)     contiguous run of segments, the lanes merge, M = max, S = total
                                               of exp(x - M). Greedy: the max's first column. Else the lanes'
                                               weights in units of exp((x - M) / T), scanned in lane order,
                                               find the segment where u * total falls, and the segment is read
                                               again to find the column (rounding that overshoots the end takes
                                               the last column of positive weight). It writes the token and
                                               x_token - M - log(S)
A row holding NaN or +inf gets log-probability NaN (the caller reports it) and token 0, as does a row whose
every logit is -inf. The kernels run with fastmath (approximate exp/log), and the scan tests no logit: a -inf
logit weighs exactly 0 (ex2 of -inf), a NaN makes its lane's sum NaN and a +inf its lane's max +inf, which are
recognised once per segment from the bits (a 2-byte value widened to float32 keeps them).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, float32, int32, uint64

from .common import DTYPE_NAMES, num_sms, word_codec
from .decode import arrival_counters
from .ptx import (as_f32, atomic_add_at, f32_bits, fmix32, ld_i32_at, ld_i64_at, ld_u16_at, ld_v4_at, ld_v4_cg_at,
                  st_u32_at, st_v4_at)
from .runtime import launch, nvvm_inlined, simulator_enabled

SEGMENT = 1024       # columns per record: 32 lanes x 32 columns
UNITS = 4            # units of 8 columns per lane and segment
WARPS = 8            # warps per block (1 under the simulator, which runs a Python thread per CUDA thread)
_S32, _S9 = np.uint64(32), np.uint64(9)
_TWO_M23 = np.float32(2.0 ** -23)
NEG_BIG = np.float32(-3.0e38)  # "minus infinity" that fastmath may rely on: finite
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FULL = 0xFFFFFFFF


@nvvm_inlined
def row_hash(key, counter):
    """32 bits from a row's non-negative int64 key and counter."""
    k, c = uint64(key), uint64(counter)
    h = fmix32(k)
    h = fmix32(uint64(h) ^ (k >> _S32))
    h = fmix32(uint64(h) ^ c)
    return fmix32(uint64(h) ^ (c >> _S32))


@nvvm_inlined
def uniform(h):
    """u = (k + 1/2) / 2**23 in (0, 1) from the top 23 bits k of ``h`` (k + 1/2 is exact in float32; 24 bits
    would round the largest up to 2**24, u = 1)."""
    return (float32(h >> _S9) + float32(0.5)) * _TWO_M23


@nvvm_inlined
def _classify(x):
    """0: finite, 1: -inf (a masked token), 2: NaN or +inf. From the bits: fastmath may assume no NaN/inf."""
    b = f32_bits(x)
    if (b & 0x7F800000) != 0x7F800000:
        return 0
    if (b & 0x7FFFFF) == 0 and ((b >> 31) & 1) == 1:
        return 1
    return 2


@nvvm_inlined
def _max(a, b):
    """max(a, b), NaN-ignoring on the GPU and in the simulator alike (Python's max keeps a NaN first argument).
    It compiles to a compare, a NaN test and a select, not to one max.f32."""
    return a if a > b or b != b else b


@nvvm_inlined
def _first(x, col, top, first):
    """``col`` if ``x`` is ``top``, else ``first`` (called from the last column back: the first one wins)."""
    return col if x == top else first


@nvvm_inlined
def _add(x, m, s, t, inv_t, greedy):
    """exp(x - m) into s and, for a sampled row, exp((x - m) / T) into t. No test of x: a -inf logit adds
    exactly 0 (ex2 of -inf), a NaN makes s NaN and a +inf has made m +inf, which the segment's record shows."""
    d = x - m
    s += math.exp(d)
    if not greedy:
        t += math.exp(d * inv_t)
    return s, t


@nvvm_inlined
def _non_finite(m, s):
    """1 if a lane's part saw a NaN (its s is NaN) or a +inf (its max is +inf), else 0."""
    return int32(1) if _classify(m) == 2 or _classify(s) == 2 else int32(0)


@nvvm_inlined
def _weight(x, m, inv_t):
    return math.exp((x - m) * inv_t) if _classify(x) == 0 else float32(0.0)


@nvvm_inlined
def _step(x, col, m, inv_t, run, target, found, last_positive):
    w = _weight(x, m, inv_t)
    if w > float32(0.0):
        last_positive = col
    run += w
    if found < 0 and w > float32(0.0) and run > target:
        found = col
    return run, found, last_positive


@nvvm_inlined
def _merge(m1, s1, t1, c1, m2, s2, t2, c2, inv_t, greedy):
    """Two parts' (max, sum of exp(x - max), sum of exp((x - max) / T) or the max's first column): for a greedy
    row ties keep the smaller column. Symmetric, so the two lanes of a butterfly get the same bits."""
    m = max(m1, m2)
    s = s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m)
    if greedy:
        c = c1 if (m1 > m2 or (m1 == m2 and c1 < c2)) else c2
        return m, s, t1, c
    return m, s, _rescaled(t1, m1 - m, inv_t) + _rescaled(t2, m2 - m, inv_t), c1


@nvvm_inlined
def _rescaled(t, shift, inv_t):
    """t * exp(shift / T) for shift <= 0; 0 for t = 0 (whose max may be NEG_BIG: the product would overflow)."""
    return t * math.exp(shift * inv_t) if t > float32(0.0) else float32(0.0)


@nvvm_inlined
def _warp_merge(m, s, t, c, bad, inv_t, greedy):
    """The 32 lanes' parts merged (xor butterfly: every lane ends with the same result)."""
    for k in range(5):
        d = 1 << k
        m2 = cuda.shfl_xor_sync(_FULL, m, d)
        s2 = cuda.shfl_xor_sync(_FULL, s, d)
        t2 = cuda.shfl_xor_sync(_FULL, t, d)
        c2 = cuda.shfl_xor_sync(_FULL, c, d)
        bad |= cuda.shfl_xor_sync(_FULL, bad, d)
        m, s, t, c = _merge(m, s, t, c, m2, s2, t2, c2, inv_t, greedy)
    return m, s, t, c, bad


@nvvm_inlined
def _inclusive_scan(a, lane):
    """Sum of lanes 0..lane's ``a``, in a fixed order."""
    for k in range(5):
        d = 1 << k
        b = cuda.shfl_sync(_FULL, a, max(lane - d, 0))
        if lane >= d:
            a += b
    return a


@nvvm_inlined
def _warp_min(v):
    for k in range(5):
        v = min(v, cuda.shfl_xor_sync(_FULL, v, 1 << k))
    return v


@nvvm_inlined
def _warp_max(v):
    for k in range(5):
        v = max(v, cuda.shfl_xor_sync(_FULL, v, 1 << k))
    return v


@functools.lru_cache(maxsize=None)
def _kernel(warps: int, dtype_name: str):
    # Raw addresses (``runtime.launch``: no per-array wrapping on the host). logits: dtype_name [rows, vocab];
    # params: int64 [3, rows] = keys, counters, float32 bits of the temperatures; records: 32-bit words
    # [rows, segments, 4]; counters: int32 [rows]; out: float32 [2, rows] = token ids, log-probabilities.
    lo, hi, _ = word_codec(dtype_name)
    size = 4 if dtype_name == "float32" else 2  # bytes per logit

    if size == 4:
        @nvvm_inlined
        def logit(address):
            return as_f32(ld_i32_at(address))

        @nvvm_inlined
        def load_unit(row_base, col, vocab, aligned):
            """Columns col .. col + 7 (past the vocabulary: -inf) as float32."""
            if col >= vocab:
                return _past_end()
            if aligned and col + 8 <= vocab:
                a0, a1, a2, a3 = ld_v4_at(row_base + col * 4)
                b0, b1, b2, b3 = ld_v4_at(row_base + col * 4 + 16)
                return (as_f32(a0), as_f32(a1), as_f32(a2), as_f32(a3),
                        as_f32(b0), as_f32(b1), as_f32(b2), as_f32(b3))
            return _unit_by_column(row_base, col, vocab)
    else:
        @nvvm_inlined
        def logit(address):
            return lo(ld_u16_at(address))

        @nvvm_inlined
        def load_unit(row_base, col, vocab, aligned):
            """Columns col .. col + 7 (past the vocabulary: -inf) as float32."""
            if col >= vocab:
                return _past_end()
            if aligned and col + 8 <= vocab:
                w0, w1, w2, w3 = ld_v4_at(row_base + col * 2)
                return lo(w0), hi(w0), lo(w1), hi(w1), lo(w2), hi(w2), lo(w3), hi(w3)
            return _unit_by_column(row_base, col, vocab)

    @nvvm_inlined
    def _past_end():
        x = as_f32(0xFF800000)
        return x, x, x, x, x, x, x, x

    @nvvm_inlined
    def column(row_base, col, vocab):
        return logit(row_base + col * size) if col < vocab else as_f32(0xFF800000)

    @nvvm_inlined
    def _unit_by_column(row_base, col, vocab):
        return (column(row_base, col, vocab), column(row_base, col + 1, vocab),
                column(row_base, col + 2, vocab), column(row_base, col + 3, vocab),
                column(row_base, col + 4, vocab), column(row_base, col + 5, vocab),
                column(row_base, col + 6, vocab), column(row_base, col + 7, vocab))

    @nvvm_inlined
    def take_unit(u, col, vocab, m, s, t, c, inv_t, greedy):
        """The lane's (m, s, t or c) after the 8 logits ``u`` of columns col .. col + 7: the running max rises
        once per unit, then the 8 weights are added. Nothing looks for NaN or infinities here (``_add``,
        ``_non_finite``): this loop bounds the kernel's time, and testing every logit's bits made it 1.4x slower."""
        if col >= vocab:  # a unit past the row's end (in its last segment)
            return m, s, t, c
        x0, x1, x2, x3, x4, x5, x6, x7 = u
        top = _max(_max(_max(x0, x1), _max(x2, x3)), _max(_max(x4, x5), _max(x6, x7)))
        if top > m:  # rare past a row's first units
            if greedy:
                c = col + 7  # (top is one of the 8: the last column unless an earlier one holds it too)
                c = _first(x6, col + 6, top, c)
                c = _first(x5, col + 5, top, c)
                c = _first(x4, col + 4, top, c)
                c = _first(x3, col + 3, top, c)
                c = _first(x2, col + 2, top, c)
                c = _first(x1, col + 1, top, c)
                c = _first(x0, col, top, c)
            if s > float32(0.0):  # (at the first finite logit s = t = 0, and m - top might overflow over T)
                s *= math.exp(m - top)
                if not greedy:
                    t *= math.exp((m - top) * inv_t)
            m = top
        s, t = _add(x0, m, s, t, inv_t, greedy)
        s, t = _add(x1, m, s, t, inv_t, greedy)
        s, t = _add(x2, m, s, t, inv_t, greedy)
        s, t = _add(x3, m, s, t, inv_t, greedy)
        s, t = _add(x4, m, s, t, inv_t, greedy)
        s, t = _add(x5, m, s, t, inv_t, greedy)
        s, t = _add(x6, m, s, t, inv_t, greedy)
        s, t = _add(x7, m, s, t, inv_t, greedy)
        return m, s, t, c

    @nvvm_inlined
    def unit_weight(u, m_seg, inv_t):
        x0, x1, x2, x3, x4, x5, x6, x7 = u
        return (_weight(x0, m_seg, inv_t) + _weight(x1, m_seg, inv_t) + _weight(x2, m_seg, inv_t)
                + _weight(x3, m_seg, inv_t) + _weight(x4, m_seg, inv_t) + _weight(x5, m_seg, inv_t)
                + _weight(x6, m_seg, inv_t) + _weight(x7, m_seg, inv_t))

    @nvvm_inlined
    def walk_unit(u, col, m_seg, inv_t, run, target, found, last_positive):
        """Columns col .. col + 7 added to ``run`` in order: the first where it passes ``target`` is ``found``
        (once), and ``last_positive`` the last of positive weight."""
        x0, x1, x2, x3, x4, x5, x6, x7 = u
        run, found, last_positive = _step(x0, col, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x1, col + 1, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x2, col + 2, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x3, col + 3, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x4, col + 4, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x5, col + 5, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x6, col + 6, m_seg, inv_t, run, target, found, last_positive)
        run, found, last_positive = _step(x7, col + 7, m_seg, inv_t, run, target, found, last_positive)
        return run, found, last_positive

    @nvvm_inlined
    def scan_segment(row_base, col0, vocab, aligned, inv_t, greedy, lane):
        """A lane's part of the segment starting at ``col0``: its four units, loaded before any is used."""
        col = col0 + lane * 8
        u0 = load_unit(row_base, col, vocab, aligned)
        u1 = load_unit(row_base, col + 256, vocab, aligned)
        u2 = load_unit(row_base, col + 512, vocab, aligned)
        u3 = load_unit(row_base, col + 768, vocab, aligned)
        m, s, t, c = NEG_BIG, float32(0.0), float32(0.0), int32(col)
        m, s, t, c = take_unit(u0, col, vocab, m, s, t, c, inv_t, greedy)
        m, s, t, c = take_unit(u1, col + 256, vocab, m, s, t, c, inv_t, greedy)
        m, s, t, c = take_unit(u2, col + 512, vocab, m, s, t, c, inv_t, greedy)
        m, s, t, c = take_unit(u3, col + 768, vocab, m, s, t, c, inv_t, greedy)
        return m, s, t, c, _non_finite(m, s)

    @nvvm_inlined
    def pick_column(row_base, col0, vocab, aligned, m_seg, inv_t, target, lane):
        """The column of segment ``col0`` where the running weight exp((x - m_seg) / T), in column order, first
        exceeds ``target`` (past the end: the last column of positive weight). Every lane returns it."""
        col = col0 + lane * 8
        run = float32(0.0)  # the weight of the units before (all lanes hold the same)
        found = -1
        for k in range(UNITS):  # unit rows in column order: lane 0's unit, lane 1's, ..., then the next row
            if found < 0:
                u = load_unit(row_base, col + 256 * k, vocab, aligned)
                w = unit_weight(u, m_seg, inv_t)
                through = run + _inclusive_scan(w, lane)
                crossing = _warp_min(lane if through > target else 32)
                if lane == crossing:
                    found = walk_unit(u, col + 256 * k, m_seg, inv_t, through - w, target, -1, -1)[1]
                found = _warp_max(found)
                run = cuda.shfl_sync(_FULL, through, 31)
        last_positive = -1
        if found < 0:  # rounding put the target past the end
            for k in range(UNITS):
                last_positive = walk_unit(load_unit(row_base, col + 256 * k, vocab, aligned), col + 256 * k, m_seg,
                                          inv_t, NEG_BIG, target, -1, last_positive)[2]
        return found if found >= 0 else _warp_max(last_positive)

    @cuda.jit(fastmath=True)
    def sample(logits, params, rows, vocab, aligned, splits, segments, records, counters, out):
        row, split = cuda.blockIdx.x, cuda.blockIdx.y
        warp, lane = cuda.threadIdx.x // 32, cuda.threadIdx.x % 32
        temp = as_f32(ld_i32_at(params + (2 * rows + row) * 8))
        greedy = temp == float32(0.0)
        inv_t = float32(1.0) / temp if not greedy else float32(0.0)
        row_base = logits + row * vocab * size
        row_records = records + row * segments * 16
        # --- every block: its segments' records ---
        seg = split * warps + warp
        while seg < segments:
            m, s, t, c, bad = scan_segment(row_base, seg * SEGMENT, vocab, aligned, inv_t, greedy, lane)
            m, s, t, c, bad = _warp_merge(m, s, t, c, bad, inv_t, greedy)
            if lane == 0:
                st_v4_at(row_records + seg * 16, f32_bits(m), f32_bits(s), c if greedy else f32_bits(t), bad)
            seg += splits * warps
        # --- the row's last block: merge, pick, write ---
        last = cuda.shared.array(1, int32)
        cuda.threadfence()                     # this block's records, visible GPU-wide before it counts
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            last[0] = 1 if atomic_add_at(counters + row * 4, 1) == splits - 1 else 0
        cuda.syncthreads()
        if last[0] == 0 or warp != 0:
            return
        cuda.threadfence()
        if lane == 0:
            st_u32_at(counters + row * 4, 0)
        per_lane = (segments + 31) // 32
        first_seg = min(lane * per_lane, segments)
        end_seg = min(first_seg + per_lane, segments)
        m, s, t, c, bad = NEG_BIG, float32(0.0), float32(0.0), int32(1 << 30), int32(0)
        for j in range(first_seg, end_seg):
            rm, rs, rt, rbad = ld_v4_cg_at(row_records + j * 16)
            bad |= int32(rbad)
            m, s, t, c = _merge(m, s, t, c, as_f32(rm), as_f32(rs), as_f32(rt), int32(rt), inv_t, greedy)
        lane_m, lane_t = m, t
        big, total, _, col, bad = _warp_merge(m, s, t, c, bad, inv_t, greedy)
        x = big
        if not greedy and bad == 0 and total > float32(0.0):
            # the lanes' weights in units of exp((x - big) / T), in column order: which lane's run holds the draw
            weight = _rescaled(lane_t, lane_m - big, inv_t)
            before = _inclusive_scan(weight, lane) - weight
            weights = cuda.shfl_sync(_FULL, before + weight, 31)
            p = ld_i64_at(params + row * 8)
            target = uniform(row_hash(p, ld_i64_at(params + (rows + row) * 8))) * weights
            crossing = _warp_min(lane if before + weight > target else 32)
            if crossing == 32:
                crossing = _warp_max(lane if weight > float32(0.0) else -1)
            # lane ``crossing`` walks its segments to the one where the draw falls
            seg_found, seg_m, rest = int32(-1), float32(0.0), float32(0.0)
            if lane == crossing:
                run = before
                for j in range(first_seg, end_seg):
                    rm, _, rt, _ = ld_v4_cg_at(row_records + j * 16)
                    w = _rescaled(as_f32(rt), as_f32(rm) - big, inv_t)
                    if w > float32(0.0):  # the last segment of positive weight so far: the end's fallback
                        seg_found, seg_m = j, as_f32(rm)
                        rest = (target - run) / math.exp((seg_m - big) * inv_t)  # in units of exp((x - seg_m) / T)
                        if run + w > target:
                            break
                    run += w
            seg_found = cuda.shfl_sync(_FULL, seg_found, crossing)
            seg_m = cuda.shfl_sync(_FULL, seg_m, crossing)
            rest = cuda.shfl_sync(_FULL, rest, crossing)
            col = pick_column(row_base, seg_found * SEGMENT, vocab, aligned, seg_m, inv_t, rest, lane)
            x = logit(row_base + col * size)
        if lane == 0:
            if bad != 0 or total == float32(0.0):  # NaN/+inf seen, or every token masked
                st_u32_at(out + row * 4, f32_bits(float32(0.0)))
                st_u32_at(out + (rows + row) * 4, f32_bits(float32(math.nan)))
            else:
                st_u32_at(out + row * 4, f32_bits(float32(col)))
                st_u32_at(out + (rows + row) * 4, f32_bits(x - (big + math.log(total))))
    return sample


def num_splits(rows: int, vocab: int, sms: int, warps: int = WARPS) -> int:
    """Blocks per row: enough blocks to cover the GPU a few times over, at most one per ``warps`` segments."""
    segments = -(-vocab // SEGMENT)
    return max(1, min(-(-4 * sms // rows), -(-segments // warps)))


def sample_tokens(logits: torch.Tensor, params: torch.Tensor, splits: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits [rows, vocab]`` (float32, bfloat16 or float16, read as they are). ``params``
    int64 [3, rows]: each row's key and counter (>= 0) and, in the low 32 bits of the third, its temperature's
    float32 bits (``temperature_bits``): 0 is greedy argmax, else a draw from softmax(logits / T). ``splits``:
    blocks per row (default ``num_splits``; the result does not depend on it). Returns float32 [2, rows]: the
    token ids (exact: a vocabulary is far below 2**24) and their log-probabilities (NaN for a row with NaN or
    +inf, or with every logit -inf), into ``out`` if given (float32 [2, rows], contiguous, on the logits' device: a
    captured graph's output)."""
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous [rows, vocab], got {logits.dtype} {list(logits.shape)}")
    rows, vocab = logits.shape
    if vocab >= 1 << 30:
        raise ValueError(f"logits has {vocab} columns; at most {(1 << 30) - 1}")
    if params.dtype != torch.int64 or tuple(params.shape) != (3, rows) or params.device != logits.device \
            or not params.is_contiguous():
        raise ValueError(f"params must be contiguous int64 [3, {rows}] on {logits.device}, got {params.dtype} "
                         f"{list(params.shape)} on {params.device}")
    if out is None:
        out = torch.empty(2, rows, dtype=torch.float32, device=logits.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (2, rows) or out.device != logits.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [2, {rows}] on {logits.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    if rows == 0 or vocab == 0:
        return out.fill_(math.nan) if rows else out
    warps = 1 if simulator_enabled() else WARPS
    segments = -(-vocab // SEGMENT)
    if splits is None:
        splits = 1 if simulator_enabled() else num_splits(rows, vocab, num_sms(), warps)
    elif not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= segments:
        raise ValueError(f"splits must be an int in [1, {segments}] for {vocab} columns, got {splits!r}")
    size = logits.element_size()
    aligned = int(logits.data_ptr() % 16 == 0 and vocab * size % 16 == 0)
    records = torch.empty(rows, segments, 4, dtype=torch.float32, device=logits.device)
    counters = arrival_counters(logits.device, rows)
    launch(_kernel(warps, DTYPE_NAMES[logits.dtype]), (rows, splits), 32 * warps, logits.data_ptr(),
           params.data_ptr(), rows, vocab, aligned, splits, segments, records.data_ptr(), counters.data_ptr(),
           out.data_ptr())
    return out


def temperature_bits(temperatures) -> list[int]:
    """The float32 bits of each temperature, as the ints ``sample_tokens`` reads from ``params[2]``."""
    return np.asarray(temperatures, dtype=np.float32).view(np.int32).astype(np.int64).tolist()
