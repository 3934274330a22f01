"""``PagedAttentionManager``: the paged KV caches, one block table per sequence, and copy-on-write.

Each layer has a key and a value cache ``[num_blocks, block_size, num_kv_heads, head_dim]``. A sequence's
token at position p lives in block ``block_table[p // block_size]`` at offset ``p % block_size``, i.e. at
slot ``block_table[p // block_size] * block_size + p % block_size``; ``len(block_table)`` is always
``ceil(context_len / block_size)``.

Blocks are shared, never copied eagerly: ``fork_sequence`` and ``add_sequence(shared_blocks=...)`` add a
reference to existing blocks (the ``BlockManager`` counts them). Only the last block of a sequence is ever
written, so sharing is safe until a sequence appends into a last block that someone else also holds: then
that block is copied first (copy-on-write) and the sequence continues in its private copy.

Every method either succeeds or raises leaving every structure unchanged.
"""
from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Hashable, Iterable

import numpy as np
import torch

from .block_manager import BlockManager, check_ids
from .errors import OutOfBlocksError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _to_tensor(values: array.array, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over the array's memory (it keeps the array alive)."""
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.empty(0, dtype=dtype)


class _OwnedBlockManager(BlockManager):
    """A ``BlockManager`` that also knows, without a ctypes call, a set of blocks whose ref count is 1.

    ``private`` holds blocks handed out by ``allocate`` (count 1) until anything touches their count again:
    an ``incref`` (a fork, a shared prefix, the prefix cache's reference) or a ``free`` drops them from the
    set. So ``b in private`` implies ``ref_count(b) == 1`` exactly, whoever shares blocks through this object;
    a block not in the set may still have count 1 (ask ``ref_count``).
    """

    def __init__(self, num_blocks: int):
        super().__init__(num_blocks)
        self.private: set[int] = set()

    def allocate(self, n: int) -> list[int]:
        blocks = super().allocate(n)
        self.private.update(blocks)
        return blocks

    def incref(self, ids: Iterable[int]) -> None:
        ids = check_ids(ids)
        super().incref(ids)
        self.private.difference_update(ids)

    def free(self, ids: Iterable[int]) -> list[int]:
        ids = check_ids(ids)
        freed = super().free(ids)
        self.private.difference_update(ids)
        return freed


@dataclass(frozen=True)
class MemoryStats:
    bytes_per_block: int         # K and V of one block in all layers
    num_blocks: int
    blocks_in_use: int           # blocks with at least one owner
    tokens_stored: int           # distinct cache slots holding a token of some sequence
    slots_held: int              # blocks_in_use * block_size
    utilization: float           # tokens_stored / slots_held (0 when nothing is held)
    bytes_saved_by_sharing: int  # what giving every sequence its own copy of shared blocks would add


class PagedAttentionManager:
    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cuda", copy_blocks=None):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _check_int(value, name, minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a torch floating-point dtype, got {dtype!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch device such as 'cuda' or 'cpu', got {device!r}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but CUDA is not available (pass device='cpu')")
        if copy_blocks is not None and not callable(copy_blocks):
            raise TypeError(f"copy_blocks must be callable (key_caches, value_caches, src_to_dst), got {copy_blocks!r}")
        self.block_size = block_size
        self.num_layers = num_layers
        # copy-on-write: the engine passes its attention backend's op; standalone, the kernel on CUDA
        self._copy_blocks_op = copy_blocks
        self.dtype = dtype
        self.device = device
        self.block_manager = _OwnedBlockManager(num_blocks)
        self._num_blocks = num_blocks  # fixed: no ctypes call to ask
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        # int32 arrays rather than lists: block_tables_tensor then copies whole rows with memcpy
        self._block_tables: dict[Hashable, array.array] = {}
        self._context_lens: dict[Hashable, int] = {}
        self.num_table_entries = 0  # sum of len(block_table) over the sequences: blocks held without sharing

    # --- sequences

    def add_sequence(self, seq_id: Hashable, num_tokens: int, shared_blocks: Iterable[int] = ()) -> None:
        """Reserve slots for tokens ``0..num_tokens-1`` of a new sequence.

        ``shared_blocks`` (e.g. a cached prefix) already hold the first tokens: they get one more owner and
        begin the block table; only the remaining blocks are allocated.
        """
        if seq_id in self._block_tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        _check_int(num_tokens, "num_tokens", minimum=0)
        shared = check_ids(shared_blocks)
        num_blocks = cdiv(num_tokens, self.block_size)
        if len(shared) > num_blocks:
            raise ValueError(f"{len(shared)} shared_blocks given but {num_tokens} tokens fill only {num_blocks}")
        if len(set(shared)) != len(shared):
            raise ValueError(f"shared_blocks lists a block twice: {shared}")
        self.block_manager.incref(shared)  # InvalidBlockError (nothing changed) if one is free or out of range
        try:
            own = self.block_manager.allocate(num_blocks - len(shared))
        except OutOfBlocksError:
            self.block_manager.free(shared)  # back to their previous counts; none becomes free
            raise
        self._block_tables[seq_id] = array.array("i", shared + own)
        self._context_lens[seq_id] = num_tokens
        self.num_table_entries += num_blocks

    def append_token(self, seq_id: Hashable) -> int:
        """Reserve the next position of ``seq_id``; returns its slot."""
        return self.append_tokens(seq_id, 1)[0]

    def append_tokens(self, seq_id: Hashable, n: int) -> list[int]:
        """Reserve the next ``n`` positions of ``seq_id`` (all or nothing); returns their slots.

        A last block that is full gets a successor; a last block shared with another owner is copied first.
        """
        table = self._table(seq_id)
        _check_int(n, "n", minimum=0)
        start = self._context_lens[seq_id]
        copy_last = n > 0 and self._last_block_is_shared(table, start)
        num_new = cdiv(start + n, self.block_size) - len(table) + copy_last
        new_blocks = self.block_manager.allocate(num_new) if num_new else []
        if copy_last:
            shared, private = table[-1], new_blocks.pop(0)
            try:
                self._copy_blocks([(shared, private)])
            except BaseException:
                self.block_manager.free([private] + new_blocks)
                raise
            self.block_manager.free([shared])  # drops our reference only: the other owners keep it
            table[-1] = private
        table.extend(new_blocks)
        self.num_table_entries += len(new_blocks)
        self._context_lens[seq_id] = start + n
        return self._slots(table, start, start + n)

    def append_token_batch(self, seq_ids: list[Hashable]) -> None:
        """``append_token`` for each of ``seq_ids`` (distinct), all or nothing. The new token of ``s`` goes to
        ``slot(s, context_len(s) - 1)`` (the engine's runner computes the step's slots from the block tables).

        A decode step's allocations in one pass. The common case, a last block that is ours alone and not
        full, costs no allocator call (``block_manager.private`` knows the block's ref count is 1); the
        sequences that need a new block or a copy-on-write share one ``allocate`` and, for the copies, one
        block copy and one ``free``. Blocks go to sequences in ``seq_ids`` order, exactly as one
        ``append_token`` after another would hand them out. ``OutOfBlocksError`` (nothing changed) if fewer
        blocks are free than the batch needs.
        """
        bs, private = self.block_size, self.block_manager.private
        lens = self._context_lens
        tables = self._tables(seq_ids)  # lookups at C speed: this runs over every row of every decode step
        ctxs = list(map(lens.__getitem__, seq_ids))
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids lists a sequence twice")
        needs = []  # (row, copy-on-write?) of the sequences that need a block
        owners: dict[int, int] = {}  # shared last block -> its ref count as the appends so far leave it
        for i, ctx in enumerate(ctxs):
            if ctx % bs == 0:
                needs.append((i, False))
                continue
            last = tables[i][-1]
            if last in private:
                continue
            count = owners[last] if last in owners else self.block_manager.ref_count(last)
            if count > 1:  # each copy drops one owner: when all hold it, the last one keeps it
                needs.append((i, True))
                owners[last] = count - 1
            elif last not in owners:
                private.add(last)  # count 1 seen now, and only this object changes it
        new_blocks = self.block_manager.allocate(len(needs)) if needs else []
        copies = [(tables[i][-1], b) for (i, cow), b in zip(needs, new_blocks) if cow]
        if copies:
            try:
                self._copy_blocks(copies)
            except BaseException:
                self.block_manager.free(new_blocks)
                raise
            self.block_manager.free([shared for shared, _ in copies])  # our reference only
        for (i, cow), b in zip(needs, new_blocks):
            if cow:
                tables[i][-1] = b
            else:
                tables[i].append(b)
        self.num_table_entries += len(needs) - len(copies)
        lens.update(zip(seq_ids, map((1).__add__, ctxs)))

    def fork_sequence(self, parent_id: Hashable, child_id: Hashable) -> None:
        """``child_id`` becomes a copy of ``parent_id`` sharing all its blocks; nothing is allocated."""
        table = self._table(parent_id)
        if child_id in self._block_tables:
            raise ValueError(f"sequence {child_id!r} already exists")
        self.block_manager.incref(table)
        self._block_tables[child_id] = array.array("i", table)
        self._context_lens[child_id] = self._context_lens[parent_id]
        self.num_table_entries += len(table)

    def free_sequence(self, seq_id: Hashable) -> None:
        """Drop ``seq_id``; blocks it was the last owner of become free."""
        table = self._table(seq_id)
        self.block_manager.free(table)
        del self._block_tables[seq_id], self._context_lens[seq_id]
        self.num_table_entries -= len(table)

    # --- queries

    def has_sequence(self, seq_id: Hashable) -> bool:
        return seq_id in self._block_tables

    __contains__ = has_sequence

    def __len__(self) -> int:
        return len(self._block_tables)

    def __iter__(self):
        """The ids of the sequences held, in the order they were added."""
        return iter(list(self._block_tables))

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._table(seq_id).tolist()

    def context_len(self, seq_id: Hashable) -> int:
        self._table(seq_id)
        return self._context_lens[seq_id]

    def slot(self, seq_id: Hashable, position: int) -> int:
        table = self._table(seq_id)
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position must be an int, got {type(position).__name__}")
        self._check_range(seq_id, position, position + 1)
        return table[position // self.block_size] * self.block_size + position % self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def blocks_needed_to_append(self, seq_id: Hashable) -> int:
        """Blocks ``append_token(seq_id)`` would allocate now: 1 for a new block or a copy-on-write, else 0."""
        table = self._table(seq_id)
        ctx = self._context_lens[seq_id]
        return int(ctx % self.block_size == 0 or self._last_block_is_shared(table, ctx))

    def can_add(self, num_tokens: int, num_shared_blocks: int = 0) -> bool:
        """Whether ``add_sequence`` of ``num_tokens`` tokens (``num_shared_blocks`` of them cached) fits now."""
        _check_int(num_tokens, "num_tokens", minimum=0)
        _check_int(num_shared_blocks, "num_shared_blocks", minimum=0)
        return cdiv(num_tokens, self.block_size) - num_shared_blocks <= self.num_free_blocks

    # --- batch tensors for the kernels (on the caches' device)

    def block_tables_tensor(self, seq_ids: Iterable[Hashable], max_blocks: int | None = None) -> torch.Tensor:
        """int32 ``[len(seq_ids), max_blocks]``, padded with 0 (default width: the longest table)."""
        tables = self._tables(seq_ids)
        longest = max(map(len, tables), default=0)
        if max_blocks is None:
            max_blocks = longest
        elif _check_int(max_blocks, "max_blocks", minimum=0) < longest:
            raise ValueError(f"max_blocks={max_blocks} is shorter than the longest block table ({longest})")
        flat = array.array("i", bytes(4 * len(tables) * max_blocks))  # zeros, then each row's table
        for i, t in enumerate(tables):
            flat[i * max_blocks : i * max_blocks + len(t)] = t
        return _to_tensor(flat, torch.int32).view(len(tables), max_blocks).to(self.device)

    def block_tables_array(self, seq_ids: Iterable[Hashable], out: np.ndarray | None = None) -> np.ndarray:
        """int32 block tables of ``seq_ids`` as numpy rows: into the first rows of ``out`` (C-contiguous, wide
        enough; entries past a table's end keep what they held), or a new array as wide as the longest table,
        padded with 0.

        One join of the tables' buffers and one masked assignment, rather than a numpy call per row.
        """
        tables = self._tables(seq_ids)
        lens = np.array(list(map(len, tables)), dtype=np.int64)
        longest = int(lens.max()) if len(tables) else 0
        if out is None:
            out = np.zeros((len(tables), longest), dtype=np.int32)
        elif not out.flags.c_contiguous or out.dtype != np.int32 or out.ndim != 2:
            raise ValueError(f"out must be a C-contiguous 2-D int32 array, got {out.dtype} {out.shape}")
        elif longest > out.shape[1] or len(tables) > out.shape[0]:
            raise ValueError(f"out of shape {out.shape} cannot hold {len(tables)} tables of up to {longest} blocks")
        rows = out[:len(tables)]
        # a boolean mask takes its elements in row-major order: table 0's entries, then table 1's, ...
        rows[np.arange(rows.shape[1]) < lens[:, None]] = np.frombuffer(b"".join(tables), dtype=np.int32)
        return rows

    def context_lens_tensor(self, seq_ids: Iterable[Hashable]) -> torch.Tensor:
        """int32 ``[len(seq_ids)]``."""
        lens = array.array("i", [self._context_lens[s] if s in self._context_lens else self.context_len(s)
                                 for s in seq_ids])
        return _to_tensor(lens, torch.int32).to(self.device)

    def slot_mapping_tensor(self, ranges: Iterable[tuple[Hashable, int, int]]) -> torch.Tensor:
        """int64 slots of positions ``start..end-1`` of each ``(seq_id, start, end)``, concatenated."""
        slots = array.array("q")
        for seq_id, start, end in ranges:
            table = self._table(seq_id)
            self._check_range(seq_id, start, end)
            slots.extend(self._slots(table, start, end))
        return _to_tensor(slots, torch.int64).to(self.device)

    # --- statistics

    def memory_stats(self) -> MemoryStats:
        bs = self.block_size
        filled: dict[int, int] = {}  # block -> tokens in it (its most advanced owner's count)
        table_entries = 0
        for seq_id, table in self._block_tables.items():
            ctx = self._context_lens[seq_id]
            table_entries += len(table)
            for j, block in enumerate(table):
                filled[block] = max(filled.get(block, 0), min(bs, ctx - j * bs))
        blocks_in_use = self.num_blocks - self.num_free_blocks
        tokens_stored = sum(filled.values())
        slots_held = blocks_in_use * bs
        return MemoryStats(
            bytes_per_block=self.bytes_per_block,
            num_blocks=self.num_blocks,
            blocks_in_use=blocks_in_use,
            tokens_stored=tokens_stored,
            slots_held=slots_held,
            utilization=tokens_stored / slots_held if slots_held else 0.0,
            bytes_saved_by_sharing=(table_entries - len(filled)) * self.bytes_per_block,
        )

    # --- helpers

    def _tables(self, seq_ids: Iterable[Hashable]) -> list[array.array]:
        """``_table`` of each of ``seq_ids``, in one pass."""
        try:
            return list(map(self._block_tables.__getitem__, seq_ids))
        except KeyError as e:
            raise KeyError(f"unknown sequence {e.args[0]!r}") from None

    def _table(self, seq_id: Hashable) -> array.array:
        try:
            return self._block_tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _check_range(self, seq_id: Hashable, start, end) -> None:
        if type(start) is not int or type(end) is not int:  # bools excluded
            raise TypeError(f"positions must be ints, got start={start!r}, end={end!r}")
        ctx = self._context_lens[seq_id]
        if not 0 <= start <= end <= ctx:
            raise ValueError(f"positions [{start}, {end}) are outside sequence {seq_id!r} of {ctx} tokens")

    def _last_block_is_shared(self, table: array.array, context_len: int) -> bool:
        """Whether the next token would land in a block that another owner also holds."""
        return (context_len % self.block_size != 0 and table[-1] not in self.block_manager.private
                and self.block_manager.ref_count(table[-1]) > 1)

    def _slots(self, table: array.array, start: int, end: int) -> list[int]:
        """Slots of positions ``start..end-1``, one ``range`` per block rather than one step per token."""
        bs, slots, pos = self.block_size, [], start
        while pos < end:
            j = pos // bs
            stop = min(end, (j + 1) * bs)
            shift = (table[j] - j) * bs  # slot = table[j] * bs + (pos - j * bs)
            slots.extend(range(pos + shift, stop + shift))
            pos = stop
        return slots

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer's K and V cache."""
        src_to_dst = torch.tensor(pairs, dtype=torch.int64, device=self.device)
        if self._copy_blocks_op is None:
            from ..kernels import copy_blocks, reference_copy_blocks
            self._copy_blocks_op = copy_blocks if self.device.type == "cuda" else reference_copy_blocks
        self._copy_blocks_op(self.key_caches, self.value_caches, src_to_dst)
