"""PagedAttentionManager: block tables, sharing, copy-on-write and the data they point at.

The state machine adds, appends to, forks and frees sequences of random sizes on a tiny CPU cache and writes
random values at every slot it is handed, keeping a shadow copy of each sequence's K/V. Reading every
sequence back through its slots must give its shadow: a fork reads as its parent until one of them writes,
and a write through one sequence never shows in another.
"""
import math
import random
from collections import Counter

import numpy as np

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from pagedattention.memory import InvalidBlockError, OutOfBlocksError, PagedAttentionManager

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 1, 2


def make_manager(num_blocks=8, block_size=4):
    return PagedAttentionManager(num_blocks, block_size, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM,
                                 dtype=torch.float32, device="cpu")


def write(manager, slots):
    """Random K/V at ``slots`` in every layer; returns them as ``[len(slots), layers, 2, heads, dim]``."""
    values = torch.randn(len(slots), NUM_LAYERS, 2, NUM_KV_HEADS, HEAD_DIM)
    index = torch.tensor(slots, dtype=torch.long)
    for layer in range(NUM_LAYERS):
        manager.key_caches[layer].view(-1, NUM_KV_HEADS, HEAD_DIM)[index] = values[:, layer, 0]
        manager.value_caches[layer].view(-1, NUM_KV_HEADS, HEAD_DIM)[index] = values[:, layer, 1]
    return values


def read(manager, slots):
    index = torch.tensor(slots, dtype=torch.long)
    per_layer = [torch.stack([manager.key_caches[layer].view(-1, NUM_KV_HEADS, HEAD_DIM)[index],
                              manager.value_caches[layer].view(-1, NUM_KV_HEADS, HEAD_DIM)[index]], dim=1)
                 for layer in range(NUM_LAYERS)]
    return torch.stack(per_layer, dim=1)


def state(manager):
    """Everything observable, to check that a failed call changed nothing."""
    return (manager.num_free_blocks, [manager.block_manager.ref_count(b) for b in range(manager.num_blocks)],
            {s: (manager.block_table(s), manager.context_len(s)) for s in manager})


class ManagerMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4]))
    def create(self, num_blocks, block_size):
        self.manager = make_manager(num_blocks, block_size)
        self.bs = block_size
        self.shadow: dict[int, torch.Tensor] = {}  # seq -> [context_len, layers, 2, heads, dim]
        self.next_id = 0

    def new_id(self):
        self.next_id += 1
        return self.next_id

    def holders(self, block):
        return [s for s in self.shadow if block in self.manager.block_table(s)]

    @rule(target=seqs, num_tokens=st.integers(0, 12), data=st.data())
    def add(self, num_tokens, data):
        m, seq = self.manager, self.new_id()
        # Optionally begin with full blocks of an existing sequence, as a cached prefix would.
        donors = [s for s in self.shadow if self.shadow[s].shape[0] >= self.bs]
        donor, shared = None, []
        if donors and data.draw(st.booleans()):
            donor = data.draw(st.sampled_from(donors))
            max_shared = min(self.shadow[donor].shape[0], num_tokens) // self.bs
            shared = m.block_table(donor)[: data.draw(st.integers(0, max_shared))]
        needed = math.ceil(num_tokens / self.bs) - len(shared)
        before = state(m)
        if needed > m.num_free_blocks:
            with pytest.raises(OutOfBlocksError):
                m.add_sequence(seq, num_tokens, shared_blocks=shared)
            assert state(m) == before
            return seq  # an id that was never added
        m.add_sequence(seq, num_tokens, shared_blocks=shared)
        assert m.block_table(seq)[: len(shared)] == shared
        num_cached = len(shared) * self.bs
        cached = self.shadow[donor][:num_cached] if shared else torch.empty(0, NUM_LAYERS, 2, NUM_KV_HEADS, HEAD_DIM)
        # the prompt's remaining tokens are written by prefill, through the slot mapping
        slots = m.slot_mapping_tensor([(seq, num_cached, num_tokens)]).tolist()
        self.check_private(seq, slots)
        self.shadow[seq] = torch.cat([cached, write(m, slots)])
        return seq

    @rule(seq=seqs, n=st.integers(1, 6), one_at_a_time=st.booleans())
    def append(self, seq, n, one_at_a_time):
        m = self.manager
        if seq not in self.shadow:
            with pytest.raises(KeyError, match=repr(seq)):
                m.append_token(seq)
            return
        ctx = m.context_len(seq)
        table = m.block_table(seq)
        copy_last = ctx % self.bs != 0 and len(self.holders(table[-1])) > 1
        needed = math.ceil((ctx + n) / self.bs) - len(table) + copy_last
        assert m.blocks_needed_to_append(seq) == (1 if ctx % self.bs == 0 else int(copy_last))
        before = state(m)
        if needed > m.num_free_blocks and not one_at_a_time:
            with pytest.raises(OutOfBlocksError):
                m.append_tokens(seq, n)
            assert state(m) == before
            return
        slots = []
        for _ in range(n if one_at_a_time else 1):
            if m.blocks_needed_to_append(seq) > m.num_free_blocks:
                before = state(m)
                with pytest.raises(OutOfBlocksError):
                    m.append_token(seq)
                assert state(m) == before
                break
            slots += [m.append_token(seq)] if one_at_a_time else m.append_tokens(seq, n)
        assert m.context_len(seq) == ctx + len(slots)
        assert slots == [m.slot(seq, p) for p in range(ctx, ctx + len(slots))]
        self.check_private(seq, slots)
        self.shadow[seq] = torch.cat([self.shadow[seq], write(m, slots)])

    @rule(data=st.data())
    def append_batch(self, data):
        """``append_token_batch`` does what one ``append_token`` after another would, all or nothing."""
        m = self.manager
        live = sorted(self.shadow)
        batch = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
        owners = Counter(b for s in self.shadow for b in m.block_table(s))
        needed = 0  # one block per full last block, one per copy while another owner is left
        for s in batch:
            if m.context_len(s) % self.bs == 0:
                needed += 1
            elif owners[m.block_table(s)[-1]] > 1:
                needed += 1
                owners[m.block_table(s)[-1]] -= 1
        before = state(m)
        contexts = [m.context_len(s) for s in batch]
        if needed > m.num_free_blocks:
            with pytest.raises(OutOfBlocksError):
                m.append_token_batch(batch)
            assert state(m) == before
            return
        m.append_token_batch(batch)
        assert m.num_free_blocks == before[0] - needed
        assert [m.context_len(s) for s in batch] == [ctx + 1 for ctx in contexts]
        slots = [m.slot(s, ctx) for s, ctx in zip(batch, contexts)]
        for s, slot in zip(batch, slots):
            self.check_private(s, [slot])
            self.shadow[s] = torch.cat([self.shadow[s], write(m, [slot])])

    def check_private(self, seq, slots):
        """A slot handed out for writing never lies in a block another sequence also holds."""
        for slot in slots:
            block = slot // self.bs
            assert block in self.manager.block_table(seq)
            assert [s for s in self.holders(block) if s != seq] == []

    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        m, child = self.manager, self.new_id()
        if parent not in self.shadow:
            with pytest.raises(KeyError):
                m.fork_sequence(parent, child)
            return child
        free_before = m.num_free_blocks
        m.fork_sequence(parent, child)
        assert m.block_table(child) == m.block_table(parent)
        assert m.num_free_blocks == free_before
        self.shadow[child] = self.shadow[parent].clone()
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq):
        m = self.manager
        if seq not in self.shadow:
            with pytest.raises(KeyError):
                m.free_sequence(seq)
            return
        m.free_sequence(seq)
        del self.shadow[seq]
        assert seq not in m and not m.has_sequence(seq)

    @rule(seq=seqs, other=seqs)
    def existing_ids_are_refused(self, seq, other):
        m = self.manager
        if seq in self.shadow:
            before = state(m)
            with pytest.raises(ValueError, match="already exists"):
                m.add_sequence(seq, 1)
            if other in self.shadow:
                with pytest.raises(ValueError, match="already exists"):
                    m.fork_sequence(other, seq)
            assert state(m) == before

    @invariant()
    def ref_counts_are_table_memberships(self):
        m = self.manager
        assert sorted(m) == sorted(self.shadow) and len(m) == len(self.shadow)
        held = Counter(b for s in self.shadow for b in m.block_table(s))
        assert [m.block_manager.ref_count(b) for b in range(m.num_blocks)] == [held[b] for b in range(m.num_blocks)]
        assert m.num_free_blocks + len(held) == m.num_blocks
        for s in self.shadow:
            assert len(m.block_table(s)) == math.ceil(m.context_len(s) / self.bs)
        assert m.num_table_entries == sum(len(m.block_table(s)) for s in self.shadow)
        assert all(m.block_manager.ref_count(b) == 1 for b in m.block_manager.private)

    @invariant()
    def block_tables_array_holds_each_table(self):
        m = self.manager
        ids = sorted(self.shadow)
        width = max((len(m.block_table(s)) for s in ids), default=0) + 1
        out = np.full((len(ids) + 1, width), -7, dtype=np.int32)
        m.block_tables_array(ids, out)
        for row, s in enumerate(ids):
            table = m.block_table(s)
            assert out[row, :len(table)].tolist() == table and (out[row, len(table):] == -7).all()
        assert (out[len(ids)] == -7).all()
        padded = m.block_tables_array(ids)  # a new array, as wide as the longest table, 0 after each
        assert padded.dtype == np.int32 and padded.shape == (len(ids), width - 1)
        assert padded.tolist() == [m.block_table(s) + [0] * (width - 1 - len(m.block_table(s))) for s in ids]

    @invariant()
    def every_sequence_reads_back_its_own_data(self):
        m = self.manager
        for s, values in self.shadow.items():
            assert m.context_len(s) == values.shape[0]
            slots = m.slot_mapping_tensor([(s, 0, values.shape[0])]).tolist()
            assert torch.equal(read(m, slots), values)

    @invariant()
    def memory_stats_match_a_direct_count(self):
        m = self.manager
        tables = {s: m.block_table(s) for s in self.shadow}
        distinct = {b for t in tables.values() for b in t}
        slots = {m.slot(s, p) for s in self.shadow for p in range(m.context_len(s))}
        bytes_per_block = sum(c[0].numel() * c.element_size() for c in m.key_caches + m.value_caches)
        stats = m.memory_stats()
        assert stats.bytes_per_block == bytes_per_block
        assert stats.num_blocks == m.num_blocks
        assert stats.blocks_in_use == len(distinct)
        assert stats.tokens_stored == len(slots)
        assert stats.slots_held == len(distinct) * self.bs
        assert stats.utilization == (len(slots) / stats.slots_held if distinct else 0.0)
        assert stats.bytes_saved_by_sharing == (sum(map(len, tables.values())) - len(distinct)) * bytes_per_block

    def teardown(self):
        if hasattr(self, "manager"):
            for s in list(self.shadow):
                self.manager.free_sequence(s)
            assert self.manager.num_free_blocks == self.manager.num_blocks
            assert len(self.manager) == 0 and list(self.manager) == []


