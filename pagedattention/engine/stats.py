"""What sharing saved: prefix-cache hits and the KV blocks that forks and cached prefixes did not duplicate.

After each step's allocations the engine records the blocks its sequences hold (each block once, however many
sequences share it) and the blocks they would hold with no sharing at all (the sum of their block-table
lengths). The PagedAttention paper's "memory saving" of parallel sampling and beam search is
``1 - held / unshared`` over a run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    bytes_per_block: int
    num_steps: int = 0
    block_steps_held: int = 0       # sum over steps of the distinct blocks the sequences hold
    block_steps_unshared: int = 0   # sum over steps of what they would hold without sharing
    peak_blocks_held: int = 0
    peak_blocks_unshared: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0

    def record_step(self, blocks_held: int, blocks_unshared: int) -> None:
        self.num_steps += 1
        self.block_steps_held += blocks_held
        self.block_steps_unshared += blocks_unshared
        self.peak_blocks_held = max(self.peak_blocks_held, blocks_held)
        self.peak_blocks_unshared = max(self.peak_blocks_unshared, blocks_unshared)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of prompt tokens looked up in the prefix cache whose K/V were found there."""
        return self.prefix_cache_hit_tokens / self.prefix_cache_query_tokens if self.prefix_cache_query_tokens else 0.0

    @property
    def mean_blocks_held(self) -> float:
        return self.block_steps_held / self.num_steps if self.num_steps else 0.0

    @property
    def mean_blocks_unshared(self) -> float:
        return self.block_steps_unshared / self.num_steps if self.num_steps else 0.0

    @property
    def mean_blocks_shared(self) -> float:
        """Blocks per step that sharing saved (held once instead of once per sequence)."""
        return (self.block_steps_unshared - self.block_steps_held) / self.num_steps if self.num_steps else 0.0

    @property
    def mean_bytes_saved_by_sharing(self) -> float:
        return self.mean_blocks_shared * self.bytes_per_block

    @property
    def kv_memory_saving(self) -> float:
        """Share of the KV memory that sharing saved over the run: 1 - held / unshared."""
        if not self.block_steps_unshared:
            return 0.0
        return 1.0 - self.block_steps_held / self.block_steps_unshared

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        for name in ("prefix_cache_hit_rate", "mean_blocks_held", "mean_blocks_unshared", "mean_blocks_shared",
                     "mean_bytes_saved_by_sharing", "kv_memory_saving"):
            out[name] = getattr(self, name)
        return out
