"""Tensor parallelism over processes: rank 0 is the engine, ranks 1..N-1 are workers that run its steps with it.

    rank 0 (the engine's process)                       rank r (a spawned worker)
    scheduler, block manager, sampler                   its shard of the weights, its KV cache
    TensorParallelRunner.execute(step) ──── pipe ─────> (copy-on-write pairs, step)
      run shard 0 <────── all-reduce, gather ───────>   replay the copies, run shard r
      logits (gathered on rank 0) -> the sampler        wait for the next step

Every rank's cache has the same blocks, each holding num_kv_heads / N heads, so one scheduler and one
BlockManager (rank 0's) drive them all: the block tables, slots and copy-on-write pairs rank 0 computes hold on
every rank. A copy-on-write happens on rank 0 while it schedules; its pairs are queued and sent with the next
step, and each worker copies them before it runs that step (nothing writes the cache in between).

Start-up: rank 0 checks that the model splits (heads divisible by N), opens a TCP store, spawns the workers and
loads its shard while they load theirs; once every worker has loaded (a failure there is raised at once with its
traceback), all ranks join one process group (NCCL on GPUs, gloo on CPUs) and size the KV cache: each measures,
all take the minimum.

Failure: a worker that dies or raises breaks the next collective (its sockets close); rank 0 then raises
TensorParallelError("tensor-parallel rank r exited with code c", with the worker's traceback when it raised),
stops the other ranks, and every later step raises the same. NCCL would wait for a dead peer until its timeout
(COLLECTIVE_TIMEOUT, for every collective), so on GPUs a watchdog thread aborts the group as soon as a worker
exits unasked. Workers stop when rank 0 says so (``shutdown``, the runner garbage-collected, interpreter exit) or
when rank 0 is gone (their pipe closes; a thread also notices their parent change). They ignore SIGINT: Ctrl-C
interrupts rank 0, which then stops them.

Workers start with "spawn": a script that builds such an engine must do so under ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import copy
import dataclasses
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedattention import models
from pagedattention.memory.paged_attention_manager import PagedAttentionManager
from pagedattention.models.loader import read_model_config
from pagedattention.models.parallel import TensorParallel, check_divisible

from . import kv_cache
from .config import EngineConfig
from .model_runner import ModelRunner, StepInputs

COLLECTIVE_TIMEOUT = timedelta(minutes=5)
STOP_GRACE_S = 5.0   # a worker asked to stop gets this long before it is killed
EXIT_WAIT_S = 2.0    # after a failed collective: how long to wait for a failing worker's exit code


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or failed; the group is stopped and the engine cannot run steps any more."""


# --- what every rank does the same way ----------------------------------------------------------------------------

class _CopyRecorder:
    """The manager's copy-on-write op: copies the blocks here and keeps the pairs for the other ranks."""

    def __init__(self, copy_blocks):
        self.copy_blocks = copy_blocks
        self.pending: list[np.ndarray] = []

    def __call__(self, key_caches, value_caches, src_to_dst: torch.Tensor) -> None:
        self.copy_blocks(key_caches, value_caches, src_to_dst)
        self.pending.append(src_to_dst.cpu().numpy())

    def take(self) -> list[np.ndarray]:
        pending, self.pending = self.pending, []
        return pending


def _set_cpu_threads(config: EngineConfig) -> None:
    if config.device.type == "cpu":  # as LLM does for rank 0
        threads = config.cpu_threads or (1 if config.model is None else None)
        if threads is not None:
            torch.set_num_threads(threads)


def _load(config: EngineConfig, tp: TensorParallel):
    model, tokenizer, model_config = models.load(config.model, dtype=config.dtype, device=config.device,
                                                 seed=config.seed, tp=tp)
    config.set_model_limits(model_config)
    return model, tokenizer, model_config


def _build_cache(config: EngineConfig, model, model_config, tp: TensorParallel):
    """This rank's KV cache, as big as the smallest rank's; ``(manager, copy recorder, max_model_len lowered?)``."""
    ops = model.bind_backend(config.attention_backend)
    local = dataclasses.replace(model_config, num_attention_heads=model_config.num_attention_heads // tp.size,
                                num_key_value_heads=model_config.num_key_value_heads // tp.size)
    num_blocks = tp.min(kv_cache.num_kv_blocks(config, model, local), config.device)
    capped = config.cap_max_model_len(num_blocks)
    copies = _CopyRecorder(ops.copy_blocks)
    manager = PagedAttentionManager(num_blocks, config.block_size, local.num_hidden_layers,
                                    local.num_key_value_heads, local.head_dim, config.dtype, config.device,
                                    copy_blocks=copies)
    model.bind_kv_cache(manager.key_caches, manager.value_caches)
    return manager, copies, capped


def _new_group(store: dist.Store, rank: int, size: int, device: torch.device):
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, size, options)


