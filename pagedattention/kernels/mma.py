"""Warp-level tensor-core intrinsics for the prefill and tensor-core decode kernels, through inline PTX (Numba
has none of them).

- ``mma_f16`` / ``mma_bf16``: ``mma.sync.m16n8k16`` with fp32 accumulators, D = A @ B + C.
- ``ldmatrix_x4`` / ``ldmatrix_x4_trans``: one ``ldmatrix`` loads four 8x8 16-bit matrices from shared memory
  straight into mma fragment layout (the plain form for K, the transposing form for V stored row-major).
- ``cp_async16`` / ``cp_async_wait_all``: 16-byte global -> shared copies that bypass registers (zero-filled
  when the source size is 0), and the wait for this thread's outstanding copies.
- ``quad_max`` / ``quad_sum``: reductions over the 4 lanes that share an mma fragment row.
- ``interleave_lo`` / ``interleave_hi``: one ``prmt.b32`` each; the low (high) 16-bit halves of two words side
  by side, a's in the low half. Two rows of 16-bit values become the column pairs a B fragment wants:
  {V[t][d], V[t + 1][d]} from row words {V[t][d], V[t][d + 1]} and {V[t + 1][d], V[t + 1][d + 1]}.
Plain global loads and stores (also those at raw addresses) are in ptx.py.

Fragment layout (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs); lane = 4 * g + t, g = lane // 4, t = lane % 4:
  A (row-major 16x16, 4 words): a[0] = A[g, 2t:2t+2]   a[1] = A[g+8, 2t:2t+2]
                                a[2] = A[g, 2t+8:2t+10] a[3] = A[g+8, 2t+8:2t+10]
  B (16x8 given as 8 columns, 2 words): b[0] = B[2t:2t+2, g]   b[1] = B[2t+8:2t+10, g]
  C, D (16x8 fp32, 4 floats):   c[0], c[1] = C[g, 2t], C[g, 2t+1]   c[2], c[3] = C[g+8, 2t], C[g+8, 2t+1]
A word holds two 16-bit values, the lower-indexed one in the low half.
ldmatrix.x4: lanes 8i .. 8i + 7 give the addresses of rows 0..7 of matrix i (16 bytes each); register i of
lane l receives matrix i's row l // 4, columns 2 (l % 4), +1 -- or, with .trans, rows 2 (l % 4), +1 of column
l // 4. So a K row (key n, 8 dims) read plainly is a B fragment word of K^T, and V rows (8 keys, 8 dims) read
transposed are B fragment words of V.

Under Numba's CUDA simulator, which runs each thread as a Python thread and knows no PTX, every intrinsic has a
plain-Python twin: the warp-wide ones meet at a per-warp barrier where the last lane to arrive computes the
whole warp's result with numpy, so kernels run unchanged.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import cuda

from .runtime import simulator_enabled

__all__ = ["mma_f16", "mma_bf16", "ldmatrix_x4", "ldmatrix_x4_trans", "cp_async16", "cp_async_wait_all",
           "quad_max", "quad_sum", "interleave_lo", "interleave_hi", "SMEM_ALIGN"]

#: Alignment of shared arrays read by ldmatrix / written by cp.async (16-byte rows). The simulator accepts only
#: None, and its arrays are numpy allocations (aligned anyway).
SMEM_ALIGN = None if simulator_enabled() else 16

if simulator_enabled():
    import ctypes

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
            warps = manager.__dict__.setdefault("_tensor_core_warps", {})
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

    def _ldmatrix_combine(trans: bool):
        def combine(rows):
            # halves[i, r, c]: 16-bit element (row r, column c) of matrix i; lanes 8i + r gave its rows
            halves = np.array(rows, dtype=np.uint32).view(np.uint16).reshape(4, 8, 8)
            if trans:
                halves = halves.transpose(0, 2, 1)
            words = np.ascontiguousarray(halves).view(np.uint32).reshape(4, 8, 4)   # [matrix, row, word]
            return [tuple(int(words[i, lane // 4, lane % 4]) for i in range(4)) for lane in range(32)]

        return combine

    _combine_ldsm, _combine_ldsm_trans = _ldmatrix_combine(False), _ldmatrix_combine(True)

    def _row(words, i):
        i = int(i)
        return [int(w) & 0xFFFFFFFF for w in words[i:i + 4]]

    def ldmatrix_x4(words, i):
        return _warp_collective(_row(words, i), _combine_ldsm)

    def ldmatrix_x4_trans(words, i):
        return _warp_collective(_row(words, i), _combine_ldsm_trans)

    def cp_async16(words, i, address, nbytes):
        i = int(i)
        words[i:i + 4] = (ctypes.c_uint32 * 4).from_address(int(address))[:] if nbytes else 0

    def cp_async_wait_all():
        pass

    def _quad(reduce):
        def combine(values):
            return [reduce(values[lane & ~3:(lane & ~3) + 4]) for lane in range(32)]
        return lambda x: _warp_collective(x, combine)

    quad_max = _quad(max)
    quad_sum = _quad(lambda v: np.float32(sum(v)))

    def interleave_lo(a, b):
        return (int(a) & 0xFFFF) | ((int(b) & 0xFFFF) << 16)

    def interleave_hi(a, b):
        return ((int(a) & 0xFFFFFFFF) >> 16) | (int(b) & 0xFFFF0000)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _i32, _i64, _f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()

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
                fnty = ir.FunctionType(ir.LiteralStructType([_f32] * 4), [_i32] * 6 + [_f32] * 4)
                ret = builder.call(ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f"), ins)
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, i) for i in range(4)])

            return sig, codegen

        return mma

    mma_f16, mma_bf16 = _mma("f16"), _mma("bf16")

    def _shared_address(context, builder, arrty, arr, index, index_type):
        """32-bit shared-window address of element ``index`` of a 1-D shared array (ldmatrix and cp.async take
        .shared addresses; Numba hands shared arrays around as generic pointers)."""
        ary = context.make_array(arrty)(context, builder, value=arr)
        index = context.cast(builder, index, index_type, types.intp)
        ptr = builder.gep(ary.data, [index])
        if ptr.type.addrspace != 3:
            ptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3))
        return builder.ptrtoint(ptr, _i32)

    def _is_word_array(a):
        return isinstance(a, types.Array) and a.ndim == 1 and a.dtype.bitwidth == 32

    def _ldmatrix(trans: bool):
        asm = ("ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "") +
               ".shared.b16 {$0, $1, $2, $3}, [$4];")

        @intrinsic
        def ldmatrix(typingctx, words, i):
            if not (_is_word_array(words) and isinstance(i, types.Integer)):
                return None
            sig = types.UniTuple(types.uint32, 4)(words, i)

            def codegen(context, builder, sig, args):
                addr = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
                fnty = ir.FunctionType(ir.LiteralStructType([_i32] * 4), [_i32])
                # side effect: never hoisted above the barrier that publishes the tile
                ret = builder.call(ir.InlineAsm(fnty, asm, "=r,=r,=r,=r,r", side_effect=True), [addr])
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, k) for k in range(4)])

            return sig, codegen

        return ldmatrix

    ldmatrix_x4, ldmatrix_x4_trans = _ldmatrix(False), _ldmatrix(True)

    @intrinsic
    def cp_async16(typingctx, words, i, address, nbytes):
        """Copy 16 bytes from global ``address`` to ``words[i .. i+3]`` (shared); bytes past ``nbytes`` (0 or 16)
        are zero-filled, so ``nbytes = 0`` reads nothing and writes zeros."""
        if not (_is_word_array(words) and all(isinstance(x, types.Integer) for x in (i, address, nbytes))):
            return None
        sig = types.void(words, i, address, nbytes)

        def codegen(context, builder, sig, args):
            dst = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            src = context.cast(builder, args[2], sig.args[2], types.int64)
            n = context.cast(builder, args[3], sig.args[3], types.uint32)
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_i32, _i64, _i32]),
                               "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}", side_effect=True)
            builder.call(asm, [dst, src, n])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def cp_async_wait_all(typingctx):
        """Wait until this thread's cp.async copies have landed (other threads see them after a barrier)."""
        sig = types.void()

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "cp.async.wait_all;", "~{memory}",
                               side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return sig, codegen

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

    def _prmt(selector: int):
        @intrinsic
        def fn(typingctx, a, b):
            if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
                return None
            sig = types.uint32(types.uint32, types.uint32)

            def codegen(context, builder, sig, args):
                asm = ir.InlineAsm(ir.FunctionType(_i32, [_i32, _i32]), f"prmt.b32 $0, $1, $2, {selector:#x};",
                                   "=r,r,r")
                return builder.call(asm, list(args))

            return sig, codegen

        return fn

    interleave_lo = _prmt(0x5410)   # bytes 1:0 of a, then bytes 1:0 of b
    interleave_hi = _prmt(0x7632)   # bytes 3:2 of a, then bytes 3:2 of b
