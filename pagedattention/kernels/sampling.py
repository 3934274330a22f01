"""Sampling a token per row in one pass over the logits: greedy argmax or Gumbel-max, and its log-probability.

With temperature T, drawing token i with probability softmax(x / T)_i is the same as taking
argmax_i(x_i / T + g_i), g_i ~ Gumbel(0, 1) independent (the Gumbel-max trick): no softmax, no sort and no
normalisation pass is needed, so one read of the logits decides the token. The same pass keeps an online
log-sum-exp of the raw logits (running max m and sum of exp(x - m)), which gives the chosen token's
log-probability under the model's distribution, x_token - m - log(sum). Torch needs about eight passes over
the [rows, vocab] logits for the same (softmax, exponential draw, divide, argmax, log_softmax, gather).

The noise is counter-based: g = -log(-log(u)), u from a hash of (key, counter, column), so no random state
lives on the device and a row's draw depends on its key and counter only: a seeded request uses its seed as key
and its number of generated tokens as counter, so its tokens do not depend on its batch-mates.

The logits are float32, bfloat16 or float16, read as they are (no float32 copy): a 2-byte logit widens to
float32 exactly, so a row gives the same token as its float32 conversion, and a log-probability equal up to
rounding (the sum of exponentials adds up in another order).

partial: grid (num_rows, splits)   block (row, split) reads the split's chunk of the row's 32-bit words; splits
                                   are chosen so that small batches still cover every SM (``num_splits``)
         threads SAMPLE_THREADS    thread t reads words chunk_start + t, + SAMPLE_THREADS, ... (coalesced),
                                   keeping (m, s): max and sum of exp(x - m) of the raw logits it read, and
                                   (best, best_col): the largest score (x, or x / T + g) and its first column;
                                   a shared-memory tree merges the threads' four-tuples (ties keep the smaller
                                   column, as torch.argmax does) into part_*[row, split]
         words                     float32: word k of a row is column k. 2-byte: a word holds two columns, and
                                   with an odd vocabulary (or an offset view) every other row starts halfway into
                                   a word; lead = 1 for such a row, whose word k is the aligned word holding
                                   columns 2k - lead and 2k - lead + 1. The row's first and last words may each
                                   hold one of its columns only: that column is read alone (16 bits), so no byte
                                   outside the row is read
finish : grid (ceil(rows / 128),)  thread ``row`` merges its row's splits, writes the token and
         threads 128               x_token - m - log(s)
A row holding NaN or +inf gets log-probability NaN (the caller reports it): no token is drawn from it. The
kernels run with fastmath (approximate exp/log): NaN and infinities are recognised from the bits (of the value
widened to float32, which keeps them).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, float32, int64, uint64

from .common import DTYPE_NAMES, num_sms, word_codec
from .ptx import as_f32, f32_bits, fmix32, ld_i32_at, ld_i64_at, ld_u16_at, st_u32_at
from .runtime import launch, simulator_enabled

SAMPLE_THREADS = 256  # one block per row: a vocabulary of ~150k columns is ~600 reads per thread
_S32, _S9 = np.uint64(32), np.uint64(9)
_TWO_M23 = np.float32(2.0 ** -23)
_MIN_EXP = np.float32(2.0 ** -24)  # -log(u) for the largest u, 1 - 2**-24, rounded down
NEG_BIG = np.float32(-3.0e38)  # "minus infinity" that fastmath may rely on: finite
BAD_COL = 1 << 30              # a column past any vocabulary: a split that saw no finite logit (or a bad one)
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@cuda.jit(device=True, inline=True)
def row_hash(key, counter):
    """32 bits from a row's non-negative int64 key and counter."""
    k, c = uint64(key), uint64(counter)
    h = fmix32(k)
    h = fmix32(uint64(h) ^ (k >> _S32))
    h = fmix32(uint64(h) ^ c)
    return fmix32(uint64(h) ^ (c >> _S32))


