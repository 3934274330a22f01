"""``out = x @ weight.T (+ bias)`` for the few rows of a decode step, on the tensor cores, the weights read once.

A decode step multiplies one row per sequence by each weight matrix. At batch <= 32 the weights' bytes are the
whole cost (the Qwen2.5-0.5B shape's four projections read 2.1, 1.6, 17.4 and 8.7 MB a layer: 0.4 to 4 us at
4.2 TB/s), yet cuBLAS takes 4-7 us per GEMM there, plus a split-K reduction kernel for the down projection
(results/profile_NVIDIA_H200.json). This kernel computes the product transposed, ``out.T = weight @ x.T``
("swap A/B"): 16 weight rows fill the wide side of an ``mma.m16n8k16`` and up to 8 tokens its narrow one.

Grid and threads::

    grid    (N / (16 * WN), ceil(M / (8 T)))   T = ``tiles_for(M)``: 1, 2 or 4 n-tiles of 8 tokens
            block (b, mb) computes out[8T mb : 8T (mb + 1), 16 WN b : 16 WN (b + 1)] (past 8T = 32 tokens each
            block row reads the weights again, from L2 where they fit)
    threads 8 warps; warp w = wn * WK + wk (WN * WK = 8) takes weight rows n0 = 16 (WN b + wn) .. n0 + 15 and
            the K chunks (32 columns each) wk, wk + WK, wk + 2 WK, ...; the WK warps of a row group add their
            partial sums through shared memory, then the block's threads write two outputs (one word) each.
            WN is chosen per weight shape (``row_groups_per_block``): enough blocks to cover the SMs, and as
            many row groups per block as still do, since every block reads its tokens of x again.

Per chunk of columns kb .. kb + 31, lane = 4 g + t::

    A (16 x 16 per k-step): weight rows n0 + g and n0 + g + 8, columns kb + 8t .. kb + 8t + 7: one 16-byte load
        each (four words: w[0..3] of row g, v[0..3] of row g + 8; ``weights[8d ..]`` for the d-th chunk).
    B (16 x 8 per k-step and n-tile j): x row m = 8T mb + 8 j + g (clamped to M - 1; its column of the result is
        dropped), columns kb + 8t .. kb + 8t + 7: one 16-byte load (x[0..3]).
    The k dimension is permuted alike for A and B (a dot product does not care about the order of its terms):
    in k-step s (0, 1) the fragment's columns 2t, 2t + 1 are physical columns kb + 8t + 4s + {0, 1} (word 2s)
    and columns 2t + 8, 2t + 9 are kb + 8t + 4s + {2, 3} (word 2s + 1), so the mma's operands are
        a = (w[2s], v[2s], w[2s + 1], v[2s + 1]),  b = (x[2s], x[2s + 1])
    with no shuffle or shared-memory staging.
    acc[4 j .. 4 j + 3] (C fragment of n-tile j) = out.T[n0 + g, 8 j + 2t], [n0 + g, 8 j + 2t + 1],
        [n0 + g + 8, 8 j + 2t], [n0 + g + 8, 8 j + 2t + 1] (columns relative to 8T mb).

A round: a warp issues the weight loads of DEPTH of its chunks, then the x words of every tile for X_DEPTH
chunks at a time, then multiplies. Every load is unconditional (clamped addresses) and only the mma is guarded:
with a guarded load per tile, ptxas issued each x load just before its mma, one L2 round trip per tile and
chunk, and the kernel ran 2.5x slower (bench_gemm.py on the H200: gate_up at batch 1, 19.8 against 8.0 us). The
tile count is a constant of the compiled kernel, so a batch of one does not carry registers for 64 tokens.

A row's sum runs over the same chunks in the same order whatever M is, so a row's output does not depend on the
other rows of the batch. Accumulation is float32; the output is rounded once, after the bias is added.
"""
from __future__ import annotations

import functools

import torch
from numba import cuda, float32, uint32

from . import validation as V
from .common import max_registers_option, num_sms, word_codec
from .mma import mma_bf16, mma_f16
from .ptx import ld_i32_at, ld_v4_at, st_u32_at
from .runtime import launch

WARPS = 8
ROWS = 16      # weight rows per warp (the mma's M)
CHUNK = 32     # K columns per chunk: one 16-byte load per row and lane
DEPTH = 4      # chunks whose weights a warp loads before multiplying any of them
MAX_TILES = 4  # n-tiles of 8 tokens per block (8 measured slower from 48 to 128 tokens: ptxas interleaved and
               # spilled its loads under the 128-register cap)
_DTYPES = (torch.float16, torch.bfloat16)


