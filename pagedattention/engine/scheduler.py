"""Who runs this step: continuous batching with chunked prefill and recompute preemption.

A step is a prefill step, a decode step or a mixed one. ``schedule`` (the synchronous path) makes prefill steps
while requests can be admitted and decode steps otherwise (nano-vllm's choice): a decode step has exactly one
token per sequence and is replayed from a CUDA graph. ``schedule_next`` plans the step after one whose tokens
are still on the device (overlapped steps, stepper.py): every running sequence decodes, and waiting requests
whose whole prompt fits the token budget are admitted beside them, a mixed step (decode tokens first, then the
prompts; vLLM V1 mixes every step). A request joins the running batch without the batch pausing for its
prefill, and the step keeps one pass over the weights and a captured graph (cuda_graphs.py has mixed buckets).

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

Which sequences get a token this step is decided here, once (``ScheduledBatch``):
- parallel sampling: a request whose prefill ends this step is forked into its n sequences *before* the model
  runs; the children share every block and sample from their parent's logits row. The last, partial block is
  copied by whichever appends to it first (copy-on-write in the manager).
- beam search (beam_search.py): a beam request's sequences are its beams. They are ranked together after each
  step, then forked and freed. A search is admitted once its worst case (``beam_width`` beams of ``prompt +
  max_tokens`` tokens, no sharing) fits beside the searches running, and its beams are never preempted (a
  search needs every beam's logits in the same step): only other sequences are.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from operator import attrgetter

from pagedattention.memory.errors import OutOfBlocksError

from .config import EngineConfig
from .sequence import Sequence, SequenceStatus

_PENDING_FORKS = attrgetter("pending_forks")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]          # the model's input: decoding sequences first, then prompts (num_scheduled_tokens)
    is_prefill: bool              # any prompt tokens (a prefill or a mixed step)
    logit_mask: list[bool] | None  # prefill: which of ``seqs`` produce logits (they decode or end their prompt)
    sample_seqs: list[Sequence]   # sequences that sample a token (no beams), fork children included
    sample_rows: list[int] | None  # for each, its row among the logits; None: row i for sample_seqs[i]
    beam_seqs: list[Sequence]     # beams, ranked by their search (beam_search.py)
    beam_rows: list[int]
    num_decode_seqs: int = 0      # a mixed step: its first ``seqs`` decode one token each

    @property
    def num_decode(self) -> int:
        """How many of ``seqs`` (the first ones) decode one token: all of a decode step's."""
        return self.num_decode_seqs if self.is_prefill else len(self.seqs)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def samples(seq: Sequence) -> bool:
    """Whether this step produces logits for ``seq``: it decodes, or its prefill ends this step."""
    return seq.num_computed_tokens + seq.num_scheduled_tokens == len(seq.token_ids)


#: A mixed step admits waiting requests once this many of them have seats (or every one waiting has; fewer in a
#: small batch): each mixed step pays for its prompt part padded up to a graph bucket, so a few prompts together
#: cost less than one at a time, and a few idle seats for a few steps cost little.
MIN_MIXED_ADMISSION = 4


