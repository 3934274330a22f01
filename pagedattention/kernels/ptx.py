"""Memory intrinsics the kernels need and Numba lacks, and 16-bit float bit conversions. Every global load and
store through inline PTX or at a raw address lives here; the tensor-core instructions (with ``ldmatrix`` and the
``cp.async`` global -> shared copies that feed them) live in mma.py.

Why these exist:
- Numba never merges adjacent loads into one vector load (it cannot prove alignment), and element-wise fp16
  loads leave most of the memory bandwidth unused. ``ld_v4`` issues one ``ld.global.nc.v4.u32`` (16 bytes,
  read-only path) per call; callers keep several in flight per thread. ``ld_v4_coherent`` is its twin for words
  the same block wrote earlier in the launch (the fused RoPE + decode kernel reads back the key it stored).
- Kernels launched with ``data_ptr()`` addresses instead of arrays (see ``runtime.launch``) read and write
  through ``ld_i32_at`` / ``st_u32_at`` (32 bits), ``ld_u16_at`` (one fp16/bf16 value, where a whole word
  would reach past the data), ``ld_i64_at`` (an int64 as two words) and ``ld_v4_at`` / ``st_v4_at`` (16 bytes)
  at raw global byte addresses.
- The caches travel to the kernels as 32-bit words (``tensor.view(torch.int32)``, zero-copy), so one code path
  serves fp16, bf16 and fp32: a word holds two fp16/bf16 values (element ``2i`` in the low half) or one fp32.
  ``lo_f16``/``hi_f16``/``lo_bf16``/``hi_bf16``/``as_f32`` widen a word's halves to float32, and
  ``pack_f16x2``/``pack_bf16x2``/``f32_bits`` narrow results back (round to nearest even).
- ``ld_f32_cg`` / ``ld_v4_cg_at`` read what another block of the same launch wrote, from L2 (``ld.global.cg``):
  a plain load may hit a line this SM's L1 cached before the write (L1 is not coherent across SMs);
  ``atomic_add_at`` counts the blocks that have written (``atom.global.add`` at a raw address).
- ``fmix32`` (murmur3's finaliser, the sampler's noise) in 32-bit arithmetic, which Numba's integer typing
  would widen to 64 bits.

Every intrinsic has a plain-Python twin used under Numba's CUDA simulator (the simulator runs kernels as Python
and knows no inline PTX); the twins compute the same bits with numpy. ``ld_i64_at``, a device function built
on ``ld_i32_at``, serves both.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, int64

from .runtime import simulator_enabled

__all__ = ["ld_v4", "ld_v4_coherent", "st_v4", "ld_v4_at", "ld_v4_cg_at", "st_v4_at", "atomic_add_at", "ld_i32_at",
           "ld_u16_at", "ld_i64_at", "st_u32_at", "ld_f32_cg",
           "lo_f16", "hi_f16", "lo_bf16", "hi_bf16", "as_f32", "f32_bits", "pack_f16x2", "pack_bf16x2", "fmix32"]


if simulator_enabled():
    import ctypes
    import threading

    def _u32(x) -> int:
        return int(x) & 0xFFFFFFFF

    def _f16_bits_to_f32(bits: int) -> np.float32:
        return np.float32(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])

    def _f32_from_bits(bits: int) -> np.float32:
        return np.array([bits & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]

    def _bits_from_f32(x) -> int:
        return int(np.array([x], dtype=np.float32).view(np.uint32)[0])

    def _bf16_bits_rne(x) -> int:
        u = _bits_from_f32(x)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF

    def _f16_bits_rn(x) -> int:
        return int(np.array([x], dtype=np.float32).astype(np.float16).view(np.uint16)[0])

    def _signed(u: int) -> int:
        """Python int for a 32-bit word as the int32 arrays store it."""
        return u - (1 << 32) if u >= (1 << 31) else u

    def ld_v4(words, i):
        """Words ``i .. i+3`` of a 1-D 32-bit array (``i`` a multiple of 4)."""
        return _u32(words[i]), _u32(words[i + 1]), _u32(words[i + 2]), _u32(words[i + 3])

    ld_v4_coherent = ld_v4

    def st_v4(words, i, a, b, c, d):
        words[i], words[i + 1], words[i + 2], words[i + 3] = (_signed(_u32(a)), _signed(_u32(b)),
                                                              _signed(_u32(c)), _signed(_u32(d)))

    def ld_v4_at(address):
        """Four words at a raw byte address (a CPU address under the simulator)."""
        return tuple(int(w) for w in (ctypes.c_uint32 * 4).from_address(int(address)))

    def st_v4_at(address, a, b, c, d):
        (ctypes.c_uint32 * 4).from_address(int(address))[:] = [_u32(a), _u32(b), _u32(c), _u32(d)]

    def ld_i32_at(address):
        return ctypes.c_int32.from_address(int(address)).value

    ld_v4_cg_at = ld_v4_at
    _atomic_lock = threading.Lock()  # the simulator's threads are real threads

    def atomic_add_at(address, value):
        with _atomic_lock:
            word = ctypes.c_uint32.from_address(int(address))
            old = word.value
            word.value = (old + int(value)) & 0xFFFFFFFF
            return old

    def ld_f32_cg(values, i):
        return values[i]

    def ld_u16_at(address):
        return ctypes.c_uint16.from_address(int(address)).value

    def st_u32_at(address, value):
        ctypes.c_uint32.from_address(int(address)).value = int(value) & 0xFFFFFFFF

    def lo_f16(w):
        return _f16_bits_to_f32(_u32(w))

    def hi_f16(w):
        return _f16_bits_to_f32(_u32(w) >> 16)

    def lo_bf16(w):
        return _f32_from_bits((_u32(w) << 16) & 0xFFFFFFFF)

    def hi_bf16(w):
        return _f32_from_bits(_u32(w) & 0xFFFF0000)

    def as_f32(w):
        return _f32_from_bits(_u32(w))

    # Results are stored into int32 arrays, so the twins return the word as a signed int.
    def f32_bits(x):
        return _signed(_bits_from_f32(x))

    def pack_f16x2(lo, hi):
        return _signed(_f16_bits_rn(lo) | (_f16_bits_rn(hi) << 16))

    def pack_bf16x2(lo, hi):
        return _signed(_bf16_bits_rne(lo) | (_bf16_bits_rne(hi) << 16))

    def fmix32(h):
        h = int(h) & 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return np.uint32(h ^ (h >> 16))

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _i32, _i16, _i64, _f32 = ir.IntType(32), ir.IntType(16), ir.IntType(64), ir.FloatType()

    def _word_pointer(context, builder, arrty, arr, index):
        """Address of element ``index`` of a 1-D array (no bounds or wraparound handling)."""
        ary = context.make_array(arrty)(context, builder, value=arr)
        return builder.gep(ary.data, [index])

    def _ld_v4(instruction: str, side_effect: bool):
        def ld(typingctx, words, i):
            if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype.bitwidth == 32):
                return None
            sig = types.UniTuple(types.uint32, 4)(words, types.intp)

            def codegen(context, builder, sig, args):
                ptr = _word_pointer(context, builder, sig.args[0], args[0], args[1])
                ptr = builder.bitcast(ptr, _i32.as_pointer())
                struct = ir.LiteralStructType([_i32] * 4)
                asm = ir.InlineAsm(ir.FunctionType(struct, [_i32.as_pointer()]),
                                   f"{instruction} {{$0, $1, $2, $3}}, [$4];", "=r,=r,=r,=r,l", side_effect=side_effect)
                ret = builder.call(asm, [ptr])
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, k) for k in range(4)])

            return sig, codegen
        return ld

    #: One 16-byte read-only load of words ``i .. i+3`` (``i`` a multiple of 4, 16-byte aligned base).
    ld_v4 = intrinsic(_ld_v4("ld.global.nc.v4.u32", side_effect=False))
    #: The same through the coherent path, kept after the barrier before it: for words this block itself wrote
    #: during the launch (the read-only path may only serve data that no thread changes while the kernel runs).
    ld_v4_coherent = intrinsic(_ld_v4("ld.global.v4.u32", side_effect=True))

    @intrinsic
    def st_v4(typingctx, words, i, a, b, c, d):
        """One 16-byte store of four 32-bit words at ``words[i]`` (``i`` a multiple of 4)."""
        if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype.bitwidth == 32):
            return None
        sig = types.void(words, types.intp, types.uint32, types.uint32, types.uint32, types.uint32)

        def codegen(context, builder, sig, args):
            ptr = _word_pointer(context, builder, sig.args[0], args[0], args[1])
            ptr = builder.bitcast(ptr, _i32.as_pointer())
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_i32.as_pointer()] + [_i32] * 4),
                               "st.global.v4.u32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r,~{memory}")
            builder.call(asm, [ptr, *args[2:]])
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def ld_v4_at(typingctx, address):
        """One 16-byte load from a raw global address (for kernels that walk a table of tensor pointers)."""
        sig = types.UniTuple(types.uint32, 4)(types.uint64)

        def codegen(context, builder, sig, args):
            struct = ir.LiteralStructType([_i32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(struct, [ir.IntType(64)]),
                               "ld.global.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", side_effect=True)
            ret = builder.call(asm, [args[0]])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, k) for k in range(4)])

        return sig, codegen

    @intrinsic
    def ld_v4_cg_at(typingctx, address):
        """One 16-byte load from a raw global address at L2, past this SM's L1 (words another block wrote)."""
        sig = types.UniTuple(types.uint32, 4)(types.uint64)

        def codegen(context, builder, sig, args):
            struct = ir.LiteralStructType([_i32] * 4)
            asm = ir.InlineAsm(ir.FunctionType(struct, [ir.IntType(64)]),
                               "ld.global.cg.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l,~{memory}",
                               side_effect=True)
            ret = builder.call(asm, [args[0]])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(ret, k) for k in range(4)])

        return sig, codegen

    @intrinsic
    def atomic_add_at(typingctx, address, value):
        """``atom.global.add.u32`` at a raw global byte address; returns the word's value before the add."""
        if not (isinstance(address, types.Integer) and isinstance(value, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.int64)
            val = context.cast(builder, args[1], sig.args[1], types.uint32)
            asm = ir.InlineAsm(ir.FunctionType(_i32, [_i64, _i32]), "atom.global.add.u32 $0, [$1], $2;",
                               "=r,l,r,~{memory}", side_effect=True)
            return builder.call(asm, [addr, val])

        return types.uint32(address, value), codegen

    @intrinsic
    def st_v4_at(typingctx, address, a, b, c, d):
        """One 16-byte store to a raw global address."""
        sig = types.void(types.uint64, types.uint32, types.uint32, types.uint32, types.uint32)

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ir.IntType(64)] + [_i32] * 4),
                               "st.global.v4.u32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r,~{memory}")
            builder.call(asm, list(args))
            return context.get_dummy_value()

        return sig, codegen

    # side_effect=True: a guarded load must never be hoisted above its guard
    @intrinsic
    def ld_i32_at(typingctx, address):
        """One 32-bit load through the read-only path at a raw global byte address."""
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.int64)
            asm = ir.InlineAsm(ir.FunctionType(_i32, [_i64]), "ld.global.nc.u32 $0, [$1];", "=r,l", side_effect=True)
            return builder.call(asm, [addr])

        return types.int32(address), codegen

    @intrinsic
    def ld_f32_cg(typingctx, values, i):
        """``values[i]`` of a 1-D float32 array, read at L2 past this SM's L1 (a value another block wrote)."""
        if not (isinstance(values, types.Array) and values.ndim == 1 and values.dtype == types.float32):
            return None
        sig = types.float32(values, types.intp)

        def codegen(context, builder, sig, args):
            ptr = _word_pointer(context, builder, sig.args[0], args[0], args[1])
            asm = ir.InlineAsm(ir.FunctionType(_f32, [_f32.as_pointer()]), "ld.global.cg.f32 $0, [$1];",
                               "=f,l,~{memory}", side_effect=True)
            return builder.call(asm, [ptr])

        return sig, codegen

    @intrinsic
    def ld_u16_at(typingctx, address):
        """One 16-bit load through the read-only path at a raw global byte address (2-byte aligned), zero-extended
        into the low half of a word (``lo_f16`` / ``lo_bf16`` widen it)."""
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            addr = context.cast(builder, args[0], sig.args[0], types.int64)
            asm = ir.InlineAsm(ir.FunctionType(_i16, [_i64]), "ld.global.nc.u16 $0, [$1];", "=h,l", side_effect=True)
            return builder.zext(builder.call(asm, [addr]), _i32)

        return types.int32(address), codegen

    @intrinsic
    def st_u32_at(typingctx, address, value):
        """One 32-bit store at a raw global byte address."""
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

    def _unary_u32_to_f32(build):
        @intrinsic
        def fn(typingctx, w):
            if not isinstance(w, types.Integer):
                return None
            sig = types.float32(types.uint32)

            def codegen(context, builder, sig, args):
                return build(builder, args[0])

            return sig, codegen

        return fn

    lo_f16 = _unary_u32_to_f32(lambda b, w: b.fpext(b.bitcast(b.trunc(w, _i16), ir.HalfType()), _f32))
    hi_f16 = _unary_u32_to_f32(
        lambda b, w: b.fpext(b.bitcast(b.trunc(b.lshr(w, ir.Constant(_i32, 16)), _i16), ir.HalfType()), _f32))
    lo_bf16 = _unary_u32_to_f32(lambda b, w: b.bitcast(b.shl(w, ir.Constant(_i32, 16)), _f32))
    hi_bf16 = _unary_u32_to_f32(lambda b, w: b.bitcast(b.and_(w, ir.Constant(_i32, 0xFFFF0000)), _f32))
    as_f32 = _unary_u32_to_f32(lambda b, w: b.bitcast(w, _f32))

    @intrinsic
    def f32_bits(typingctx, x):
        sig = types.uint32(types.float32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _i32)

        return sig, codegen

    def _pack(instruction):
        @intrinsic
        def fn(typingctx, lo, hi):
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, sig, args):
                # cvt.rn.{f16x2,bf16x2}.f32 d, a, b puts a in the upper half and b in the lower half.
                asm = ir.InlineAsm(ir.FunctionType(_i32, [_f32, _f32]), f"{instruction} $0, $1, $2;", "=r,f,f")
                return builder.call(asm, [args[1], args[0]])

            return sig, codegen

        return fn

    pack_f16x2 = _pack("cvt.rn.f16x2.f32")
    pack_bf16x2 = _pack("cvt.rn.bf16x2.f32")

    @intrinsic
    def fmix32(typingctx, h):
        """murmur3's 32-bit finaliser of the low 32 bits of an integer, in 32-bit arithmetic (Numba would widen
        every step to 64 bits: three instructions per multiply instead of one)."""
        if not isinstance(h, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            x = context.cast(builder, args[0], sig.args[0], types.uint32)  # the low 32 bits
            for op, k in (("shift", 16), ("mul", 0x85EBCA6B), ("shift", 13), ("mul", 0xC2B2AE35), ("shift", 16)):
                if op == "shift":
                    x = builder.xor(x, builder.lshr(x, ir.Constant(_i32, k)))
                else:
                    x = builder.mul(x, ir.Constant(_i32, k))
            return x

        return types.uint32(h), codegen


@cuda.jit(device=True, inline=True)
def ld_i64_at(address):
    """An int64 at a raw global byte address, as two 32-bit loads (little-endian: the low word first)."""
    low = ld_i32_at(address)
    high = ld_i32_at(address + 4)
    return (int64(high) << 32) | (int64(low) & 0xFFFFFFFF)
