"""Warp primitives for Numba's CUDA simulator, which has none.

The simulator runs each CUDA thread as a Python thread, so a warp shuffle becomes an exchange through a
per-warp buffer guarded by a ``threading.Barrier``: every lane writes its value, waits for the warp, reads its
partner's value. Two buffers alternate so a fast lane's next write cannot clobber a value a slow lane has not
read yet (to write again it must pass the next barrier, which the slow lane reaches only after reading).
Like hardware, all lanes of the warp must take part (no divergent shuffles); a stuck warp times out instead
of hanging the test run. The simulator's ``cuda.shared.array`` is made thread-safe too.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

_BARRIER_TIMEOUT_S = 120.0
_state_lock = threading.Lock()


class _Warp:
    def __init__(self, lanes: int):
        self.barrier = threading.Barrier(lanes, timeout=_BARRIER_TIMEOUT_S)
        self.buffers = ([None] * 32, [None] * 32)
        self.phase = [0] * 32


def _warp_of_current_thread():
    thread = threading.current_thread()
    manager = thread._manager  # the simulator's BlockManager: one per running block
    warp_id, lane = divmod(thread.thread_id, 32)
    with _state_lock:
        warps = manager.__dict__.setdefault("_shim_warps", {})
        warp = warps.get(warp_id)
        if warp is None:
            bx, by, bz = manager._block_dim
            threads = bx * by * bz
            warp = warps[warp_id] = _Warp(min(32, threads - 32 * warp_id))
    return warp, lane


def _exchange(value, source_lane_of):
    warp, lane = _warp_of_current_thread()
    buffer = warp.buffers[warp.phase[lane] & 1]
    warp.phase[lane] += 1
    buffer[lane] = value
    warp.barrier.wait()
    src = source_lane_of(lane)
    return buffer[src] if 0 <= src < warp.barrier.parties else value


def shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda lane: lane ^ lane_mask)


def shfl_sync(self, mask, value, src_lane):
    return _exchange(value, lambda lane: src_lane)


def shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane + delta if lane + delta < 32 else lane)


def syncwarp(self, mask=0xFFFFFFFF):
    _exchange(None, lambda lane: lane)


def _shared_array(self, shape, dtype, alignment=None):
    """The simulator's ``cuda.shared.array`` (one array per block and source line), made atomic: its lookup and
    insertion ran unlocked, so two threads of a block switched between them could each make their own array."""
    if shape == 0 or alignment is not None:
        return _simulator_shared_array(self, shape, dtype, alignment)
    from numba.np import numpy_support
    from numba.core import types

    frame = sys._getframe(1)
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with _state_lock:
        res = self._allocations.get(caller)
        if res is None:
            res = self._allocations[caller] = np.empty(
                shape, numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype)
    return res


_simulator_shared_array = None


def install() -> None:
    """Add the shims to the simulator's fake ``cuda`` module (idempotent; a no-op off the simulator)."""
    from pagedattention.kernels.runtime import simulator_enabled

    if not simulator_enabled():
        return
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    for fn in (shfl_xor_sync, shfl_sync, shfl_down_sync, syncwarp):
        if not hasattr(FakeCUDAModule, fn.__name__):
            setattr(FakeCUDAModule, fn.__name__, fn)
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    global _simulator_shared_array
    if _simulator_shared_array is None:
        _simulator_shared_array = FakeCUDAShared.array
        FakeCUDAShared.array = _shared_array