# --- a worker (ranks 1..N-1) ------------------------------------------------------------------------------------

def _worker_main(rank: int, size: int, port: int, config: EngineConfig, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        _set_cpu_threads(config)
        if config.device.type == "cuda":
            config.device = torch.device("cuda", (config.device.index or 0) + rank)
            torch.cuda.set_device(config.device)
        tp = TensorParallel(rank, size)
        model, _, model_config = _load(config, tp)
        conn.send(("loaded", None))
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        tp.group = _new_group(store, rank, size, config.device)
        manager, copies, _ = _build_cache(config, model, model_config, tp)
        _serve(conn, ModelRunner(config, model, manager), manager, copies.copy_blocks)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:  # at once: rank 0 is waiting for the exit code, and there is nothing to tidy up
            os._exit(1)


def _exit_with_parent(parent_pid: int) -> None:
    """Rank 0 gone (killed) while this worker waits in a collective that only times out (NCCL): leave now."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


@torch.inference_mode()
def _serve(conn, runner: ModelRunner, manager: PagedAttentionManager, copy_blocks) -> None:
    """Run rank 0's steps until it says stop (None) or is gone."""
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        copies, step, eager = message
        for pairs in copies:
            copy_blocks(manager.key_caches, manager.value_caches, torch.from_numpy(pairs).to(manager.device))
        runner.execute(step, eager=eager)


# --- rank 0 ---------------------------------------------------------------------------------------------------

@dataclass
class _Worker:
    rank: int
    process: mp.Process
    conn: multiprocessing.connection.Connection
    loaded: bool = False
    error: str | None = None   # the traceback it sent before exiting

    def read_messages(self) -> None:
        try:
            while self.conn.poll():
                kind, detail = self.conn.recv()
                self.loaded = self.loaded or kind == "loaded"
                self.error = detail if kind == "error" else self.error
        except (EOFError, OSError):  # it has exited: its end of the pipe is closed
            pass


def _stop_workers(workers: list[_Worker], stopping: threading.Event, grace_s: float) -> None:
    """Ask every worker to stop, kill those still running after ``grace_s``; no process is left behind."""
    stopping.set()
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):  # gone already, or the pipe is closed
            pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


def _abort_on_worker_exit(workers: list[_Worker], group, stopping: threading.Event) -> None:
    """NCCL waits for a dead peer until its timeout: abort the group as soon as a worker exits unasked, so that
    the collective rank 0 waits in fails now (gloo notices the closed socket by itself)."""
    try:
        multiprocessing.connection.wait([w.process.sentinel for w in workers])
    except OSError:  # the sentinels were closed: the runner is gone
        return
    if not stopping.is_set():
        group.abort()


