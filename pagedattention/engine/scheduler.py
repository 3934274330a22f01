"""Who runs this step: continuous batching with chunked prefill and recompute preemption.

A step is either a prefill step or a decode step (nano-vllm's choice). Decode steps then have exactly one
token per sequence, so they can be replayed from CUDA graphs, and prefill steps go to the prefill kernel.
Mixing both kinds in one step (vLLM V1) would need the prefill path for decode tokens and lose the graphs.

KV blocks: a sequence reserves the blocks of its whole prompt when admitted (``add_sequence``), even when the
prompt is prefilled in chunks over several steps. A half-prefilled sequence therefore never needs a block
mid-prompt, so chunking cannot cause a preemption; the price is holding the later chunks' blocks a few steps
early. Decode reserves one slot per step (``append_token``), which allocates a block every ``block_size``
tokens; when none is free, the most recently admitted sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed from its prompt and generated tokens.

Sharing (optional ``prefix_cache``): an admitted sequence starts from the longest cached run of its full
blocks and prefills only the rest; a sequence's computed full blocks are cached when a prefill chunk ends, when
it is preempted (so its recomputation is mostly hits) and when it finishes. Cached blocks no sequence uses are
spare room: they are evicted (least recently used first) before anything is refused or preempted.
Parallel sampling: ``fork`` turns a request whose prefill has just ended into its n sequences, sharing every
block; the last, partial block is copied by whichever appends to it first (copy-on-write in the manager).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pagedattention.memory.errors import OutOfBlocksError

from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]     # each with num_scheduled_tokens set for this step
    is_prefill: bool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(self, manager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: set[int] = frozenset(), scheduling: str = "continuous", prefix_cache=None):
        if scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {scheduling!r}")
        self.manager = manager
        self.prefix_cache = prefix_cache
        self.num_blocks = manager.num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.static = scheduling == "static"
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()   # in admission order: the newest is on the right
        self.finished: list[Sequence] = []        # finished since the caller last drained it
        self.num_preemptions = 0
        # Static batching: how many more requests the current batch may admit; the next batch opens only
        # when no sequence of this one is running any more.
        self.batch_quota = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        # prefill: first the chunked prefill left over from the last step, then new (or preempted) requests
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.num_computed_tokens < seq.prefill_end:  # is_prefilling, inlined: a pass over the batch
                seq.num_scheduled_tokens = min(seq.num_uncomputed_prefill_tokens, budget)
                budget -= seq.num_scheduled_tokens
                scheduled.append(seq)
                break  # only the last admitted sequence can be part-way through its prefill
        if self.static and not self.running:  # the last batch is over: open the next
            self.batch_quota = self.max_num_seqs
        # sequences running, plus the children that admitted requests will fork when their prefill ends
        num_seqs = len(self.running) + sum(seq.pending_forks for seq in self.running) if self.waiting else 0
        while (self.waiting and budget > 0 and self._admission_open()
               and num_seqs + 1 + self.waiting[0].pending_forks <= self.max_num_seqs):
            seq = self.waiting[0]
            if cdiv(len(seq), self.manager.block_size) > self.num_blocks:
                self._finish(self.waiting.popleft(), "error", self._too_big_message(seq, len(seq)))
                continue
            cached = self.prefix_cache.match(seq.token_ids) if self.prefix_cache is not None else []
            if not self._make_room(cdiv(len(seq), self.manager.block_size) - len(cached), cached):
                break
            self.waiting.popleft()
            self.manager.add_sequence(seq.seq_id, len(seq), shared_blocks=cached)
            if cached:
                self.prefix_cache.acquire(cached)
            seq.status = SequenceStatus.RUNNING
            seq.prefill_end = len(seq)
            seq.num_computed_tokens = len(cached) * self.manager.block_size
            seq.num_scheduled_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            if self.static:
                self.batch_quota -= 1
            self.running.append(seq)
            scheduled.append(seq)
            num_seqs += 1 + seq.pending_forks
        if scheduled:
            return ScheduledBatch(scheduled, is_prefill=True)

        # decode: one token for every running sequence. Usually the free blocks cover every sequence's
        # append, and then one batched manager call does it all (no eviction or preemption would happen).
        if self.running:
            try:
                self.manager.append_token_batch([seq.seq_id for seq in self.running])
            except OutOfBlocksError:
                pass  # not enough room: go sequence by sequence below, evicting and preempting
            else:
                for seq in self.running:
                    seq.num_scheduled_tokens = 1
                return ScheduledBatch(list(self.running), is_prefill=False)
        # make room by preempting the newest
        while self.running:
            seq = self.running.popleft()
            while self.manager.num_free_blocks < self.manager.blocks_needed_to_append(seq.seq_id):
                if self.prefix_cache is not None and self.prefix_cache.evict(1):
                    continue
                if self.running:
                    self._preempt(self.running.pop())
                elif scheduled:
                    self._preempt(seq)  # the older sequences of this step go on; seq comes back later
                    break
                else:  # seq holds every used block and still needs one: recomputing it would loop forever
                    self._finish(seq, "error", self._too_big_message(seq, len(seq)))
                    break
            else:
                self.manager.append_token(seq.seq_id)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        self.running.extend(scheduled)
        return ScheduledBatch(scheduled, is_prefill=False)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int], logprobs: list[float]) -> None:
        """Advance each sequence by its scheduled tokens; append the sampled token where one was sampled.

        ``token_ids``/``logprobs`` hold one entry per sequence that samples this step (see ``samples``),
        in batch order.
        """
        sampled = iter(zip(token_ids, logprobs))
        is_prefill = batch.is_prefill
        for seq in batch.seqs:
            # inline ``samples(seq)``: this loop runs once per sequence per step
            computed = seq.num_computed_tokens + seq.num_scheduled_tokens
            seq.num_computed_tokens = computed
            seq.num_scheduled_tokens = 0
            if is_prefill:
                self._cache_blocks(seq)
            if computed != len(seq.token_ids):
                continue  # a prefill chunk that does not reach the end of the prompt
            token_id, logprob = next(sampled)
            seq.append_token(token_id, logprob)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)

    def fork(self, batch: ScheduledBatch) -> list[int]:
        """Parallel sampling: each request of ``batch`` whose prefill ends this step becomes its n sequences.

        The children share every block of the parent, join the running queue and are appended to
        ``batch.seqs``; returns, for each child, the index among the batch's sampling sequences of the parent,
        whose logits it samples from.
        """
        parents = [(row, seq) for row, seq in enumerate(s for s in batch.seqs if self.samples(s)) if seq.pending_forks]
        rows = []
        for row, seq in parents:
            for index in range(1, seq.pending_forks + 1):
                child = seq.fork(index)
                self.manager.fork_sequence(seq.seq_id, child.seq_id)
                self.running.append(child)
                batch.seqs.append(child)
                rows.append(row)
            seq.pending_forks = 0
        return rows

    @staticmethod
    def samples(seq: Sequence) -> bool:
        """Whether this step produces a token for ``seq``: it decodes, or its prefill ends this step."""
        return seq.num_computed_tokens + seq.num_scheduled_tokens == len(seq)

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampling_params
        num_tokens = len(seq.token_ids)
        num_output_tokens = num_tokens - seq.num_prompt_tokens
        if num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if params.stop_token_ids and token_id in params.stop_token_ids:
                return "stop"
        if num_output_tokens >= params.max_tokens or num_tokens >= self.max_model_len:
            return "length"
        return None

    def _admission_open(self) -> bool:
        return not self.static or self.batch_quota > 0

    def _make_room(self, num_blocks: int, cached: list[int]) -> bool:
        """Whether ``num_blocks`` blocks can be allocated now, evicting cached blocks nobody uses if needed
        (never the ``cached`` blocks the sequence is about to reuse)."""
        free = self.manager.num_free_blocks
        if free >= num_blocks:
            return True
        if self.prefix_cache is None:
            return False
        ref_count = self.manager.block_manager.ref_count  # a cached block only the cache holds is evictable
        spare = self.prefix_cache.num_evictable - sum(1 for b in cached if ref_count(b) == 1)
        if free + spare < num_blocks:
            return False
        self.prefix_cache.evict(num_blocks - free, keep=cached)
        return True

    def _cache_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's computed full blocks to the prefix cache."""
        if self.prefix_cache is not None and self.manager.has_sequence(seq.seq_id):
            self.prefix_cache.insert(seq.token_ids[:seq.num_computed_tokens], self.manager.block_table(seq.seq_id))

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; cached ones that nobody else holds become evictable."""
        table = self.manager.block_table(seq.seq_id)
        self.manager.free_sequence(seq.seq_id)
        if self.prefix_cache is not None:
            self.prefix_cache.release(table)

    def _preempt(self, seq: Sequence) -> None:
        self._cache_blocks(seq)
        self.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_scheduled_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.static:
            self.batch_quota += 1  # still a member of the current batch
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._cache_blocks(seq)
        if self.manager.has_sequence(seq.seq_id):
            self.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.metrics.finish(time.perf_counter(), seq.num_output_tokens)
        self.finished.append(seq)

    def _too_big_message(self, seq: Sequence, num_tokens: int) -> str:
        bs = self.manager.block_size
        return (f"request {seq.request_id} cannot fit in the KV cache even alone: {num_tokens} tokens need "
                f"{cdiv(num_tokens, bs)} blocks of {bs} tokens, the whole cache has {self.num_blocks}; raise "
                f"num_kv_blocks or gpu_memory_utilization, or shorten the prompt or max_tokens")