@cuda.jit(device=True, inline=True)
def gumbel(h, col):
    """Gumbel(0, 1) noise of column ``col`` from its row's hash ``h``: 23 random bits k -> u = (k + 1/2) / 2**23
    in (0, 1). k + 1/2 needs 24 significant bits, which float32 holds exactly; with 24 random bits the largest k
    rounded k + 1/2 up to 2**24, so u = 1, noise +inf, and that column won its row whatever its logit (one
    column in 2**24: about one draw in a hundred over a 150k vocabulary). The fast approximate log may also
    round -log(u) of the largest u to 0, so -log(u) is kept >= 2**-24: the noise stays below 16.7."""
    bits = fmix32(h ^ fmix32(col))
    u = (float32(bits >> _S9) + float32(0.5)) * _TWO_M23
    return -math.log(max(-math.log(u), _MIN_EXP))


@cuda.jit(device=True, inline=True)
def _classify(x):
    """0: finite, 1: -inf (a masked token), 2: NaN or +inf. From the bits: fastmath may assume no NaN/inf."""
    b = f32_bits(x)
    if (b & 0x7F800000) != 0x7F800000:
        return 0
    if (b & 0x7FFFFF) == 0 and ((b >> 31) & 1) == 1:
        return 1
    return 2


@cuda.jit(device=True, inline=True)
def _take(x, col, greedy, inv_t, h, m, s, best, best_col):
    """A thread's (m, s, best, best_col) after column ``col``'s logit ``x``. NaN or +inf marks the thread with a
    column past BAD_COL, and the mark sticks (the thread stops reading)."""
    kind = _classify(x)
    if kind == 2 or best_col > BAD_COL:
        return m, s, best, int64(BAD_COL) + 1  # marks the row: no token from it
    if kind == 0:
        if x > m:
            s = s * math.exp(m - x) + float32(1.0)
            m = x
        else:
            s += math.exp(x - m)
        score = x if greedy else x * inv_t + gumbel(h, col)
        if score > best:  # a thread's columns rise, so > keeps the first of equal scores
            best = score
            best_col = int64(col)
    return m, s, best, best_col


