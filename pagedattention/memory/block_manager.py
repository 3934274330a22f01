"""``BlockManager``: the C++ block allocator (csrc/block_manager.cpp) loaded with ctypes.

It hands out KV-cache block ids and counts each block's owners (see the comment at the top of the
C++ file). Each method is one ctypes call that carries a whole batch of ids as one int32 array
(an ``array.array``, filled in C from the Python list, passed by address); ctypes releases the GIL
during the call, and the C++ side takes a mutex, so threads may share one manager.
``ReferenceBlockManager`` (reference.py) is the same thing in plain Python.

Closing. ``bm_destroy`` frees the C++ object, mutex included, so it must never run while another thread
is inside a call: that thread would wait forever on (or corrupt) freed memory. Every call therefore
registers itself in ``_in_flight`` before it touches the handle; ``close()`` first refuses new calls,
then waits until the calls in flight have returned, and only then destroys the object.
"""
from __future__ import annotations

import array
import ctypes
import functools
import operator
import threading
from pathlib import Path
from typing import Iterable

from .errors import BlockManagerError, InvalidBlockError, OutOfBlocksError

LIBRARY_PATH = Path(__file__).with_name("libblockmanager.so")

# Return codes of the C API (block_manager.h).
_OK, _OUT_OF_BLOCKS, _INVALID_BLOCK, _INVALID_ARGUMENT, _REF_OVERFLOW = 0, -1, -2, -3, -4
_INT32_MAX = 2**31 - 1

