"""Sampling a token per row in one pass over the logits: greedy argmax or Gumbel-max, and its log-probability.

With temperature T, drawing token i with probability softmax(x / T)_i is the same as taking
argmax_i(x_i / T + g_i), g_i ~ Gumbel(0, 1) independent (the Gumbel-max trick): no softmax, no sort and no
normalisation pass is needed, so one read of the logits decides the token. The same pass keeps an online
log-sum-exp of the raw logits (running max m and sum of exp(x - m)), which gives the chosen token's
log-probability under the model's distribution, x_token - m - log(sum). Torch needs about eight passes over
the [rows, vocab] float32 logits for the same (softmax, exponential draw, divide, argmax, log_softmax, gather).

The noise is counter-based: g = -log(-log(u)), u from a hash of (key, counter, column), so no random state
lives on the device and a row's draw depends on its key and counter only: a seeded request uses its seed as key
and its number of generated tokens as counter, so its tokens do not depend on its batch-mates.

grid   : (num_rows,)          one block per row
threads: SAMPLE_THREADS       thread t reads columns t, t + SAMPLE_THREADS, ... (coalesced), keeping
                                (m, s): max and sum of exp(x - m) of the raw logits it read
                                (best, best_col): the largest score (x, or x / T + g) and its first column
                              then a shared-memory tree merges the threads' pairs; ties keep the smaller column,
                              as torch.argmax does. Thread 0 writes the token and its log-probability.
A row holding NaN or +inf gets log-probability NaN (the caller reports it): no token is drawn from it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, float32, int64, uint64

from .runtime import as_kernel_array, current_stream, simulator_enabled

SAMPLE_THREADS = 256  # one block per row: a vocabulary of ~150k columns is ~600 reads per thread
_MASK32 = np.uint64(0xFFFFFFFF)
_C1, _C2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)   # murmur3's 32-bit finaliser
_S13, _S16, _S32, _S8 = np.uint64(13), np.uint64(16), np.uint64(32), np.uint64(8)
_TWO_M24 = np.float32(2.0 ** -24)


@cuda.jit(device=True, inline=True)
def _fmix32(h):
    """murmur3's finaliser on a uint64 holding 32 bits; every product stays below 2**64 (no overflow)."""
    h ^= h >> _S16
    h = (h * _C1) & _MASK32
    h ^= h >> _S13
    h = (h * _C2) & _MASK32
    h ^= h >> _S16
    return h


@cuda.jit(device=True, inline=True)
def row_hash(key, counter):
    """32 bits from a row's non-negative int64 key and counter."""
    k, c = uint64(key), uint64(counter)
    h = _fmix32(k & _MASK32)
    h = _fmix32(h ^ (k >> _S32))
    h = _fmix32(h ^ (c & _MASK32))
    return _fmix32(h ^ (c >> _S32))


@cuda.jit(device=True, inline=True)
def gumbel(h, col):
    """Gumbel(0, 1) noise of column ``col`` from its row's hash ``h``: 24 random bits -> u in (0, 1)."""
    bits = _fmix32(h ^ _fmix32(uint64(col)))
    u = (float32(bits >> _S8) + float32(0.5)) * _TWO_M24
    return -math.log(-math.log(u))


@functools.lru_cache(maxsize=None)
def _kernel(threads: int):
    @cuda.jit
    def sample(logits, temperatures, keys, counters, tokens, logprobs):
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        vocab = logits.shape[1]
        t = temperatures[row]
        greedy = t == float32(0.0)
        inv_t = float32(1.0) / t if not greedy else float32(0.0)
        h = row_hash(keys[row], counters[row])
        m = float32(-math.inf)
        s = float32(0.0)
        bad = False
        best = float32(-math.inf)
        best_col = int64(vocab)
        for col in range(tid, vocab, threads):
            x = logits[row, col]
            if x != x or x == math.inf:
                bad = True
            elif x > -math.inf:
                if x > m:
                    s = s * math.exp(m - x) + float32(1.0)
                    m = x
                else:
                    s += math.exp(x - m)
                score = x if greedy else x * inv_t + gumbel(h, col)
                if score > best:  # columns rise, so > keeps the first of equal scores
                    best = score
                    best_col = col
        sm = cuda.shared.array(threads, float32)
        ss = cuda.shared.array(threads, float32)
        sb = cuda.shared.array(threads, float32)
        sc = cuda.shared.array(threads, int64)
        sbad = cuda.shared.array(threads, int64)
        sm[tid], ss[tid], sb[tid], sc[tid], sbad[tid] = m, s, best, best_col, 1 if bad else 0
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if tid < stride:
                m1, m2 = sm[tid], sm[tid + stride]
                mm = max(m1, m2)
                if mm > -math.inf:
                    ss[tid] = ss[tid] * math.exp(m1 - mm) + ss[tid + stride] * math.exp(m2 - mm)
                sm[tid] = mm
                b2, c2 = sb[tid + stride], sc[tid + stride]
                if b2 > sb[tid] or (b2 == sb[tid] and c2 < sc[tid]):
                    sb[tid], sc[tid] = b2, c2
                sbad[tid] |= sbad[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            col = sc[0]
            if sbad[0] != 0 or col >= vocab:
                tokens[row] = 0
                logprobs[row] = float32(math.nan)
            else:
                tokens[row] = col
                logprobs[row] = logits[row, col] - (sm[0] + math.log(ss[0]))
    return sample


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
                  counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of float32 ``logits [rows, vocab]``: argmax where ``temperatures`` (float32 [rows]) is 0,
    else a draw from softmax(logits / T) with noise keyed by ``keys`` and ``counters`` (int64 [rows], >= 0).
    Returns (token ids int64 [rows], their log-probabilities float32 [rows], NaN for a non-finite row)."""
    rows = logits.shape[0]
    if logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous float32 [rows, vocab], got {logits.dtype} {list(logits.shape)}")
    for name, t, dtype in (("temperatures", temperatures, torch.float32), ("keys", keys, torch.int64),
                           ("counters", counters, torch.int64)):
        if t.dtype != dtype or tuple(t.shape) != (rows,) or t.device != logits.device:
            raise ValueError(f"{name} must be {dtype} [{rows}] on {logits.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return tokens, logprobs
    threads = 32 if simulator_enabled() else SAMPLE_THREADS  # the simulator runs a Python thread per CUDA thread
    args = [as_kernel_array(t) for t in (logits, temperatures, keys, counters, tokens, logprobs)]
    _kernel(threads)[rows, threads, current_stream()](*args)
    return tokens, logprobs