@functools.lru_cache(maxsize=None)
def _kernels(threads: int, dtype_name: str):
    # Raw addresses (``runtime.launch``: no per-array wrapping on the host). logits: dtype_name [rows, vocab];
    # params: int64 [3, rows] = keys, counters, float32 bits of the temperatures; part: 32-bit words [4, rows,
    # splits] = m, s, best (float32), best column (int32); out: float32 [2, rows] = token ids, log-probabilities.
    lo, hi, _ = word_codec(dtype_name)
    size = 4 if dtype_name == "float32" else 2  # bytes per logit

    if size == 4:
        @cuda.jit(device=True, inline=True)
        def logit(address):
            return as_f32(ld_i32_at(address))

        @cuda.jit(device=True, inline=True)
        def scan(base, first, last, vocab, tid, greedy, inv_t, h, m, s, best, best_col):
            """Words (= columns) [first, last) of the row at ``base``, from ``first + tid`` on."""
            for col in range(first + tid, min(last, vocab), threads):
                m, s, best, best_col = _take(logit(base + col * 4), col, greedy, inv_t, h, m, s, best, best_col)
                if best_col > BAD_COL:
                    break
            return m, s, best, best_col
    else:
        @cuda.jit(device=True, inline=True)
        def logit(address):
            return lo(ld_u16_at(address))

        @cuda.jit(device=True, inline=True)
        def take_pair(w, col, greedy, inv_t, h, m, s, best, best_col):
            """A word holding columns ``col`` (low half) and ``col + 1``."""
            m, s, best, best_col = _take(lo(w), col, greedy, inv_t, h, m, s, best, best_col)
            return _take(hi(w), col + 1, greedy, inv_t, h, m, s, best, best_col)

        @cuda.jit(device=True, inline=True)
        def take_word(base, k, lead, vocab, greedy, inv_t, h, m, s, best, best_col):
            """Word ``k`` of the row whose column 0 is at ``base``: its two columns, or the one that is the row's."""
            col = 2 * k - lead           # the column in the word's low half
            if col >= 0 and col + 1 < vocab:
                w = ld_i32_at(base + (col * 2))  # base - 2 * lead is 4-byte aligned, so this word is too
                return take_pair(w, col, greedy, inv_t, h, m, s, best, best_col)
            if col < 0:                  # the row's first word: its low half is the previous row's
                return _take(logit(base), 0, greedy, inv_t, h, m, s, best, best_col)
            # the row's last word: its high half is past the row
            return _take(logit(base + col * 2), col, greedy, inv_t, h, m, s, best, best_col)

        @cuda.jit(device=True, inline=True)
        def scan(base, first, last, vocab, tid, greedy, inv_t, h, m, s, best, best_col):
            """Words [first, last) of the row whose column 0 is at ``base``, from ``first + tid`` on, in rising
            order. Four words are loaded before any is used: one load at a time left the loop waiting on memory
            latency (about a quarter of the bandwidth)."""
            lead = (base >> 1) & 1       # 1: column 0 is the high half of its word
            words = (vocab + lead + 1) // 2 if vocab > 0 else 0
            stop = min(last, words)
            both = min(stop, (vocab + lead) // 2)  # words lead <= k < both hold two of the row's columns
            k = first + tid
            if k < lead and k < stop:    # the row's first word
                m, s, best, best_col = take_word(base, k, lead, vocab, greedy, inv_t, h, m, s, best, best_col)
                k += threads
            while k + 3 * threads < both and best_col <= BAD_COL:
                col = 2 * k - lead
                w0 = ld_i32_at(base + col * 2)
                w1 = ld_i32_at(base + (col + 2 * threads) * 2)
                w2 = ld_i32_at(base + (col + 4 * threads) * 2)
                w3 = ld_i32_at(base + (col + 6 * threads) * 2)
                m, s, best, best_col = take_pair(w0, col, greedy, inv_t, h, m, s, best, best_col)
                m, s, best, best_col = take_pair(w1, col + 2 * threads, greedy, inv_t, h, m, s, best, best_col)
                m, s, best, best_col = take_pair(w2, col + 4 * threads, greedy, inv_t, h, m, s, best, best_col)
                m, s, best, best_col = take_pair(w3, col + 6 * threads, greedy, inv_t, h, m, s, best, best_col)
                k += 4 * threads
            while k < stop and best_col <= BAD_COL:
                m, s, best, best_col = take_word(base, k, lead, vocab, greedy, inv_t, h, m, s, best, best_col)
                k += threads
            return m, s, best, best_col

    @cuda.jit(fastmath=True)
    def partial(logits, params, rows, vocab, chunk, splits, part):
        """Block (row, split) reads words [split * chunk, (split + 1) * chunk) of its row."""
        row, split = cuda.blockIdx.x, cuda.blockIdx.y
        tid = cuda.threadIdx.x
        t = as_f32(ld_i32_at(params + (2 * rows + row) * 8))
        greedy = t == float32(0.0)
        inv_t = float32(1.0) / t if not greedy else float32(0.0)
        h = row_hash(ld_i64_at(params + row * 8), ld_i64_at(params + (rows + row) * 8))
        start = split * chunk
        m, s, best, best_col = scan(logits + row * vocab * size, start, start + chunk, vocab, tid, greedy, inv_t, h,
                                    NEG_BIG, float32(0.0), NEG_BIG, int64(BAD_COL))
        sm = cuda.shared.array(threads, float32)
        ss = cuda.shared.array(threads, float32)
        sb = cuda.shared.array(threads, float32)
        sc = cuda.shared.array(threads, int64)
        sm[tid], ss[tid], sb[tid], sc[tid] = m, s, best, best_col
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if tid < stride:
                m1, s1, b1, c1 = _merge(sm[tid], ss[tid], sb[tid], sc[tid],
                                        sm[tid + stride], ss[tid + stride], sb[tid + stride], sc[tid + stride])
                sm[tid], ss[tid], sb[tid], sc[tid] = m1, s1, b1, c1
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            plane = rows * splits * 4
            at = part + (row * splits + split) * 4
            st_u32_at(at, f32_bits(sm[0]))
            st_u32_at(at + plane, f32_bits(ss[0]))
            st_u32_at(at + 2 * plane, f32_bits(sb[0]))
            st_u32_at(at + 3 * plane, sc[0])

    @cuda.jit(fastmath=True)
    def finish(logits, part, rows, vocab, splits, out):
        """Thread ``row`` merges its row's splits and writes the token and its log-probability."""
        row = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if row >= rows:
            return
        plane = rows * splits * 4
        m, s, best, col = NEG_BIG, float32(0.0), NEG_BIG, int64(BAD_COL)
        for split in range(splits):
            at = part + (row * splits + split) * 4
            m, s, best, col = _merge(m, s, best, col, as_f32(ld_i32_at(at)), as_f32(ld_i32_at(at + plane)),
                                     as_f32(ld_i32_at(at + 2 * plane)), int64(ld_i32_at(at + 3 * plane)))
        if col >= BAD_COL or s == float32(0.0):  # NaN/+inf seen, or every token masked
            st_u32_at(out + row * 4, f32_bits(float32(0.0)))
            st_u32_at(out + (rows + row) * 4, f32_bits(float32(math.nan)))
        else:
            x = logit(logits + (row * vocab + col) * size)
            st_u32_at(out + row * 4, f32_bits(float32(col)))
            st_u32_at(out + (rows + row) * 4, f32_bits(x - (m + math.log(s))))
    return partial, finish


@cuda.jit(device=True, inline=True)
def _merge(m1, s1, b1, c1, m2, s2, b2, c2):
    """Two threads' (or splits') (max, sum of exp(x - max), best score, its column): a bad column (>= BAD_COL)
    wins, ties keep the smaller column."""
    m = max(m1, m2)
    s = s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m)
    if c2 > BAD_COL or c1 > BAD_COL:
        return m, s, b1, max(c1, c2)
    if b2 > b1 or (b2 == b1 and c2 < c1):
        return m, s, b2, c2
    return m, s, b1, c1