class TensorParallelRunner:
    """ModelRunner's interface (``prepare``, ``execute``, ``run``) over ``config.tensor_parallel_size`` processes.

    Builds what LLM builds for one process, for rank 0: ``model`` (its shard), ``tokenizer``, ``model_config``
    (the whole model's) and ``manager`` (its KV cache, whose blocks stand for every rank's).
    """

    def __init__(self, config: EngineConfig):
        size = config.tensor_parallel_size
        check_divisible(read_model_config(config.model), size)  # before any process starts
        self.config = config
        self._failure: str | None = None
        self._workers: list[_Worker] = []
        self._stopping = threading.Event()  # set once the workers are being stopped: their exits are expected
        self._stop = weakref.finalize(self, _stop_workers, self._workers, self._stopping, STOP_GRACE_S)
        worker_config = copy.copy(config)  # as given: each rank resolves the model's limits itself
        try:
            self._store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                                        timeout=COLLECTIVE_TIMEOUT)
            context = mp.get_context("spawn")
            for rank in range(1, size):
                ours, theirs = context.Pipe()
                process = context.Process(target=_worker_main, name=f"pagedattention-tp{rank}", daemon=True,
                                          args=(rank, size, self._store.port, worker_config, theirs))
                process.start()
                theirs.close()
                self._workers.append(_Worker(rank, process, ours))
            tp = TensorParallel(0, size)
            self.model, self.tokenizer, self.model_config = _load(config, tp)
            self._wait_until_loaded()
            tp.group = _new_group(self._store, 0, size, config.device)
            if config.device.type == "cuda":
                threading.Thread(target=_abort_on_worker_exit, args=(self._workers, tp.group, self._stopping),
                                 name="pagedattention-tp-watchdog", daemon=True).start()
            self.manager, self._copies, capped = _build_cache(config, self.model, self.model_config, tp)
            self.local = ModelRunner(config, self.model, self.manager)
        except BaseException as e:
            self._fail(e)
        self.graphs = self.local.graphs
        if capped:
            warnings.warn(f"the KV cache holds {self.manager.num_blocks} blocks of {config.block_size} tokens per "
                          f"rank, so max_model_len is lowered to {config.max_model_len} (the model allows "
                          f"{self.model_config.max_position_embeddings}); requests end at that length. Raise "
                          "gpu_memory_utilization or num_kv_blocks for longer ones", stacklevel=3)

    @torch.inference_mode()
    def run(self, batch, eager: bool = False) -> torch.Tensor:
        return self.execute(self.prepare(batch), eager=eager)

    def prepare(self, batch, pending_tokens: torch.Tensor | None = None) -> StepInputs:
        """As ModelRunner.prepare. ``pending_tokens`` (a decode step's input tokens still on rank 0's device)
        are brought to the host: every rank needs them."""
        if pending_tokens is None:
            return self.local.prepare(batch)
        x = self.local.prepare(batch, pending_tokens)
        return dataclasses.replace(x, input_ids=pending_tokens.long().cpu().numpy(), input_ids_device=None)

    def execute(self, x: StepInputs, eager: bool = False) -> torch.Tensor:
        """Send the step (and the copy-on-writes since the last one) to every worker, run shard 0 with them;
        logits ``[len(x.logit_rows), vocab]`` in the model's dtype."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        try:
            for w in self._workers:
                if w.process.exitcode is not None:
                    raise TensorParallelError(f"tensor-parallel rank {w.rank} has exited")
            message = pickle.dumps((self._copies.take(), x, eager), protocol=pickle.HIGHEST_PROTOCOL)
            for w in self._workers:
                w.conn.send_bytes(message)
            return self.local.execute(x, eager=eager)
        except BaseException as e:
            self._fail(e)

    def shutdown(self) -> None:
        """Stop the workers (idempotent; also done when the runner is garbage-collected and at exit)."""
        if self._failure is None:
            self._failure = "the tensor-parallel workers were shut down"
        self._stop()

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    # --- failures ------------------------------------------------------------------------------------------

    def _wait_until_loaded(self) -> None:
        """Until every worker has loaded its shard; TensorParallelError as soon as one fails or dies."""
        loading = list(self._workers)
        while loading:
            ready = multiprocessing.connection.wait([x for w in loading for x in (w.conn, w.process.sentinel)])
            for w in loading:
                w.read_messages()
                if w.error is not None or (not w.loaded and w.process.sentinel in ready):
                    raise TensorParallelError(f"tensor-parallel rank {w.rank} failed while loading")
            loading = [w for w in loading if not w.loaded]

    def _fail(self, cause: BaseException) -> NoReturn:
        """Stop the group after ``cause`` broke a step (or the start); raise what explains it best: the workers
        that died, else ``cause`` itself."""
        exited = self._exited_workers()
        self._stopping.set()
        for w in self._workers:  # the others may be waiting in a collective that will never complete
            if w.process.is_alive():
                w.process.kill()
        self._stop()
        if exited:
            self._failure = "; ".join(exited)
            raise TensorParallelError(self._failure) from cause
        self._failure = f"the tensor-parallel group was stopped after an error on rank 0: {cause!r}"
        raise cause

    def _exited_workers(self) -> list[str]:
        """'tensor-parallel rank r exited with code c[:\ntraceback]' for each worker that has exited (or does
        within EXIT_WAIT_S) or reported an error."""
        sentinels = [w.process.sentinel for w in self._workers]
        # the culprit may be exiting right now
        ready = multiprocessing.connection.wait(sentinels, timeout=EXIT_WAIT_S) if sentinels else []
        exited = []
        for w in self._workers:
            w.read_messages()
            if w.process.sentinel in ready or w.error is not None:
                # its pipes close a moment before its exit code can be read: join waits for that moment
                w.process.join(EXIT_WAIT_S)
                how = "failed" if w.process.exitcode is None else f"exited with code {w.process.exitcode}"
                exited.append(f"tensor-parallel rank {w.rank} {how}" + (f":\n{w.error}" if w.error else ""))
        return exited
