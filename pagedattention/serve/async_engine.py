"""One engine thread owns the ``LLM``; the event loop talks to it through an inbox and per-request streams.

    event loop (HTTP handlers)                     engine thread
    generate() -> ("add", ...) --- inbox ------>   between steps: llm.add_request / llm.abort_request
    RequestStream <-- call_soon_threadsafe -----   llm.step() -> outputs of every request that moved

Requests are added between steps, so one arriving mid-run joins the running batch at the next step
(continuous batching) instead of waiting for the batch to end. Only the engine thread calls the LLM: a
handler never waits on the LLM's lock while a step runs, and a bad request's ValueError comes back to its
own handler from ``add_request`` before anything of it is queued.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from .metrics import EngineSnapshot, ServerMetrics

logger = logging.getLogger("pagedattention.serve")


class ServerBusy(Exception):
    """The request queue is full, or the server is shutting down: the client should retry later (503)."""


@dataclass
class _Timing:
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0  # the most tokens any completion of the request has


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt).

    Iterating yields ``(prompt_index, RequestOutput)``; each output holds everything generated so far, so when
    the reader falls behind the engine only the newest output of each request is kept (a slow client gets
    fewer, larger chunks and never a backlog). Closing it aborts the engine requests that have not finished,
    which frees their KV blocks.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str]):
        self.engine = engine
        self.request_ids = request_ids
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.unfinished = set(request_ids)
        self._latest: dict = {}  # request id -> its newest output not yet read, oldest first
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item) -> None:
        """An output, or the exception that ended this stream's requests (event loop side)."""
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._latest.pop(item.request_id, None)
            self._latest[item.request_id] = item
        self._ready.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            if self._latest:
                out = self._latest.pop(next(iter(self._latest)))
                if out.finished:
                    self.unfinished.discard(out.request_id)
                return self.index[out.request_id], out
            if self._error is not None:
                self.close()
                raise self._error
            if not self.unfinished:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """Abort what has not finished (a client gone, or an error); a no-op once everything finished."""
        for rid in self.unfinished:
            self.engine.abort(rid)
        self.unfinished = set()


