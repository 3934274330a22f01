"""Exceptions of the block managers (shared by the C++-backed one and the reference)."""
from __future__ import annotations


class BlockManagerError(Exception):
    """Base class of the errors a block manager raises for a request it cannot serve."""


class OutOfBlocksError(BlockManagerError):
    """``needed`` blocks were requested while only ``free`` were free; nothing was allocated."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"out of KV-cache blocks: {needed} needed, {free} free")
        self.needed = needed
        self.free = free

    def __reduce__(self):  # keep the two attributes through pickling (e.g. across processes)
        return type(self), (self.needed, self.free)


class InvalidBlockError(BlockManagerError, ValueError):
    """A block id out of range, or a reference added to / dropped from a block that is free."""