_i32 = ctypes.c_int32
_i32_p = ctypes.POINTER(ctypes.c_int32)
_ptr = ctypes.c_void_p  # an int32 array, passed as the address of an array.array("i")
assert array.array("i").itemsize == 4


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    if not LIBRARY_PATH.exists():
        raise RuntimeError(f"{LIBRARY_PATH.name} is not built: run `make -C {LIBRARY_PATH.parent}` "
                           "(or `pip install -e .` in the repository)")
    lib = ctypes.CDLL(str(LIBRARY_PATH))
    signatures = {  # name: (restype, argtypes)
        "bm_create": (ctypes.c_void_p, [_i32]),
        "bm_destroy": (None, [ctypes.c_void_p]),
        "bm_allocate": (ctypes.c_int, [ctypes.c_void_p, _i32, _ptr, _i32_p]),
        "bm_incref": (ctypes.c_int, [ctypes.c_void_p, _ptr, _i32]),
        "bm_decref": (ctypes.c_int, [ctypes.c_void_p, _ptr, _i32, _ptr, _i32_p]),
        "bm_ref_count": (_i32, [ctypes.c_void_p, _i32]),
        "bm_num_free": (_i32, [ctypes.c_void_p]),
        "bm_num_blocks": (_i32, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


# Argument checks, shared with ReferenceBlockManager so both reject the same inputs the same way.

def _as_int(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(x).__name__}") from None


def check_num_blocks(num_blocks) -> int:
    num_blocks = _as_int(num_blocks, "num_blocks")
    if not 0 < num_blocks <= _INT32_MAX:
        raise ValueError(f"num_blocks must be in [1, {_INT32_MAX}], got {num_blocks}")
    return num_blocks


def check_count(n) -> int:
    n = _as_int(n, "n")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def check_ids(ids) -> list[int]:
    """``ids`` as a list of Python ints; TypeError for anything that is not an iterable of ints."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"ids must be an iterable of ints, got {type(ids).__name__}")
    ids = list(ids)
    if set(map(type, ids)) <= {int}:  # the common case, without a Python-level call per id
        return ids
    return [_as_int(i, "block id") for i in ids]


def _int32_array(ids: list[int]) -> array.array | None:
    """``ids`` as a C int32 array, or None if one does not fit in 32 bits (so it is out of range)."""
    try:
        return array.array("i", ids)
    except OverflowError:
        return None


def _address(buf: array.array) -> int:
    return buf.buffer_info()[0]


class BlockManager:
    """Thread-safe block allocator over ``num_blocks`` KV-cache blocks (ids ``0..num_blocks-1``)."""

    def __init__(self, num_blocks: int):
        num_blocks = check_num_blocks(num_blocks)
        self._lib = _lib()
        self._lock = threading.Lock()  # guards the three fields below
        self._idle = threading.Condition(self._lock)  # notified when the last call in flight leaves a closed manager
        self._in_flight = 0  # calls between _enter() and _leave(): they may be using the handle
        self._closed = False  # set by close(); from then on _enter() refuses
        self._handle = self._lib.bm_create(num_blocks)
        if not self._handle:
            raise MemoryError(f"cannot create a block manager of {num_blocks} blocks")

    # --- queries

    @property
    def num_blocks(self) -> int:
        handle = self._enter()
        try:
            return self._lib.bm_num_blocks(handle)
        finally:
            self._leave()

    @property
    def num_free_blocks(self) -> int:
        handle = self._enter()
        try:
            return self._lib.bm_num_free(handle)
        finally:
            self._leave()

    def ref_count(self, block_id: int) -> int:
        """Number of owners of ``block_id`` (0 = free)."""
        block_id = _as_int(block_id, "block id")
        handle = self._enter()
        try:
            in_int32 = -_INT32_MAX - 1 <= block_id <= _INT32_MAX
            count = self._lib.bm_ref_count(handle, block_id) if in_int32 else -1
            if count < 0:
                raise InvalidBlockError(self._describe_invalid(handle, [block_id]))
            return count
        finally:
            self._leave()

    # --- updates (each all or nothing)

    def allocate(self, n: int) -> list[int]:
        """``n`` free blocks, each now with ref count 1; ``OutOfBlocksError`` if fewer are free."""
        n = check_count(n)
        handle = self._enter()
        try:
            if n > _INT32_MAX:
                raise OutOfBlocksError(n, self._lib.bm_num_free(handle))
            out, num_free = array.array("i", bytes(4 * n)), _i32()
            rc = self._lib.bm_allocate(handle, n, _address(out), ctypes.byref(num_free))
            if rc == _OUT_OF_BLOCKS:
                raise OutOfBlocksError(n, num_free.value)
            self._raise_for(handle, rc, [], dropping=False)
            return out.tolist()
        finally:
            self._leave()

    def incref(self, ids: Iterable[int]) -> None:
        """One more owner for each entry of ``ids`` (repeats count twice); every block must be in use."""
        ids = check_ids(ids)
        buf = _int32_array(ids)
        handle = self._enter()
        try:
            rc = _INVALID_BLOCK if buf is None else self._lib.bm_incref(handle, _address(buf), len(buf))
            self._raise_for(handle, rc, ids, dropping=False)
        finally:
            self._leave()

    def free(self, ids: Iterable[int]) -> list[int]:
        """One owner fewer for each entry of ``ids``; returns the blocks that became free, in order.

        A block named k times must have at least k owners.
        """
        ids = check_ids(ids)
        buf = _int32_array(ids)
        freed, num_freed = array.array("i", bytes(4 * len(ids))), _i32()
        handle = self._enter()
        try:
            if buf is None:
                rc = _INVALID_BLOCK
            else:
                rc = self._lib.bm_decref(handle, _address(buf), len(buf), _address(freed), ctypes.byref(num_freed))
            self._raise_for(handle, rc, ids, dropping=True)
            return freed[: num_freed.value].tolist()
        finally:
            self._leave()

    # --- lifetime

    def close(self) -> None:
        """Refuse new calls, wait for the calls in flight to return, then destroy the C++ manager.

        Later calls raise ``ValueError``; closing twice is harmless.
        """
        idle = getattr(self, "_idle", None)
        if idle is None:  # __init__ failed before the manager existed
            return
        with idle:
            self._closed = True
            idle.wait_for(lambda: self._in_flight == 0)
            handle, self._handle = self._handle, None
        if handle:
            self._lib.bm_destroy(handle)

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        try:
            return f"BlockManager(num_blocks={self.num_blocks}, num_free_blocks={self.num_free_blocks})"
        except ValueError:
            return "BlockManager(closed)"

    # --- helpers

    def _enter(self):
        """The live handle, counted as in use until the matching ``_leave()``; ValueError once closed."""
        with self._lock:
            if self._closed:
                raise ValueError("this BlockManager is closed")
            self._in_flight += 1
            return self._handle

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._closed and self._in_flight == 0:
                self._idle.notify_all()

    def _raise_for(self, handle, rc: int, ids: list[int], dropping: bool) -> None:
        if rc == _OK:
            return
        if rc == _INVALID_BLOCK:
            raise InvalidBlockError(self._describe_invalid(handle, ids, dropping))
        if rc == _REF_OVERFLOW:
            raise OverflowError("a block's ref count would exceed 2**31 - 1")
        raise BlockManagerError(f"block manager call failed with code {rc}")

    def _describe_invalid(self, handle, ids: list[int], dropping: bool = False) -> str:
        """The first reason, in batch order, why ``ids`` is invalid (for the message of a failed call)."""
        num_blocks, counts = self._lib.bm_num_blocks(handle), {}
        for i in ids:
            if not 0 <= i < num_blocks:
                return f"block id {i} is out of range [0, {num_blocks})"
            counts[i] = counts.get(i, 0) + 1
            ref_count = self._lib.bm_ref_count(handle, i)
            if ref_count == 0:
                return f"block {i} is free"
            if dropping and counts[i] > ref_count:
                return f"block {i} is named {counts[i]} times but has {ref_count} reference(s)"
        return f"invalid block in {ids}"