def num_splits(rows: int, vocab: int, sms: int) -> int:
    """Blocks per row: enough blocks to cover the GPU a few times over, each reading at least 4,096 columns."""
    return max(1, min(-(-4 * sms // rows), vocab // 4096))


def sample_tokens(logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits [rows, vocab]`` (float32, bfloat16 or float16, read as they are). ``params``
    int64 [3, rows]: each row's noise key and counter (>= 0) and, in the low 32 bits of the third, its
    temperature's float32 bits (``temperature_bits``): 0 is greedy argmax, else a draw from softmax(logits / T).
    Returns float32 [2, rows]: the token ids (exact: a vocabulary is far below 2**24) and their log-probabilities
    (NaN for a row with NaN or +inf)."""
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous [rows, vocab], got {logits.dtype} {list(logits.shape)}")
    rows, vocab = logits.shape
    if vocab >= BAD_COL:
        raise ValueError(f"logits has {vocab} columns; at most {BAD_COL - 1}")
    if params.dtype != torch.int64 or tuple(params.shape) != (3, rows) or params.device != logits.device \
            or not params.is_contiguous():
        raise ValueError(f"params must be contiguous int64 [3, {rows}] on {logits.device}, got {params.dtype} "
                         f"{list(params.shape)} on {params.device}")
    out = torch.empty(2, rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    splits = 2 if simulator_enabled() else num_splits(rows, vocab, num_sms())
    threads = 32 if simulator_enabled() else SAMPLE_THREADS  # the simulator runs a Python thread per CUDA thread
    words = vocab if logits.dtype == torch.float32 else vocab // 2 + 1  # the most 32-bit words a row touches
    chunk = -(-words // splits)
    part = torch.empty(4, rows, splits, dtype=torch.float32, device=logits.device)
    partial, finish = _kernels(threads, DTYPE_NAMES[logits.dtype])
    launch(partial, (rows, splits), threads, logits.data_ptr(), params.data_ptr(), rows, vocab, chunk, splits,
           part.data_ptr())
    launch(finish, (-(-rows // 128),), 128, logits.data_ptr(), part.data_ptr(), rows, vocab, splits,
           out.data_ptr())
    return out


def temperature_bits(temperatures) -> list[int]:
    """The float32 bits of each temperature, as the ints ``sample_tokens`` reads from ``params[2]``."""
    return np.asarray(temperatures, dtype=np.float32).view(np.int32).astype(np.int64).tolist()