def serves(rows: int, n: int, k: int) -> bool:
    """Whether this kernel beats cuBLAS at ``rows`` x ``[n, k]`` (``benchmarks/bench_gemm.py`` on the H200, every
    projection of three model shapes at 1-32 rows, ``results/gemm_*_NVIDIA_H200.json``): up to 16 rows, on weights
    of at most 2^22 elements (8 MB of bf16) and at most 2^25 / rows (every warp loads x's words for each of its
    chunks, so the kernel's time grows with rows x weight, where cuBLAS's ~4 us a GEMM is mostly fixed; on large
    weights cuBLAS streams them faster). Examples, us against cuBLAS:
    Qwen2.5-0.5B's qkv [1152, 896] at 16 rows 3.96 / 4.70, Qwen3-0.6B's o [1024, 2048] at 1 row 4.05 / 12.96;
    outside: Qwen2.5-0.5B's down [896, 4864] at 1 row 7.37 / 7.18, o at 32 rows 4.84 / 3.60."""
    return 0 < rows <= 16 and n % ROWS == 0 and k % CHUNK == 0 and n * k <= min(1 << 22, (1 << 25) // rows)


def row_groups_per_block(n: int, sms: int) -> int:
    """WN: the most 16-row groups per block (8, 4, 2 or 1, dividing N / 16) that still give every SM a block;
    1 when even that leaves SMs idle."""
    groups = n // ROWS
    for wn in (8, 4, 2):
        if groups % wn == 0 and groups // wn >= sms:
            return wn
    return 1


def tiles_for(m: int) -> int:
    """Token tiles of 8 per block for ``m`` rows: the fewest of 1, 2, 4 that hold them (4 above 32)."""
    tiles = 1
    while tiles < MAX_TILES and 8 * tiles < m:
        tiles *= 2
    return tiles


def max_registers(tiles: int) -> int:
    """The register cap for a tile count, the least under which ptxas still issues a round's loads before its
    first mma (one tile: 93 registers, where 64 split the round in three; two or four: 124-128)."""
    return 96 if tiles == 1 else 128


@functools.lru_cache(maxsize=None)
def _kernel(dtype_name: str, wn: int, has_bias: bool, tiles: int):
    mma = mma_bf16 if dtype_name == "bfloat16" else mma_f16
    lo, hi, pack = word_codec(dtype_name)
    WK = WARPS // wn
    T = tiles
    TOKENS = 8 * T
    PARTIALS = (WARPS, ROWS, TOKENS)
    WEIGHT_WORDS = 8 * DEPTH   # (a local array's size must be a constant of the closure)
    X_DEPTH = min(DEPTH, 8 // T)  # chunks whose x words load at once (all of the round's while they fit)
    X_WORDS = 4 * T * X_DEPTH
    ACC_WORDS = 4 * T
    STEP = WK * DEPTH

    @cuda.jit(device=True, inline=True)
    def load_weights(weights, row_g, row_g8, first, chunks):
        """Issue the weight loads of the warp's DEPTH chunks from ``first`` (past the end: the last chunk again)."""
        for d in range(DEPTH):
            c = min(first + d * WK, chunks - 1)
            i = 8 * d
            weights[i], weights[i + 1], weights[i + 2], weights[i + 3] = ld_v4_at(row_g + c * 64)
            weights[i + 4], weights[i + 5], weights[i + 6], weights[i + 7] = ld_v4_at(row_g8 + c * 64)

    @cuda.jit(device=True, inline=True)
    def multiply(acc, weights, xs, x_rows, row_bytes, first, chunks, m0, m_total, g):
        """acc += the DEPTH chunks from ``first`` (weights loaded) times x (loaded here), chunks < ``chunks``."""
        for d0 in range(0, DEPTH, X_DEPTH):
            for d in range(d0, d0 + X_DEPTH):
                c = min(first + d * WK, chunks - 1)
                for j in range(T):
                    m = min(m0 + 8 * j + g, m_total - 1)
                    i = 4 * (T * (d - d0) + j)
                    xs[i], xs[i + 1], xs[i + 2], xs[i + 3] = ld_v4_at(x_rows + m * row_bytes + c * 64)
            for d in range(d0, d0 + X_DEPTH):
                if first + d * WK < chunks:
                    w = 8 * d  # words w .. w + 3: row g; w + 4 .. w + 7: row g + 8
                    for j in range(T):
                        i = 4 * (T * (d - d0) + j)
                        a = 4 * j
                        acc[a], acc[a + 1], acc[a + 2], acc[a + 3] = mma(
                            weights[w], weights[w + 4], weights[w + 1], weights[w + 5], xs[i], xs[i + 1],
                            acc[a], acc[a + 1], acc[a + 2], acc[a + 3])
                        acc[a], acc[a + 1], acc[a + 2], acc[a + 3] = mma(
                            weights[w + 2], weights[w + 6], weights[w + 3], weights[w + 7], xs[i + 2], xs[i + 3],
                            acc[a], acc[a + 1], acc[a + 2], acc[a + 3])

    @cuda.jit(**max_registers_option(max_registers(tiles)))
    def kernel(out_ptr, x_ptr, weight_ptr, bias_ptr, m_total, n_total, k_total):
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        g, t = lane // 4, lane % 4
        group, wk = warp // WK, warp % WK
        n0 = (cuda.blockIdx.x * wn + group) * ROWS
        m0 = cuda.blockIdx.y * TOKENS
        row_bytes = k_total * 2
        chunks = k_total // CHUNK

        acc = cuda.local.array(ACC_WORDS, float32)
        for i in range(ACC_WORDS):
            acc[i] = 0.0
        lane_column = 16 * t                             # bytes: columns 8t .. 8t + 7 of a chunk
        row_g = weight_ptr + (n0 + g) * row_bytes + lane_column
        row_g8 = row_g + 8 * row_bytes
        x_rows = x_ptr + lane_column
        # One round per DEPTH chunks of the warp: DEPTH * 1 KB of weights in flight per warp (module docstring).
        weights = cuda.local.array(WEIGHT_WORDS, uint32)
        xs = cuda.local.array(X_WORDS, uint32)
        for first in range(wk, chunks, STEP):
            load_weights(weights, row_g, row_g8, first, chunks)
            multiply(acc, weights, xs, x_rows, row_bytes, first, chunks, m0, m_total, g)

        partials = cuda.shared.array(PARTIALS, float32)
        for j in range(T):
            col = 8 * j + 2 * t
            partials[warp, g, col] = acc[4 * j]
            partials[warp, g, col + 1] = acc[4 * j + 1]
            partials[warp, g + 8, col] = acc[4 * j + 2]
            partials[warp, g + 8, col + 1] = acc[4 * j + 3]
        cuda.syncthreads()
        # thread item: (row group, token column, pair of rows r, r + 1) -> one output word
        for item in range(tid, wn * TOKENS * (ROWS // 2), cuda.blockDim.x):
            pair = item % (ROWS // 2)
            col = (item // (ROWS // 2)) % TOKENS
            grp = item // (TOKENS * (ROWS // 2))
            m = m0 + col
            if m < m_total:
                r = 2 * pair
                n = (cuda.blockIdx.x * wn + grp) * ROWS + r
                s0 = float32(0.0)
                s1 = float32(0.0)
                for k in range(WK):
                    s0 += partials[grp * WK + k, r, col]
                    s1 += partials[grp * WK + k, r + 1, col]
                if has_bias:
                    word = ld_i32_at(bias_ptr + n * 2)  # bias[n], bias[n + 1]
                    s0 += lo(word)
                    s1 += hi(word)
                st_u32_at(out_ptr + (m * n_total + n) * 2, pack(s0, s1))

    return kernel


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, row_groups: int | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K].T (+ bias [N])`` -> ``[M, N]`` (into ``out`` if given), float16 or bfloat16,
    float32 accumulation. K must be a multiple of 32 and N of 16; tensors contiguous and 16-byte aligned.
    ``row_groups``: 16-row groups per block, 1, 2, 4 or 8 dividing N / 16 (default ``row_groups_per_block``;
    it changes the order in which a row's partial sums are added, so the last bit may differ)."""
    V.check_tensor("x", x, ndim=2, dtypes=_DTYPES)
    V.check_tensor("weight", weight, ndim=2, dtype=x.dtype)
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if k % CHUNK or k == 0:
        raise ValueError(f"K (x's last dim) must be a positive multiple of {CHUNK}, got {k}")
    if n % ROWS or n == 0:
        raise ValueError(f"N (weight's first dim) must be a positive multiple of {ROWS}, got {n}")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1, dtype=x.dtype)
        if bias.shape[0] != n:
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    out = V.output(out, (m, n), x)
    tensors = {"x": x, "weight": weight, "out": out, **({"bias": bias} if bias is not None else {})}
    V.check_device(**tensors)
    for name, t in tensors.items():
        V.check_aligned(name, t)
    if row_groups is None:
        row_groups = row_groups_per_block(n, num_sms())
    elif row_groups not in (1, 2, 4, 8) or (n // ROWS) % row_groups:
        raise ValueError(f"row_groups must be 1, 2, 4 or 8 and divide N / {ROWS} = {n // ROWS}, got {row_groups!r}")
    if m:
        dtype_name = str(x.dtype).removeprefix("torch.")
        tiles = tiles_for(m)
        launch(_kernel(dtype_name, row_groups, bias is not None, tiles), (n // (ROWS * row_groups), -(-m // (8 * tiles))),
               32 * WARPS, out.data_ptr(), x.data_ptr(), weight.data_ptr(),
               bias.data_ptr() if bias is not None else 0, m, n, k)
    return out