TestManagerMachine = ManagerMachine.TestCase


# --- unit tests


def test_fork_then_append_copies_the_shared_last_block():
    m = make_manager(num_blocks=8, block_size=4)
    m.add_sequence("parent", 6)
    m.fork_sequence("parent", "child")
    shared_last = m.block_table("parent")[-1]
    write(m, [m.slot("parent", p) for p in range(6)])
    before = read(m, [m.slot("parent", p) for p in range(6)])

    slot = m.append_token("child")
    table = m.block_table("child")
    assert table[0] == m.block_table("parent")[0] and table[1] != shared_last
    assert slot == table[1] * 4 + 2
    assert m.block_manager.ref_count(shared_last) == 1
    assert torch.equal(read(m, [m.slot("child", p) for p in range(6)]), before)  # the copy holds the same data
    assert m.blocks_needed_to_append("parent") == 0  # the parent is again the only owner of its last block


def test_add_sequence_with_shared_blocks():
    m = make_manager(num_blocks=6, block_size=2)
    m.add_sequence("a", 5)
    prefix = m.block_table("a")[:2]
    m.add_sequence("b", 7, shared_blocks=prefix)
    assert m.block_table("b")[:2] == prefix and len(m.block_table("b")) == 4
    assert [m.block_manager.ref_count(b) for b in prefix] == [2, 2]
    assert m.memory_stats().bytes_saved_by_sharing == 2 * m.memory_stats().bytes_per_block


