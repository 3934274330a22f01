"""Many threads share one BlockManager (ctypes releases the GIL, so the C++ calls do overlap).

Each thread touches only blocks it holds and keeps a ledger of its references; a block held by one thread is
touched by no one else until it is freed, so its ref count must always equal that thread's ledger entry.
"""
import random
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

import pagedattention.memory
from pagedattention.memory import BlockManager, InvalidBlockError, OutOfBlocksError

NUM_THREADS = 8
NUM_OPS = 2000
NUM_BLOCKS = 2048
MAX_BATCH = 64  # long batches keep threads inside the C++ calls (outside the GIL) at the same time


def worker(manager: BlockManager, seed: int, ledger: Counter, errors: list, start: threading.Barrier):
    rng = random.Random(seed)
    start.wait()
    try:
        for _ in range(NUM_OPS):
            held = list(ledger)
            kind = rng.randrange(10)
            if kind < 4:
                try:
                    ids = manager.allocate(rng.randrange(MAX_BATCH))
                except OutOfBlocksError as e:
                    assert e.free < e.needed
                    continue
                assert not set(ids) & set(ledger), "a block was handed out while held"
                ledger.update(ids)
            elif kind < 6 and held:
                ids = rng.choices(held, k=rng.randint(1, MAX_BATCH))
                manager.incref(ids)
                ledger.update(ids)
            elif kind < 9 and held:
                ids = rng.sample(held, k=min(len(held), rng.randint(1, MAX_BATCH)))
                freed = manager.free(ids)
                ledger.subtract(ids)
                assert sorted(freed) == sorted(i for i in ids if ledger[i] == 0)
                for i in freed:
                    del ledger[i]
            elif held:  # an invalid batch changes nothing
                with pytest.raises(InvalidBlockError):
                    manager.free([rng.choice(held), NUM_BLOCKS + rng.randrange(3)])
            if ledger:
                block = rng.choice(list(ledger))
                assert manager.ref_count(block) == ledger[block]
            assert 0 <= manager.num_free_blocks <= NUM_BLOCKS
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)


def test_threads_share_one_manager():
    manager = BlockManager(NUM_BLOCKS)
    ledgers = [Counter() for _ in range(NUM_THREADS)]
    errors: list = []
    start = threading.Barrier(NUM_THREADS)
    threads = [threading.Thread(target=worker, args=(manager, seed, ledger, errors, start))
               for seed, ledger in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    total = sum(ledgers, Counter())
    assert [manager.ref_count(i) for i in range(NUM_BLOCKS)] == [total[i] for i in range(NUM_BLOCKS)]
    assert manager.num_free_blocks + len(total) == NUM_BLOCKS
    for ledger in ledgers:
        assert sorted(manager.free(list(ledger.elements()))) == sorted(ledger)
    assert sorted(manager.allocate(NUM_BLOCKS)) == list(range(NUM_BLOCKS))  # every id came back


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("g++") is None, reason="needs make and g++")
def test_stress_under_thread_sanitizer():
    memory_dir = Path(pagedattention.memory.__file__).parent
    result = subprocess.run(["make", "-C", str(memory_dir), "tsan"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ThreadSanitizer" not in result.stderr
    assert "0 failed checks" in result.stdout
