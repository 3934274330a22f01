"""The C++ BlockManager behaves exactly like ReferenceBlockManager, the plain-Python specification.

A Hypothesis state machine drives both side by side with random valid and invalid calls and compares every
result, every exception and the whole observable state; unit tests pin down each error path.
"""
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedattention.memory import (
    BlockManager,
    BlockManagerError,
    InvalidBlockError,
    OutOfBlocksError,
    ReferenceBlockManager,
)
from pagedattention.memory import block_manager as block_manager_module

MANAGERS = [BlockManager, ReferenceBlockManager]


def outcome(call):
    """What a call did: its result, or its exception's type, message and attributes."""
    try:
        return ("ok", call())
    except Exception as e:  # noqa: BLE001 - the point is to compare any exception
        return ("raised", type(e), str(e), getattr(e, "needed", None), getattr(e, "free", None))


class SideBySide(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12))
    def create(self, num_blocks):
        self.num_blocks = num_blocks
        self.cpp = BlockManager(num_blocks)
        self.ref = ReferenceBlockManager(num_blocks)

    def used_ids(self):
        return [i for i in range(self.num_blocks) if self.ref.ref_count(i) > 0]

    def draw_ids(self, data):
        """Mostly blocks in use (repeats allowed), sometimes free or out-of-range ids or a non-int."""
        used = self.used_ids()
        any_id = st.integers(-2, self.num_blocks + 1)
        one_id = st.one_of(st.sampled_from(used), any_id) if used else any_id
        ids = data.draw(st.lists(one_id, max_size=6))
        if data.draw(st.integers(0, 19)) == 0:
            ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from([True, 1.0, "3", None])))
        return ids

    def both(self, method, *args):
        results = [outcome(lambda m=m: getattr(m, method)(*args)) for m in (self.cpp, self.ref)]
        assert results[0] == results[1], f"{method}{args}: C++ {results[0]} vs reference {results[1]}"
        return results[0]

    @rule(n=st.integers(-2, 14))
    def allocate(self, n):
        result = self.both("allocate", n)
        if result[0] == "ok":
            assert len(result[1]) == n

    @rule(data=st.data())
    def incref(self, data):
        self.both("incref", self.draw_ids(data))

    @rule(data=st.data())
    def free(self, data):
        self.both("free", self.draw_ids(data))

    @precondition(lambda self: self.used_ids())
    @rule(data=st.data())
    def free_all_references_of_one_block(self, data):
        block = data.draw(st.sampled_from(self.used_ids()))
        assert self.both("free", [block] * self.ref.ref_count(block)) == ("ok", [block])

    @rule(block=st.integers(-2, 14))
    def ref_count(self, block):
        self.both("ref_count", block)

    @invariant()
    def same_state(self):
        assert self.cpp.num_blocks == self.ref.num_blocks == self.num_blocks
        assert self.cpp.num_free_blocks == self.ref.num_free_blocks
        counts = [self.cpp.ref_count(i) for i in range(self.num_blocks)]
        assert counts == [self.ref.ref_count(i) for i in range(self.num_blocks)]
        assert min(counts) >= 0
        # free + used == total, and a block is free exactly when its count is 0
        assert counts.count(0) == self.cpp.num_free_blocks
        assert sorted(self.ref._free) == [i for i, c in enumerate(counts) if c == 0]

    def teardown(self):
        if hasattr(self, "cpp"):  # the free lists hold the same ids in the same order
            free = self.ref.num_free_blocks
            assert self.cpp.allocate(free) == self.ref.allocate(free)
            self.cpp.close()


TestSideBySide = SideBySide.TestCase


# --- unit tests, each against both implementations


def snapshot(m):
    return m.num_free_blocks, [m.ref_count(i) for i in range(m.num_blocks)]


def assert_unchanged(m, twin):
    """``m`` got a failed call that ``twin`` did not: counts and free-list order must still agree."""
    assert snapshot(m) == snapshot(twin)
    assert m.allocate(m.num_free_blocks) == twin.allocate(twin.num_free_blocks)


def prepared(cls):
    """Blocks 0..2 allocated, block 1 with two owners; block 0 then freed so the free list is [3, 4, 5, 0]."""
    m = cls(6)
    assert m.allocate(3) == [0, 1, 2]
    m.incref([1])
    assert m.free([0]) == [0]
    return m


@pytest.mark.parametrize("cls", MANAGERS)
def test_allocation_order_is_fifo(cls):
    m = prepared(cls)
    assert m.free([2]) == [2]
    assert m.allocate(4) == [3, 4, 5, 0]  # the block free the longest comes first
    assert m.allocate(1) == [2]