class AsyncEngine:
    """Runs ``llm`` on a thread and streams its outputs to asyncio handlers.

    max_queue_len: requests beyond the batch (``max_num_seqs``) the server holds; past that, 503.
    """

    def __init__(self, llm, max_queue_len: int = 256):
        if not isinstance(max_queue_len, int) or isinstance(max_queue_len, bool) or max_queue_len < 0:
            raise ValueError(f"max_queue_len must be an int >= 0, got {max_queue_len!r}")
        self.llm = llm
        self.max_requests = llm.config.max_num_seqs + max_queue_len
        self.metrics = ServerMetrics()
        self.snapshot = EngineSnapshot()
        self.num_in_flight = 0  # engine requests accepted and not finished or aborted (event loop side)
        self.draining = False
        self._ids = itertools.count()
        self._streams: dict[str, RequestStream] = {}
        self._timings: dict[str, _Timing] = {}
        self._inbox: deque = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._num_prompt_tokens = 0  # engine thread side, published in the snapshot
        self._num_generated_tokens = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: Exception | None = None  # set if the engine thread died: every request fails with it

    # --- event loop side -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread after what it is running (the server has drained its requests by now)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.llm.shutdown()  # tensor-parallel workers, if any

    async def generate(self, prompts: list, params, arrival: float | None = None) -> RequestStream:
        """Queue one engine request per prompt (same SamplingParams); the stream of their outputs.

        arrival: when the HTTP request came (``time.perf_counter``), the start of its time to first token.
        Raises ServerBusy when the queue is full or the server drains, and the engine's ValueError/TypeError
        for a bad prompt (then nothing of this call stays queued).
        """
        if self.error is not None:
            raise self.error
        if self.draining:
            self.metrics.requests_rejected += 1
            raise ServerBusy("the server is shutting down")
        if self.num_in_flight + len(prompts) > self.max_requests:
            self.metrics.requests_rejected += 1
            raise ServerBusy(f"the server's queue is full ({self.num_in_flight} requests in flight, at most "
                             f"{self.max_requests}); retry later")
        stream = RequestStream(self, [f"{next(self._ids)}" for _ in prompts])
        acks = []
        arrival = time.perf_counter() if arrival is None else arrival
        for rid, prompt in zip(stream.request_ids, prompts):
            self._streams[rid] = stream
            self._timings[rid] = _Timing(arrival)
            self.num_in_flight += 1
            acks.append(self._loop.create_future())
            self._send(("add", rid, prompt, params, acks[-1]))
        try:
            results = await asyncio.gather(*acks, return_exceptions=True)
        except BaseException:  # cancelled (the client left): whatever was added is aborted
            stream.close()
            raise
        index, error = next(((i, r) for i, r in enumerate(results) if isinstance(r, BaseException)), (0, None))
        if error is not None:  # a bad prompt: the others of this call, if added, leave again
            error.prompt_index = index
            for rid in stream.request_ids:
                self._forget(rid)
                self._send(("abort", rid))
            stream.unfinished = set()
            raise error
        return stream

    def abort(self, request_id: str) -> None:
        if self._forget(request_id):
            self.metrics.requests_aborted += 1
        self._send(("abort", request_id))

    def _forget(self, request_id: str) -> bool:
        if self._streams.pop(request_id, None) is None:
            return False
        del self._timings[request_id]
        self.num_in_flight -= 1
        return True

    def _send(self, command) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def _deliver(self, outputs, now: float) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            timing = self._timings[out.request_id]
            num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
            if num_tokens > timing.num_tokens:
                timing.first_token = timing.first_token or now
                timing.last_token, timing.num_tokens = now, num_tokens
            if out.finished:
                self._finish(out, timing, now)
            stream.put(out)

    def _finish(self, out, timing: _Timing, now: float) -> None:
        self._forget(out.request_id)
        ttft = timing.first_token - timing.arrival if timing.first_token is not None else None
        tpot = ((timing.last_token - timing.first_token) / (timing.num_tokens - 1)
                if timing.num_tokens > 1 else None)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.metrics.record_finished(reason or "unknown", ttft, tpot, now - timing.arrival)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.get(rid)
            if stream is not None:
                self._forget(rid)
                stream.put(error)

    def _fail_everything(self) -> None:
        """The engine thread died: fail the requests in flight and those it never took from the inbox."""
        self._fail(list(self._streams), self.error)
        with self._wake:
            for command in self._inbox:
                if command[0] == "add":
                    self._resolve(command[-1], self.error)
            self._inbox.clear()

    @staticmethod
    def _resolve(ack: asyncio.Future, error: BaseException | None) -> None:
        if not ack.done():
            ack.set_exception(error) if error is not None else ack.set_result(None)

    # --- engine thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        live: dict[str, int | None] = {}  # requests the LLM holds -> tokens generated so far (None: no output yet)
        try:
            self._serve_requests(live)
        except BaseException as e:  # a failure outside a step: fail every request rather than hang them all
            logger.exception("the engine thread stopped")
            self.error = RuntimeError(f"the engine stopped: {e}")
            for rid in live:  # free their blocks if the LLM still can
                try:
                    self.llm.abort_request(rid)
                except Exception:
                    pass
            self._loop.call_soon_threadsafe(self._fail_everything)

    def _serve_requests(self, live: dict) -> None:
        while True:
            with self._wake:
                while not self._inbox and not live and not self._stopping:
                    self._wake.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                if self._stopping and not commands and not live:
                    return
            for command in commands:
                self._apply(command, live)
            if commands:
                self._publish()
            if not live:
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # the engine failed: fail its requests, keep serving the next ones
                logger.exception("engine step failed")
                failed = sorted(live)
                for rid in failed:
                    self.llm.abort_request(rid)
                live.clear()
                self._loop.call_soon_threadsafe(self._fail, failed, RuntimeError(f"the engine failed: {e}"))
                self._publish()
                continue
            for out in outputs:
                self._count_tokens(out, live)
            self._publish()
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs, time.perf_counter())

    def _count_tokens(self, out, live: dict) -> None:
        seen = live.get(out.request_id, 0)
        if seen is None:  # its first output: the prompt is in the cache now
            self._num_prompt_tokens += len(out.prompt_token_ids)
            seen = 0
        generated = sum(len(c.token_ids) for c in out.outputs)
        self._num_generated_tokens += generated - seen
        if out.finished:
            live.pop(out.request_id, None)
        else:
            live[out.request_id] = generated

    def _apply(self, command, live: dict) -> None:
        if command[0] == "abort":
            if live.pop(command[1], False) is not False:
                self.llm.abort_request(command[1])
            return
        _, rid, prompt, params, ack = command
        try:
            self.llm.add_request(prompt, params, request_id=rid)
        except Exception as e:  # bad input: nothing was queued
            self._loop.call_soon_threadsafe(self._resolve, ack, e)
            return
        live[rid] = None
        self._loop.call_soon_threadsafe(self._resolve, ack, None)

    def _publish(self) -> None:
        """Copy the engine's gauges for /metrics (read on the event loop without touching the LLM)."""
        llm, manager = self.llm, self.llm.manager
        used = manager.num_blocks - manager.num_free_blocks
        cache = getattr(llm, "prefix_cache", None)
        if cache is not None:  # cached blocks no request holds are free for the taking
            used -= cache.num_evictable
        stats = llm.stats()
        self.snapshot = EngineSnapshot(
            num_running_seqs=llm.num_running_seqs, num_waiting_seqs=llm.num_waiting_seqs,
            num_kv_blocks=manager.num_blocks, num_kv_blocks_used=used,
            prefix_cache_query_tokens=stats.prefix_cache_query_tokens,
            prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
            num_preemptions=getattr(llm, "num_preemptions", 0), num_prompt_tokens=self._num_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens)
