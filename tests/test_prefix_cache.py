"""PrefixCache over the real (C++) BlockManager: what is found, who holds which reference, what is evicted."""
import random

import numpy as np
import pytest
import xxhash
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedattention.engine import prefix_cache as pc
from pagedattention.engine.prefix_cache import PrefixCache, hash_block
from pagedattention.memory import BlockManager, InvalidBlockError

BS = 4  # block size


def make(num_blocks=32):
    allocator = BlockManager(num_blocks)
    return allocator, PrefixCache(allocator, BS)


def run_sequence(allocator, cache, tokens):
    """What the engine does for a new request: reuse the cached prefix, allocate the rest, cache the full
    blocks once computed. Returns the block table (the sequence holds one reference on each block)."""
    shared = cache.match(tokens)
    allocator.incref(shared)
    cache.acquire(shared)
    table = shared + allocator.allocate(-(-len(tokens) // BS) - len(shared))
    cache.insert(tokens, table)
    return table


def end_sequence(allocator, cache, table):
    """What the engine does when a sequence ends: drop its references, then tell the cache."""
    allocator.free(table)
    cache.release(table)


def test_hash_is_chained_xxh64_of_parent_hash_and_int64_tokens():
    tokens = [3, 1, 4, 1]
    first = xxhash.xxh64(b"\0" * 8 + np.array(tokens, dtype=np.int64).tobytes()).intdigest()
    assert hash_block(0, tokens) == first
    second = xxhash.xxh64(first.to_bytes(8, "little") + np.array([5, 9], dtype=np.int64).tobytes()).intdigest()
    assert hash_block(first, [5, 9]) == second
    assert hash_block(first, [5, 9]) != hash_block(hash_block(0, [3, 1, 4, 2]), [5, 9])


def test_match_finds_the_longest_cached_run_of_full_blocks():
    allocator, cache = make()
    tokens = list(range(100, 111))  # 2 full blocks + 3 tokens
    table = run_sequence(allocator, cache, tokens)
    assert sorted(cache.cached_block_ids) == sorted(table[:2])  # the partial third block is not cached
    assert cache.match(tokens + [7, 7]) == table[:2]
    assert cache.match(tokens[:4] + [0] * 8) == table[:1]   # diverges in block 1
    assert cache.match([0] + tokens[1:]) == []                # diverges in block 0
    assert cache.match(tokens[:3]) == []                      # shorter than a block


def test_match_always_leaves_the_last_token_to_compute():
    allocator, cache = make()
    tokens = list(range(8))  # exactly 2 blocks, both cached
    table = run_sequence(allocator, cache, tokens)
    assert len(cache) == 2
    assert cache.match(tokens) == table[:1]        # (8 - 1) // 4 = 1
    assert cache.match(tokens + [9]) == table[:2]  # (9 - 1) // 4 = 2


def test_a_block_is_found_only_after_the_same_prefix():
    allocator, cache = make()
    a = list(range(8)) + [50]
    run_sequence(allocator, cache, a)
    # same second block after a different first block: a different hash, so no hit
    b = [9, 9, 9, 9] + a[4:]
    assert cache.match(b) == []


def test_the_cache_holds_one_reference_and_keeps_blocks_after_their_sequence_ends():
    allocator, cache = make(16)
    tokens = list(range(10))
    table = run_sequence(allocator, cache, tokens)
    assert [allocator.ref_count(b) for b in table] == [2, 2, 1]
    assert cache.num_evictable == 0  # the sequence still uses them
    end_sequence(allocator, cache, table)
    assert [allocator.ref_count(b) for b in table] == [1, 1, 0]
    assert cache.num_evictable == 2
    assert allocator.num_free_blocks == 16 - 2
    # a second request reuses them and holds its own references
    table2 = run_sequence(allocator, cache, tokens + [1])
    assert table2[:2] == table[:2]
    assert cache.num_evictable == 0
    end_sequence(allocator, cache, table2)
    assert sorted(cache.clear()) == sorted(table[:2])
    assert allocator.num_free_blocks == 16
    assert all(allocator.ref_count(b) == 0 for b in range(16))


def test_eviction_is_least_recently_used_and_never_touches_blocks_in_use():
    allocator, cache = make(32)
    old = run_sequence(allocator, cache, [1] * 9)       # blocks cached first
    young = run_sequence(allocator, cache, [2] * 9)     # cached later
    busy = run_sequence(allocator, cache, [3] * 9)      # still running
    end_sequence(allocator, cache, old)
    end_sequence(allocator, cache, young)
    assert cache.num_evictable == 4
    end_sequence(allocator, cache, run_sequence(allocator, cache, [1] * 9))  # `old` is used again: now recent
    assert sorted(cache.evict(2)) == sorted(young[:2])
    assert cache.match([2] * 9) == []
    assert sorted(cache.evict(2, keep=[old[0]])) == [old[1]]
    assert sorted(cache.evict(10)) == [old[0]]  # nothing else is evictable
    assert cache.evict(5) == []
    assert sorted(cache.cached_block_ids) == sorted(busy[:2])
    assert [allocator.ref_count(b) for b in busy] == [2, 2, 1]


def test_a_chain_is_evicted_from_its_end():
    allocator, cache = make(32)
    table = run_sequence(allocator, cache, list(range(13)))  # 3 full blocks + 1 token
    end_sequence(allocator, cache, table)
    assert cache.evict(1) == [table[2]]
    assert cache.evict(1) == [table[1]]
    assert cache.match(list(range(13))) == table[:1]


def test_a_block_whose_parent_was_evicted_is_never_matched_through_a_new_parent():
    allocator, cache = make(32)
    tokens = list(range(9))
    first = run_sequence(allocator, cache, tokens)
    end_sequence(allocator, cache, first[:1] + first[2:])  # block 1 stays in use; block 0 is only the cache's
    assert cache.evict(1) == [first[0]]
    second = run_sequence(allocator, cache, tokens)  # recomputes block 0, reuses nothing stale
    assert second[0] != first[0]
    assert cache.match(tokens) == second[:2]
    for t in (first[1:2], second):
        end_sequence(allocator, cache, t)
    cache.clear()
    assert allocator.num_free_blocks == 32


def test_two_equal_prompts_computed_side_by_side_keep_one_cached_copy():
    allocator, cache = make(32)
    tokens = list(range(9))
    a = allocator.allocate(3)
    b = allocator.allocate(3)
    assert cache.insert(tokens, a) == 2
    assert cache.insert(tokens, b) == 0
    assert cache.match(tokens) == a[:2]
    assert [allocator.ref_count(x) for x in a + b] == [2, 2, 1, 1, 1, 1]
    end_sequence(allocator, cache, a + b)
    cache.clear()
    assert allocator.num_free_blocks == 32


def test_hash_collisions_never_return_wrong_blocks(monkeypatch):
    # the hash of block i is i + 1 whatever its tokens: every sequence collides with every other
    monkeypatch.setattr(pc, "hash_block", lambda parent, tokens: parent + 1)
    allocator, cache = make(32)
    a = run_sequence(allocator, cache, [1] * 4 + [5] * 4 + [0])
    assert cache.match([2] * 9) == []                          # tokens differ
    assert cache.match([1] * 4 + [5] * 4 + [0]) == a[:2]
    b = run_sequence(allocator, cache, [2] * 4 + [0])          # replaces a's first block in the cache
    # block 1 of the query has a's tokens and a's hash, but follows b's block 0: not a's block 1
    assert cache.match([2] * 4 + [5] * 4 + [0]) == b[:1]
    assert cache.match([1] * 4 + [5] * 4 + [0]) == []
    end_sequence(allocator, cache, a)
    end_sequence(allocator, cache, b)
    cache.clear()
    assert allocator.num_free_blocks == 32


def test_with_one_hash_for_everything_only_confirmed_blocks_are_returned(monkeypatch):
    monkeypatch.setattr(pc, "hash_block", lambda parent, tokens: 42)
    allocator, cache = make(32)
    a = run_sequence(allocator, cache, [1] * 9)
    assert cache.match([2] * 9) == []
    assert cache.match([1] * 9) in (a[:0], a[:1])  # whatever survived, it is a's
    end_sequence(allocator, cache, a)
    cache.clear()
    assert allocator.num_free_blocks == 32


def test_statistics_count_looked_up_and_found_tokens():
    allocator, cache = make()
    tokens = list(range(20))
    run_sequence(allocator, cache, tokens)           # 20 tokens looked up, none found
    cache.match(tokens[:10])                         # 2 blocks found
    cache.match([99] * 6)                            # none
    s = cache.stats
    assert (s.queries, s.query_tokens, s.hit_blocks, s.hit_tokens) == (3, 36, 2, 8)
    assert s.hit_rate == pytest.approx(8 / 36)


def test_bad_input_is_rejected_and_changes_nothing():
    allocator, cache = make(16)
    table = run_sequence(allocator, cache, list(range(9)))
    before = (cache.cached_block_ids, allocator.num_free_blocks, [allocator.ref_count(b) for b in range(16)])
    with pytest.raises(ValueError, match="block_table"):
        cache.insert(list(range(12)), table[:2])
    free_block = next(b for b in range(16) if allocator.ref_count(b) == 0)
    with pytest.raises(ValueError, match="free"):
        cache.insert([7] * 8, [table[0], free_block])
    with pytest.raises(InvalidBlockError):
        cache.insert([7] * 4, [99])
    with pytest.raises(TypeError):
        cache.match("abc")
    with pytest.raises(TypeError):
        cache.insert([1.5] * 4, table)
    with pytest.raises(ValueError, match="num_blocks"):
        cache.evict(-1)
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(allocator, 0)
    assert before == (cache.cached_block_ids, allocator.num_free_blocks,
                      [allocator.ref_count(b) for b in range(16)])


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random requests sharing prefixes over a small pool, a weak hash (many collisions) and evictions.

    Every block carries in a shadow the full token prefix it was computed for; a matched block must hold
    exactly the query's prefix, and every block's ref count must equal its holders (sequences + the cache).
    """

    NUM_BLOCKS = 24

    def __init__(self):
        super().__init__()
        self.allocator = BlockManager(self.NUM_BLOCKS)
        self.cache = PrefixCache(self.allocator, BS)
        self.contents = {}   # block id -> the tokens from position 0 to the end of that block when computed
        self.running = []    # (tokens, block table)

    @rule(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 20))
    def new_request(self, seed, length):
        rng = random.Random(seed)
        if self.running and rng.random() < 0.7:  # share a prefix with a running or an earlier request
            base = rng.choice(self.running)[0]
            tokens = base[: rng.randint(0, len(base))]
        else:
            tokens = []
        tokens = tokens + [rng.randrange(3) for _ in range(max(length - len(tokens), 0))]
        tokens = tokens[:length] or [0]
        shared = self.cache.match(tokens)
        for i, b in enumerate(shared):
            assert self.contents[b] == tuple(tokens[: (i + 1) * BS])
        needed = -(-len(tokens) // BS) - len(shared)
        self.allocator.incref(shared)  # hold them before any eviction
        self.cache.acquire(shared)
        if self.allocator.num_free_blocks < needed:
            self.cache.evict(needed - self.allocator.num_free_blocks)
        if self.allocator.num_free_blocks < needed:
            self.allocator.free(shared)
            self.cache.release(shared)
            return
        table = shared + self.allocator.allocate(needed)
        for i in range(len(shared), len(table)):
            self.contents[table[i]] = tuple(tokens[: (i + 1) * BS])
        self.cache.insert(tokens, table)
        self.running.append((tokens, table))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        tokens, table = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.cache.insert(tokens, table)  # as the engine does when a sequence ends
        self.allocator.free(table)
        self.cache.release(table)

    @rule(n=st.integers(0, 6))
    def evict(self, n):
        evictable = self.cache.num_evictable
        freed = self.cache.evict(n)
        assert len(freed) == min(n, evictable)

    @invariant()
    def evictable_blocks_are_the_cached_blocks_only_the_cache_holds(self):
        only_cache = {b for b in self.cache.cached_block_ids if self.allocator.ref_count(b) == 1}
        assert set(self.cache.evictable_block_ids) == only_cache
        assert self.cache.num_evictable == len(only_cache)

    @invariant()
    def ref_counts_equal_holders(self):
        holders = [0] * self.NUM_BLOCKS
        for _, table in self.running:
            for b in table:
                holders[b] += 1
        for b in self.cache.cached_block_ids:
            holders[b] += 1
        assert holders == [self.allocator.ref_count(b) for b in range(self.NUM_BLOCKS)]

    def teardown(self):
        for _, table in self.running:
            self.allocator.free(table)
        self.cache.clear()
        assert self.allocator.num_free_blocks == self.NUM_BLOCKS


class TestPrefixCacheMachine(PrefixCacheMachine.TestCase):
    settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@pytest.fixture
def weak_hash(monkeypatch):
    monkeypatch.setattr(pc, "hash_block", lambda parent, tokens: (parent + sum(tokens)) % 5)


def test_state_machine_with_a_weak_hash(weak_hash):
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(PrefixCacheMachine, settings=settings(max_examples=60, stateful_step_count=30,
                                                                    deadline=None))
