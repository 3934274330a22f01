"""The block allocator in plain Python: the readable specification of ``BlockManager``.

The C++ ``BlockManager`` must behave exactly like this class (same ids handed out, same errors,
same state after every call); the tests drive both side by side.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

from .errors import InvalidBlockError, OutOfBlocksError
from .block_manager import check_count, check_ids, check_num_blocks


class ReferenceBlockManager:
    """``num_blocks`` blocks, each free (ref count 0) or owned by ``ref_count`` owners.

    Free ids wait in a FIFO queue: freed blocks join the back, allocation takes from the front, so the
    block free the longest is reused first. Every call is all or nothing.
    """

    def __init__(self, num_blocks: int):
        check_num_blocks(num_blocks)
        self._ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self._ref_counts)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free blocks, each now with ref count 1."""
        check_count(n)
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free))
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def incref(self, ids: Iterable[int]) -> None:
        """One more owner for each entry of ``ids`` (repeats count twice); every block must be in use."""
        ids = check_ids(ids)
        for i in ids:
            self._check_in_use(i)
        for i in ids:
            self._ref_counts[i] += 1

    def free(self, ids: Iterable[int]) -> list[int]:
        """One owner fewer for each entry of ``ids``; returns the blocks that became free, in order.

        A block named k times must have at least k owners.
        """
        ids = check_ids(ids)
        counts = {}
        for i in ids:
            self._check_in_use(i)
            counts[i] = counts.get(i, 0) + 1
            if counts[i] > self._ref_counts[i]:
                raise InvalidBlockError(f"block {i} is named {counts[i]} times but has "
                                        f"{self._ref_counts[i]} reference(s)")
        freed = []
        for i in ids:
            self._ref_counts[i] -= 1
            if self._ref_counts[i] == 0:
                freed.append(i)
        self._free.extend(freed)
        return freed

    def ref_count(self, block_id: int) -> int:
        """Number of owners of ``block_id`` (0 = free)."""
        (block_id,) = check_ids([block_id])
        self._check_range(block_id)
        return self._ref_counts[block_id]

    def close(self) -> None:
        """Nothing to release; here so both managers can be used the same way."""

    def _check_range(self, i: int) -> None:
        if not 0 <= i < len(self._ref_counts):
            raise InvalidBlockError(f"block id {i} is out of range [0, {len(self._ref_counts)})")

    def _check_in_use(self, i: int) -> None:
        self._check_range(i)
        if self._ref_counts[i] == 0:
            raise InvalidBlockError(f"block {i} is free")
