"""Automatic prefix caching: full KV blocks found again by the tokens they hold and every token before them.

A block that is full never changes again (a sequence only writes its last, partial block, and copies a shared
one first), so once its K/V are computed any later request whose first tokens are the same may read it instead
of recomputing it. Each cached block is keyed by a chained hash::

    hash_i = xxh64(hash_{i-1} as 8 little-endian bytes  +  tokens of block i as int64 bytes),  hash_{-1} = 0

so equal hashes mean (up to collisions) equal prefixes. A lookup then confirms the tokens and that the block's
parent is the block matched just before it, so a collision can never hand out the wrong K/V.

Ownership: the cache holds one reference (``incref``) on every block it lists, besides those of the sequences
using it. A cached block whose only reference is the cache's belongs to nobody else and is *evictable*: it
keeps its K/V for a later hit until an allocation needs room, when the least recently used ones are released
first (``evict``). The cache cannot see sequences come and go, so their owner tells it: ``acquire`` after a
sequence takes references on matched blocks, ``release`` after a sequence drops its blocks. Evictable blocks
queue in the order they were released, the deepest block of a chain first, so a chain is evicted from its end
and its shared beginning lives longest; every operation costs O(blocks involved), never O(cache size).
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import xxhash

ROOT_HASH = 0  # the "parent hash" of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: its parent's hash and its token ids."""
    h = xxhash.xxh64()
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass(eq=False)
class CachedBlock:
    block_id: int
    block_hash: int
    token_ids: tuple[int, ...]
    parent: CachedBlock | None  # the entry of the block before it (None for a first block)


@dataclass
class PrefixCacheStats:
    """Lookups so far: ``queries`` lookups of ``query_tokens`` tokens in all, of which ``hit_tokens`` were
    found in ``hit_blocks`` cached blocks."""
    queries: int = 0
    query_tokens: int = 0
    hit_blocks: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up tokens whose K/V were found in the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixCache:
    """Full KV blocks by chained hash, over a block allocator with ``incref``, ``free`` and ``ref_count``."""

    def __init__(self, allocator, block_size: int):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator = allocator
        self.block_size = block_size
        self._by_hash: dict[int, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks only the cache holds, LRU first
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._by_block)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._by_block

    @property
    def cached_block_ids(self) -> list[int]:
        return list(self._by_block)

    @property
    def evictable_block_ids(self) -> list[int]:
        """Cached blocks that no sequence holds, least recently used first."""
        return list(self._evictable)

    @property
    def num_evictable(self) -> int:
        """Cached blocks that no sequence holds: ``evict`` can turn each into a free block."""
        return len(self._evictable)

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached run of ``token_ids``'s full blocks.

        At most ``(len(token_ids) - 1) // block_size`` blocks: the last token is always left to compute,
        since its logits are what the step needs. A caller that keeps the blocks increfs them (e.g. through
        ``add_sequence(..., shared_blocks=...)``) and then calls ``acquire``.
        """
        token_ids = _as_token_list(token_ids)
        matched: list[CachedBlock] = []
        parent, parent_hash = None, ROOT_HASH
        for i in range(max(len(token_ids) - 1, 0) // self.block_size):
            block = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            entry = self._by_hash.get(hash_block(parent_hash, block))
            if entry is None or entry.token_ids != block or entry.parent is not parent:
                break
            matched.append(entry)
            parent, parent_hash = entry, entry.block_hash
        self.stats.queries += 1
        self.stats.query_tokens += len(token_ids)
        self.stats.hit_blocks += len(matched)
        self.stats.hit_tokens += len(matched) * self.block_size
        return [e.block_id for e in matched]

    def acquire(self, block_ids: Iterable[int]) -> None:
        """A sequence now holds these blocks (after its incref): cached ones stop being evictable."""
        for b in block_ids:
            self._evictable.pop(b, None)

    def release(self, block_ids: Sequence[int]) -> None:
        """A sequence dropped these blocks (its block table, after the free): cached blocks that only the
        cache holds now become evictable, as the most recently used, the table's end before its beginning."""
        for b in reversed(block_ids):
            if b in self._by_block and self.allocator.ref_count(b) == 1:
                self._evictable[b] = None
                self._evictable.move_to_end(b)

    def insert(self, token_ids: Sequence[int], block_table: Sequence[int]) -> int:
        """Cache the full blocks of a sequence whose K/V for ``token_ids`` are computed in ``block_table``.

        The sequence must hold every block of ``block_table`` that ``token_ids`` fills. When an equal block is
        already cached under another id (two equal prompts computed side by side) the cached one stays and the
        chain goes on through it. Returns the number of blocks newly cached (each gets the cache's reference).
        """
        token_ids = _as_token_list(token_ids)
        num_full = len(token_ids) // self.block_size
        if len(block_table) < num_full:
            raise ValueError(f"block_table holds {len(block_table)} blocks but token_ids fill {num_full} "
                             f"blocks of {self.block_size}")
        for block_id in block_table[:num_full]:
            if self.allocator.ref_count(block_id) < 1:  # raises for an id out of range
                raise ValueError(f"block {block_id} of block_table is free: only blocks in use can be cached")
        num_new = 0
        parent, parent_hash = None, ROOT_HASH
        for i in range(num_full):
            block = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = hash_block(parent_hash, block)
            entry = self._by_hash.get(block_hash)
            if entry is not None and (entry.token_ids != block or entry.parent is not parent):
                self._drop([entry])  # stale (its parent was evicted) or a collision: unreachable anyway
                entry = None
            if entry is None:
                block_id = operator.index(block_table[i])
                if block_id in self._by_block:  # cached under another prefix: cannot be, but never list a block twice
                    break
                entry = CachedBlock(block_id, block_hash, block, parent)
                self.allocator.incref([block_id])  # the cache's own reference
                self._by_hash[block_hash] = entry
                self._by_block[block_id] = entry
                num_new += 1
            parent, parent_hash = entry, block_hash
        return num_new

    def evict(self, num_blocks: int, keep: Iterable[int] = ()) -> list[int]:
        """Release up to ``num_blocks`` evictable blocks (never those in ``keep``), least recently used first;
        returns the ids that became free."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        keep = set(keep)
        victims = []
        for block_id in self._evictable:
            if len(victims) == num_blocks:
                break
            if block_id not in keep:
                victims.append(self._by_block[block_id])
        return self._drop(victims)

    def clear(self) -> list[int]:
        """Forget every block, dropping the cache's references; returns the ids that became free."""
        return self._drop(list(self._by_block.values()))

    def _drop(self, entries: list[CachedBlock]) -> list[int]:
        for e in entries:
            del self._by_block[e.block_id]
            self._evictable.pop(e.block_id, None)
            if self._by_hash.get(e.block_hash) is e:
                del self._by_hash[e.block_hash]
        return self.allocator.free([e.block_id for e in entries]) if entries else []


def _as_token_list(token_ids) -> list[int]:
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
        raise TypeError(f"token_ids must be a sequence of ints, got {type(token_ids).__name__}")
    return [operator.index(t) for t in token_ids]