class Scheduler:
    def __init__(self, config: EngineConfig, manager, eos_token_ids=frozenset(), prefix_cache=None,
                 mixed_prompt_limit: tuple[int, int] | None = None):
        """``mixed_prompt_limit``: (tokens, sequences) of the largest prompt part a mixed step may carry (what
        the runner's CUDA graphs hold; a bigger step would run eagerly); None: the token budget alone."""
        self.config = config
        self.mixed_prompt_limit = mixed_prompt_limit
        self.manager = manager
        self.prefix_cache = prefix_cache
        self.num_blocks = manager.num_blocks
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()   # in admission order: the newest is on the right
        self.finished: list[Sequence] = []        # finished since the caller last drained it
        self.beam_groups: set = set()             # admitted beam searches (BeamGroup)
        self.finished_beam_groups: list = []      # done since the caller last drained it
        self.beam_reserved_blocks = 0             # the admitted searches' worst cases, summed
        self.num_preemptions = 0
        # Static batching: how many more requests the current batch may admit; the next batch opens only
        # when no sequence of this one is running any more.
        self.batch_quota = 0

    def add(self, seq: Sequence) -> None:
        params = seq.sampling_params
        seq.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq.max_len = min(seq.max_len, self.config.max_model_len)  # one bound for the per-row checks
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        config = self.config
        static = config.scheduling == "static"
        # prefill: first the chunked prefill left over from the last step, then new (or preempted) requests
        scheduled: list[Sequence] = []
        budget = config.max_num_batched_tokens
        for seq in self.running:
            if seq.num_computed_tokens < seq.prefill_end:  # is_prefilling, inlined: a pass over the batch
                seq.num_scheduled_tokens = min(seq.num_uncomputed_prefill_tokens, budget)
                budget -= seq.num_scheduled_tokens
                scheduled.append(seq)
                break  # only the last admitted sequence can be part-way through its prefill
        if static and not self.running:  # the last batch is over: open the next
            self.batch_quota = config.max_num_seqs
        self._admit(scheduled, budget)
        if scheduled:
            return self._prefill_batch(scheduled)

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
                return self._decode_batch(list(self.running))
        # make room by preempting the newest sequence that is not a beam
        while self.running:
            seq = self.running.popleft()
            while self.manager.num_free_blocks < self.manager.blocks_needed_to_append(seq.seq_id):
                if self.prefix_cache is not None and self.prefix_cache.evict(1):
                    continue
                victim = self._newest_preemptible(self.running)
                if victim is not None:
                    self.running.remove(victim)
                    self._preempt(victim)
                elif seq.beam_group is None and scheduled:
                    self._preempt(seq)  # the older sequences of this step go on; seq comes back later
                    break
                elif (victim := self._newest_preemptible(scheduled)) is not None:  # seq is a beam
                    scheduled.remove(victim)
                    self._preempt(victim)
                else:  # seq holds every used block and still needs one: recomputing it would loop forever
                    self._finish(seq, "error", self._too_big_message(seq, len(seq)))
                    break
            else:
                self.manager.append_token(seq.seq_id)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        self.running.extend(scheduled)
        return self._decode_batch(scheduled)

    def _admit(self, scheduled: list[Sequence], budget: int, whole_prompts: bool = False,
               max_admitted: int | None = None) -> None:
        """Admit waiting requests, oldest first, into ``scheduled`` while seats, KV blocks and ``budget`` tokens
        last, at most ``max_admitted`` of them. A prompt that does not fit whole waits for the next step unless
        it comes first in this one (then it gets a first chunk): a step that leaves no prompt part-way can be
        overlapped with the next (stepper.py). ``whole_prompts`` (an overlapped step): never a chunk, and stop
        at a beam search."""
        config, bs = self.config, self.manager.block_size
        static = config.scheduling == "static"
        num_seqs = self._num_seats() if self.waiting else 0
        max_admitted = len(scheduled) + (max_admitted or config.max_num_seqs)
        while (self.waiting and budget > 0 and (not static or self.batch_quota > 0)
               and len(scheduled) < max_admitted and num_seqs + self.waiting[0].num_seats <= config.max_num_seqs):
            seq = self.waiting[0]
            if cdiv(len(seq), bs) > self.num_blocks:
                self._finish(self.waiting.popleft(), "error", self._too_big_message(seq, len(seq)))
                continue
            group = seq.beam_group
            if whole_prompts and group is not None:
                break
            if group is not None and self.beam_reserved_blocks + group.worst_case_blocks > self.num_blocks:
                break  # the searches running could not all reach their worst case beside it
            cached = self.prefix_cache.match(seq.token_ids) if self.prefix_cache is not None else []
            if (whole_prompts or scheduled) and len(seq) - len(cached) * bs > budget:
                break
            if not self._make_room(cdiv(len(seq), bs) - len(cached), cached):
                break
            self.waiting.popleft()
            self.manager.add_sequence(seq.seq_id, len(seq), shared_blocks=cached)
            if cached:
                self.prefix_cache.acquire(cached)
            if group is not None:
                self.beam_groups.add(group)
                self.beam_reserved_blocks += group.worst_case_blocks
            seq.status = SequenceStatus.RUNNING
            seq.prefill_end = len(seq)
            seq.num_computed_tokens = len(cached) * bs
            seq.num_scheduled_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            if static:
                self.batch_quota -= 1
            self.running.append(seq)
            scheduled.append(seq)
            num_seqs += seq.num_seats

    def schedule_next(self) -> ScheduledBatch | None:
        """The step after one whose sampled tokens have not reached the host yet (overlapped steps): every
        running sequence takes one more token, the one sampled last step being *pending* (on the device), and
        waiting requests whose whole prompt fits beside them are admitted (a mixed step). None when the step
        needs those tokens first: the oldest waiting request needs the synchronous path, blocks would run out,
        or a beam search is running. Sequences whose pending token ends them by length (max_tokens,
        max_model_len) sit this step out; those the pending token ends otherwise (EOS, a stop token or string)
        run one wasted row and are dropped when the tokens arrive."""
        if self.beam_groups:
            return None
        seqs = [seq for seq in self.running if len(seq.token_ids) + 1 < seq.max_len]
        if not seqs:
            return None
        admit = bool(self.waiting) and self._admission_possible() and self._enough_seats()
        if admit and not self._overlap_admissible(self.waiting[0]):
            return None  # a beam search or a prompt that needs chunks: the synchronous path admits it
        try:
            self.manager.append_token_batch([seq.seq_id for seq in seqs])
        except OutOfBlocksError:  # nothing was appended: the step waits for the tokens, then preempts
            return None
        prompts: list[Sequence] = []
        if admit:
            tokens, num = self._mixed_prompt_room()
            self._admit(prompts, tokens, whole_prompts=True, max_admitted=num)
        if not prompts:
            return self._decode_batch(seqs)
        return self._prefill_batch(seqs + prompts, num_decode=len(seqs))

    def schedule_prompts_next(self) -> ScheduledBatch | None:
        """The step after a prefill step whose tokens have not reached the host yet: a prefill step of waiting
        requests admitted whole, up to the step's token budget, as ``schedule`` would run next (prompts
        first). None when the oldest waiting request cannot go that way (a beam search, a prompt longer than
        one step, no seat or no blocks; ``_admit`` stops there): the running sequences then wait for the tokens
        and decode."""
        if self.beam_groups:
            return None
        prompts: list[Sequence] = []
        self._admit(prompts, self.config.max_num_batched_tokens, whole_prompts=True)
        return self._prefill_batch(prompts) if prompts else None

    def _enough_seats(self) -> bool:
        """Whether ``MIN_MIXED_ADMISSION`` waiting requests (or all of them, if fewer wait; at most an eighth of
        the batch) have seats."""
        cap = self.config.max_num_seqs
        free = cap - self._num_seats()
        return free >= min(MIN_MIXED_ADMISSION, len(self.waiting), max(1, cap // 8))

    def _mixed_prompt_room(self) -> tuple[int, int]:
        """(tokens, sequences) a mixed step beside every running sequence may prefill."""
        tokens, num = self.mixed_prompt_limit or (self.config.max_num_batched_tokens, self.config.max_num_seqs)
        return min(tokens, self.config.max_num_batched_tokens - len(self.running)), num

    def _overlap_admissible(self, seq: Sequence) -> bool:
        """Whether an overlapped step may admit ``seq`` first in line: not a beam search, and its whole prompt
        (without counting cache hits) fits in a mixed step."""
        return seq.beam_group is None and len(seq) <= self._mixed_prompt_room()[0]

    def _admission_possible(self) -> bool:
        if self.config.scheduling == "static":
            return not self.running or self.batch_quota > 0
        return self._num_seats() + self.waiting[0].num_seats <= self.config.max_num_seqs

    def _num_seats(self) -> int:
        """Sequences running, plus the children that admitted requests will fork when their prefill ends and
        the beams that running searches may still grow to."""
        num = len(self.running) + sum(map(_PENDING_FORKS, self.running))  # at C speed: once or twice a step
        return num + sum(g.search.beam_width - len(g.seqs) for g in self.beam_groups)

    @staticmethod
    def _newest_preemptible(seqs) -> Sequence | None:
        return next((s for s in reversed(seqs) if s.beam_group is None), None)

    def _decode_batch(self, seqs: list[Sequence]) -> ScheduledBatch:
        if not self.beam_groups:  # every row samples, in order
            return ScheduledBatch(seqs, False, None, seqs, None, [], [])
        return self._split_rows(seqs, False, None, seqs)

    def _prefill_batch(self, seqs: list[Sequence], num_decode: int = 0) -> ScheduledBatch:
        """A prefill step, or a mixed one whose first ``num_decode`` sequences decode (their inputs pending)."""
        mask = [True] * num_decode + [samples(s) for s in seqs[num_decode:]]
        logit_seqs = seqs[:num_decode] + [s for s, m in zip(seqs[num_decode:], mask[num_decode:]) if m]
        if self.beam_groups:
            batch = self._split_rows(seqs, True, mask, logit_seqs)
        else:  # every row with logits samples, in order
            batch = ScheduledBatch(seqs, True, mask, logit_seqs, list(range(len(logit_seqs))), [], [])
        batch.num_decode_seqs = num_decode
        # parallel sampling: children join now and sample from their parent's row (after every parent, so
        # that the batch order is admission order). A decoding sequence has none pending (it forked when its
        # prefill ended); without beams the decoding sequences are the first rows.
        first = 0 if self.beam_groups else num_decode
        parent_rows = [(row, seq) for row, seq in zip(batch.sample_rows[first:], batch.sample_seqs[first:])
                       if seq.pending_forks]
        for row, seq in parent_rows:
            for index in range(1, seq.pending_forks + 1):
                child = seq.fork(index)
                child.num_computed_tokens = child.prefill_end = len(seq)
                child.num_scheduled_tokens = 0
                self.manager.fork_sequence(seq.seq_id, child.seq_id)
                self.running.append(child)
                batch.sample_seqs.append(child)
                batch.sample_rows.append(row)
            seq.pending_forks = 0
        return batch

    @staticmethod
    def _split_rows(seqs, is_prefill, mask, logit_seqs) -> ScheduledBatch:
        batch = ScheduledBatch(seqs, is_prefill, mask, [], [], [], [])
        for row, seq in enumerate(logit_seqs):
            if seq.beam_group is None:
                batch.sample_seqs.append(seq)
                batch.sample_rows.append(row)
            else:
                batch.beam_seqs.append(seq)
                batch.beam_rows.append(row)
        return batch

    # --- after the model ran ---------------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int], logprobs: list[float],
                    beam_candidates=None) -> None:
        """Advance each sequence by its scheduled tokens; append each sampled token (``token_ids`` and
        ``logprobs``: one per ``batch.sample_seqs``) and stop what ends; advance the beam searches
        (``beam_candidates``: each beam's best log-probabilities and tokens, as ``Sampler.beam_candidates``)."""
        num_decode = batch.num_decode
        for seq in batch.seqs[:num_decode]:  # one token each (num_scheduled_tokens may be a later step's)
            seq.num_computed_tokens += 1
        for seq in batch.seqs[num_decode:]:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self._cache_blocks(seq)
        finished = SequenceStatus.FINISHED
        for seq, token_id, logprob in zip(batch.sample_seqs, token_ids, logprobs):
            if seq.status is finished:  # ended while this (overlapped) step ran: its row was wasted
                continue
            seq.append_token(token_id, logprob)
            if token_id in seq.stop_ids or len(seq.token_ids) >= seq.max_len:  # the usual row: two checks
                reason = self._stop_reason(seq, token_id)
                if reason is not None:
                    self.running.remove(seq)
                    self._finish(seq, reason)
        if batch.beam_seqs:
            self._advance_beams(batch.beam_seqs, *beam_candidates)

    def _advance_beams(self, seqs: list[Sequence], values, tokens) -> None:
        row_of = {seq.seq_id: row for row, seq in enumerate(seqs)}
        for group in {id(s.beam_group): s.beam_group for s in seqs}.values():
            rows = [row_of[seq.seq_id] for seq in group.seqs]
            new, dropped = group.advance(group.search.step(values[rows], tokens[rows]))
            for seq in dropped:
                self.running.remove(seq)
                self._free_beam(seq)
            for seq in new:
                if not self.manager.has_sequence(seq.seq_id):  # a fork: share every block of its parent
                    self.manager.fork_sequence(seq.parent_seq_id, seq.seq_id)
                    self.running.append(seq)
            if group.search.done:
                for seq in group.seqs:
                    self.running.remove(seq)
                    self._free_beam(seq)
                group.seqs = []
                self.beam_groups.discard(group)
                self.beam_reserved_blocks -= group.worst_case_blocks
                self.finished_beam_groups.append(group)

    def _free_beam(self, seq: Sequence) -> None:
        self._cache_blocks(seq)
        self.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampling_params
        num_tokens = len(seq.token_ids)
        num_output_tokens = num_tokens - seq.num_prompt_tokens
        if num_output_tokens >= params.min_tokens and token_id in seq.stop_ids:
            return "stop"
        if num_output_tokens >= params.max_tokens or num_tokens >= self.config.max_model_len:
            return "length"
        return None

    # --- ending sequences --------------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End ``seq`` now (a stop string, an abort, a sampling error), wherever it is, freeing its blocks."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.beam_group is not None:
            self._end_beam_group(seq.beam_group)
        self._finish(seq, reason, error)

    def _end_beam_group(self, group) -> None:
        for beam in group.seqs:
            if beam in self.running:
                self.running.remove(beam)
            if self.manager.has_sequence(beam.seq_id):
                self.free(beam)
            beam.status = SequenceStatus.FINISHED
        group.seqs = []
        if group in self.beam_groups:
            self.beam_groups.discard(group)
            self.beam_reserved_blocks -= group.worst_case_blocks

    def abort_all(self) -> None:
        """Drop every sequence (after an error mid-step): no sequence queued, no block held."""
        for seq in [*self.running, *self.waiting]:
            if self.manager.has_sequence(seq.seq_id):
                self.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"
        self.running.clear()
        self.waiting.clear()
        self.beam_groups.clear()
        self.beam_reserved_blocks = 0

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
        if self.config.scheduling == "static":
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