@pytest.mark.parametrize("cls", MANAGERS)
def test_free_reports_blocks_in_the_order_they_became_free(cls):
    m = prepared(cls)
    assert m.free([1, 2, 1]) == [2, 1]
    assert m.num_free_blocks == 6
    assert m.allocate(6) == [3, 4, 5, 0, 2, 1]


@pytest.mark.parametrize("cls", MANAGERS)
def test_out_of_blocks(cls):
    m, twin = prepared(cls), prepared(cls)
    with pytest.raises(OutOfBlocksError) as info:
        m.allocate(5)
    assert (info.value.needed, info.value.free) == (5, 4)
    assert isinstance(info.value, BlockManagerError)
    assert_unchanged(m, twin)


@pytest.mark.parametrize("cls", MANAGERS)
@pytest.mark.parametrize("method", ["incref", "free"])
@pytest.mark.parametrize("ids", [[1, 6], [-1], [1, 2**40], [0], [1, 3]], ids=["past-end", "negative", "huge",
                                                                              "freed", "never-used"])
def test_invalid_block(cls, method, ids):
    m, twin = prepared(cls), prepared(cls)
    with pytest.raises(InvalidBlockError) as info:
        getattr(m, method)(ids)
    assert isinstance(info.value, (BlockManagerError, ValueError))
    assert str(ids[-1]) in str(info.value)
    assert_unchanged(m, twin)


@pytest.mark.parametrize("cls", MANAGERS)
def test_free_counts_repeats_against_the_ref_count(cls):
    m, twin = prepared(cls), prepared(cls)
    with pytest.raises(InvalidBlockError, match="block 2 is named 2 times"):
        m.free([1, 2, 2])  # block 2 has one owner
    assert_unchanged(m, twin)
    assert m.free([1, 1]) == [1]  # block 1 has two


@pytest.mark.parametrize("cls", MANAGERS)
@pytest.mark.parametrize("method", ["incref", "free"])
@pytest.mark.parametrize("ids", [1, [1, True], [1.0], ["1"], "1", None], ids=repr)
def test_ids_of_the_wrong_type(cls, method, ids):
    m, twin = prepared(cls), prepared(cls)
    with pytest.raises(TypeError):
        getattr(m, method)(ids)
    assert_unchanged(m, twin)


@pytest.mark.parametrize("cls", MANAGERS)
def test_allocate_argument_checks(cls):
    m, twin = prepared(cls), prepared(cls)
    with pytest.raises(ValueError, match="n must be >= 0"):
        m.allocate(-1)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError):
            m.allocate(bad)
    assert_unchanged(m, twin)
    assert m.allocate(0) == []


@pytest.mark.parametrize("cls", MANAGERS)
def test_ref_count_checks(cls):
    m = prepared(cls)
    assert [m.ref_count(i) for i in range(6)] == [0, 2, 1, 0, 0, 0]
    for bad in (-1, 6, 2**40):
        with pytest.raises(InvalidBlockError):
            m.ref_count(bad)
    with pytest.raises(TypeError):
        m.ref_count(False)


@pytest.mark.parametrize("cls", MANAGERS)
@pytest.mark.parametrize("num_blocks,error", [(0, ValueError), (-3, ValueError), (2**31, ValueError),
                                              (True, TypeError), (4.0, TypeError), ("4", TypeError)])
def test_constructor_checks(cls, num_blocks, error):
    with pytest.raises(error):
        cls(num_blocks)


def test_numpy_and_torch_integers_are_accepted():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    m = BlockManager(np.int64(4))
    ids = m.allocate(np.int32(2))
    m.incref(np.array(ids))
    assert m.free(torch.tensor(ids)) == []
    assert m.free(ids) == ids


def test_closed_manager_refuses_calls():
    m = BlockManager(2)
    m.close()
    m.close()  # closing twice is harmless
    for call in (lambda: m.allocate(1), lambda: m.free([0]), lambda: m.incref([0]), lambda: m.ref_count(0),
                 lambda: m.num_free_blocks):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_missing_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(block_manager_module, "LIBRARY_PATH", tmp_path / "libblockmanager.so")
    block_manager_module._lib.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"make -C .*pip install -e \."):
            BlockManager(4)
    finally:
        monkeypatch.undo()
        block_manager_module._lib.cache_clear()
    assert BlockManager(4).allocate(1) == [0]