def test_out_of_blocks_changes_nothing():
    m = make_manager(num_blocks=4, block_size=2)
    m.add_sequence("a", 5)
    m.fork_sequence("a", "b")
    shared = m.block_table("a")[:1]
    before = state(m)
    with pytest.raises(OutOfBlocksError) as info:
        m.add_sequence("c", 7, shared_blocks=shared)  # 4 blocks, 1 shared: 3 needed, 1 free
    assert (info.value.needed, info.value.free) == (3, 1)
    with pytest.raises(OutOfBlocksError):
        m.append_tokens("a", 4)  # copy of the shared last block + 2 new blocks
    assert state(m) == before
    assert m.can_add(2) and not m.can_add(3) and m.can_add(6, num_shared_blocks=2)


def test_errors_leave_state_unchanged():
    m = make_manager(num_blocks=6, block_size=2)
    m.add_sequence(0, 3)
    m.add_sequence("x", 2)
    before = state(m)
    cases = [
        (KeyError, lambda: m.append_token(1)),
        (KeyError, lambda: m.append_tokens("y", 2)),
        (KeyError, lambda: m.fork_sequence(1, 2)),
        (KeyError, lambda: m.free_sequence(1)),
        (KeyError, lambda: m.block_table(1)),
        (KeyError, lambda: m.context_len(1)),
        (KeyError, lambda: m.slot(1, 0)),
        (KeyError, lambda: m.blocks_needed_to_append(1)),
        (KeyError, lambda: m.block_tables_tensor([0, 1])),
        (KeyError, lambda: m.context_lens_tensor([1])),
        (KeyError, lambda: m.slot_mapping_tensor([(1, 0, 1)])),
        (ValueError, lambda: m.add_sequence(0, 1)),
        (ValueError, lambda: m.fork_sequence("x", 0)),
        (ValueError, lambda: m.add_sequence(1, -1)),
        (ValueError, lambda: m.add_sequence(1, 2, shared_blocks=m.block_table(0))),  # 2 shared > 1 block
        (ValueError, lambda: m.add_sequence(1, 4, shared_blocks=[0, 0])),
        (ValueError, lambda: m.append_tokens(0, -1)),
        (ValueError, lambda: m.slot(0, 3)),
        (ValueError, lambda: m.slot(0, -1)),
        (ValueError, lambda: m.slot_mapping_tensor([(0, 2, 4)])),
        (ValueError, lambda: m.slot_mapping_tensor([(0, 2, 1)])),
        (ValueError, lambda: m.block_tables_tensor([0], max_blocks=1)),
        (InvalidBlockError, lambda: m.add_sequence(1, 4, shared_blocks=[5])),  # a free block
        (InvalidBlockError, lambda: m.add_sequence(1, 4, shared_blocks=[99])),
        (TypeError, lambda: m.add_sequence(1, 2.0)),
        (TypeError, lambda: m.add_sequence(1, True)),
        (TypeError, lambda: m.add_sequence([1], 2)),  # unhashable id
        (TypeError, lambda: m.add_sequence(1, 2, shared_blocks=[1.5])),
        (TypeError, lambda: m.append_tokens(0, "2")),
        (TypeError, lambda: m.slot(0, 1.0)),
        (TypeError, lambda: m.can_add(None)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert state(m) == before


def test_unknown_sequence_error_names_it():
    m = make_manager()
    with pytest.raises(KeyError, match="'missing'"):
        m.append_token("missing")


def test_batch_tensors():
    m = make_manager(num_blocks=8, block_size=4)
    m.add_sequence("a", 9)
    m.add_sequence("b", 3)
    tables = m.block_tables_tensor(["b", "a"])
    assert tables.dtype == torch.int32 and tables.tolist() == [m.block_table("b") + [0, 0], m.block_table("a")]
    assert m.block_tables_tensor(["a"], max_blocks=5).shape == (1, 5)
    assert m.block_tables_tensor([]).shape == (0, 0)
    lens = m.context_lens_tensor(["a", "b"])
    assert lens.dtype == torch.int32 and lens.tolist() == [9, 3]
    slots = m.slot_mapping_tensor([("a", 3, 9), ("b", 2, 3), ("b", 1, 1)])
    assert slots.dtype == torch.int64
    assert slots.tolist() == [m.slot("a", p) for p in range(3, 9)] + [m.slot("b", 2)]
    table = m.block_table("a")
    assert m.slot("a", 5) == table[1] * 4 + 1


@pytest.mark.parametrize("kwargs,error", [
    (dict(num_blocks=0), ValueError), (dict(block_size=-1), ValueError), (dict(num_layers=0), ValueError),
    (dict(num_kv_heads=1.0), TypeError), (dict(head_dim=True), TypeError), (dict(dtype=torch.int32), TypeError),
    (dict(dtype="float16"), TypeError), (dict(device="nonsense"), ValueError),
])
def test_constructor_checks(kwargs, error):
    args = dict(num_blocks=4, block_size=2, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                device="cpu") | kwargs
    with pytest.raises(error):
        PagedAttentionManager(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        PagedAttentionManager(4, 2, 1, 1, 2, device="cuda")


def test_cache_shapes():
    m = PagedAttentionManager(5, 4, 3, 2, 8, dtype=torch.bfloat16, device="cpu")
    assert len(m.key_caches) == len(m.value_caches) == 3
    for cache in m.key_caches + m.value_caches:
        assert cache.shape == (5, 4, 2, 8) and cache.dtype == torch.bfloat16
    assert len({c.data_ptr() for c in m.key_caches + m.value_caches}) == 6
    assert m.memory_stats().bytes_per_block == 2 * 3 * 4 * 2 * 8 * 2


def test_append_token_batch_matches_one_append_at_a_time():
    """Same history on two managers; a batch append on one, single appends on the other: same blocks, same
    slots, same ref counts, including copy-on-write of last blocks that forks and an outside owner share."""
    rng = random.Random(0)
    for _ in range(40):
        batched, single = make_manager(num_blocks=48, block_size=4), make_manager(num_blocks=48, block_size=4)
        live, outside = [], []
        for step in range(30):
            op = rng.random()
            if op < 0.3 or not live:
                tokens = rng.randint(0, 9)
                if batched.can_add(tokens):
                    for m in (batched, single):
                        m.add_sequence(step, tokens)
                    live.append(step)
            elif op < 0.5:
                parent = rng.choice(live)
                for m in (batched, single):
                    m.fork_sequence(parent, step)
                live.append(step)
            elif op < 0.6:
                table = batched.block_table(rng.choice(live))
                if table:  # a reference the manager does not know of, e.g. the prefix cache's
                    block = rng.choice(table)
                    for m in (batched, single):
                        m.block_manager.incref([block])
                    outside.append(block)
            elif op < 0.7 and outside:
                block = outside.pop(rng.randrange(len(outside)))
                for m in (batched, single):
                    m.block_manager.free([block])
            elif op < 0.8:
                seq = live.pop(rng.randrange(len(live)))
                for m in (batched, single):
                    m.free_sequence(seq)
            else:
                batch = rng.sample(live, rng.randint(0, len(live)))
                needed = 0
                for s in batch:  # what appending one at a time will take
                    needed += single.blocks_needed_to_append(s)
                    if single.blocks_needed_to_append(s) <= single.num_free_blocks:
                        single.append_token(s)
                if needed > batched.num_free_blocks:
                    before = state(batched)
                    with pytest.raises(OutOfBlocksError):
                        batched.append_token_batch(batch)
                    assert state(batched) == before
                    break  # the two managers part ways here
                batched.append_token_batch(batch)
                assert [batched.slot(s, batched.context_len(s) - 1) for s in batch] == \
                    [single.slot(s, single.context_len(s) - 1) for s in batch]
            assert state(batched) == state(single)
            assert batched.num_table_entries == sum(len(batched.block_table(s)) for s in batched)


def test_append_token_batch_errors_leave_state_unchanged():
    m = make_manager()
    m.add_sequence("a", 3)
    m.add_sequence("b", 4)
    before = state(m)
    with pytest.raises(KeyError, match="'missing'"):
        m.append_token_batch(["a", "missing"])
    with pytest.raises(ValueError, match="twice"):
        m.append_token_batch(["a", "b", "a"])
    assert state(m) == before
    m.append_token_batch([])
    assert state(m) == before
