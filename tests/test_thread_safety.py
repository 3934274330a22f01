"""Many threads share one BlockManager (ctypes releases the GIL, so the C++ calls do overlap).

Each thread touches only blocks it holds and keeps a ledger of its references; a block held by one thread is
touched by no one else until it is freed, so its ref count must always equal that thread's ledger entry.
"""
import os
import random
import shutil
import subprocess
import sys
import threading
import time
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


# --- close() while other threads are inside calls


class GatedLibrary:
    """The C library, except that ``bm_allocate`` waits for ``release`` once it has been entered."""

    def __init__(self, lib):
        self._lib = lib
        self.entered, self.release = threading.Event(), threading.Event()
        self.destroyed_while_in_allocate = False
        self._in_allocate = False

    def bm_allocate(self, *args):
        self._in_allocate = True
        self.entered.set()
        self.release.wait(10)
        self._in_allocate = False
        return self._lib.bm_allocate(*args)

    def bm_destroy(self, handle):
        self.destroyed_while_in_allocate |= self._in_allocate
        self._lib.bm_destroy(handle)

    def __getattr__(self, name):
        return getattr(self._lib, name)


def refuses_calls(manager: BlockManager) -> bool:
    try:
        manager.num_free_blocks
    except ValueError:
        return True
    return False


def test_close_waits_for_the_call_in_flight_and_refuses_new_ones():
    manager = BlockManager(8)
    lib = manager._lib = GatedLibrary(manager._lib)
    allocated = []
    caller = threading.Thread(target=lambda: allocated.append(manager.allocate(3)))
    closer = threading.Thread(target=manager.close)
    caller.start()
    assert lib.entered.wait(10)
    closer.start()
    deadline = time.monotonic() + 10
    while not refuses_calls(manager) and time.monotonic() < deadline:  # close() has begun
        time.sleep(0.001)
    closer.join(0.2)
    assert closer.is_alive(), "close() returned while allocate() was still inside the C library"
    with pytest.raises(ValueError, match="closed"):  # refused at once, not queued behind the call in flight
        manager.free([0])
    lib.release.set()
    caller.join(10)
    closer.join(10)
    assert not caller.is_alive() and not closer.is_alive()
    assert not lib.destroyed_while_in_allocate
    assert len(allocated) == 1 and len(set(allocated[0])) == 3 and all(0 <= b < 8 for b in allocated[0])


def close_while_in_use(rng: random.Random) -> list[str]:
    """Threads allocate, incref and free in a loop while the main thread closes the manager.

    Returns what went wrong: a thread still running after the timeout (stuck in the C library), an
    exception other than the "closed" ValueError, or a call after close() that did not raise it.
    """
    manager = BlockManager(rng.randint(64, 4096))
    problems: list[str] = []
    start = threading.Barrier(NUM_THREADS + 1)

    def work(seed):
        local = random.Random(seed)
        start.wait()
        try:
            while True:
                try:
                    ids = manager.allocate(local.randrange(MAX_BATCH))
                except OutOfBlocksError:
                    continue
                manager.incref(ids)
                manager.free(ids + ids)
                manager.num_free_blocks
        except ValueError as e:
            if "closed" not in str(e):
                problems.append(f"{type(e).__name__}: {e}")
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            problems.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(rng.random(),), daemon=True) for _ in range(NUM_THREADS)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(rng.uniform(0, 0.05))
    manager.close()
    deadline = time.monotonic() + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        problems.append(f"{sum(t.is_alive() for t in threads)} thread(s) still inside a call 10 s after close()")
    for name, call in [("allocate", lambda: manager.allocate(1)), ("free", lambda: manager.free([0])),
                       ("incref", lambda: manager.incref([0])), ("ref_count", lambda: manager.ref_count(0)),
                       ("num_free_blocks", lambda: manager.num_free_blocks),
                       ("num_blocks", lambda: manager.num_blocks)]:
        try:
            call()
            problems.append(f"{name} after close() returned")
        except ValueError as e:
            if "closed" not in str(e):
                problems.append(f"{name} after close(): {e}")
    return problems


def test_close_while_threads_are_inside_calls():
    # In a child process: a manager destroyed under a running call hangs or aborts the process.
    result = subprocess.run([sys.executable, __file__, "close-while-in-use", str(random.randrange(2**32))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}{result.stderr[-2000:]}"


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("g++") is None, reason="needs make and g++")
def test_stress_under_thread_sanitizer():
    memory_dir = Path(pagedattention.memory.__file__).parent
    result = subprocess.run(["make", "-C", str(memory_dir), "tsan"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ThreadSanitizer" not in result.stderr
    assert "0 failed checks" in result.stdout


if __name__ == "__main__" and sys.argv[1:2] == ["close-while-in-use"]:
    rng = random.Random(int(sys.argv[2]))
    failures = [p for _ in range(10) for p in close_while_in_use(rng)]
    print("\n".join(failures) or "ok", flush=True)
    os._exit(1 if failures else 0)  # do not wait for threads that may be stuck in the C library
