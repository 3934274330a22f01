"""The engine loop: one scheduled step at a time, the next decode step overlapped with the last.

A step is *launched* (the scheduler's batch turned into tensors, the model and the sampler queued on the
device) and later *finished* (its tokens read back, appended, stopped, freed). Usually the two follow each
other. Between two decode steps they overlap: while the GPU runs decode step t, the host schedules and launches
step t + 1, whose input tokens are step t's, still on the device; only then does it wait for step t's tokens and
process them. A request that ends is therefore seen one step late (its row in step t + 1 is wasted), and the
host's work hides behind the GPU's instead of adding to it. Step t + 1 may also admit requests (a mixed step,
scheduler.py), and a prefill step whose prompts all end overlaps the step after it. After a prefill step,
waiting prompts go first, as in the synchronous ``schedule``: while one prefill step runs, the next admits more
whole prompts (a burst of arrivals prefills back to back, with no host gap between its steps), and the running
sequences decode once no waiting prompt fits and the last prefill's tokens are in. Whatever needs the tokens
on the host first (preempting, beam search, penalties, min_tokens, a prompt in chunks) waits for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model_runner import ModelRunner
from .sampler import PendingSample, Sampler, SamplerOutput, SamplingError
from .sequence import FINISHED, Sequence



@dataclass
class Launched:
    batch: object                 # ScheduledBatch
    sample: PendingSample | None  # the sampler's queued work
    beams: tuple | None           # beam candidates (on the host)
    prompts_only: bool = False    # a prefill step beside running sequences it does not sample: only more
                                  # prompts may follow it before its tokens are in


@dataclass
class StepInfo:
    is_prefill: bool   # it read prompt tokens (a prefill or a mixed step)
    num_seqs: int      # sequences the model ran
    num_tokens: int    # tokens it read
    num_sampled: int   # tokens appended by this call (of the step before, when overlapped; beams not counted)
    num_decode_seqs: int = 0  # sequences that decoded one token (all of a decode step's; some of a mixed one's)

    @property
    def kind(self) -> str:
        """"prefill", "decode" or "mixed"."""
        if not self.is_prefill:
            return "decode"
        return "mixed" if self.num_decode_seqs else "prefill"


class Stepper:
    def __init__(self, scheduler, runner, sampler, tokenizer, eos_token_ids: set[int], record_step_stats):
        self.scheduler, self.runner, self.sampler = scheduler, runner, sampler
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids
        self.record_step_stats = record_step_stats  # called once per launched step
        self.inflight: Launched | None = None       # a decode step launched but not finished (overlapped)
        self.last_step: StepInfo | None = None
        self.finished_beam_groups: list = []
        self._num_sampled = 0

    def step(self) -> list[Sequence]:
        """One scheduled step; returns the sequences that got a token or ended in it (``last_step`` says what
        it launched and how many tokens it took in)."""
        self._num_sampled = 0
        self.finished_beam_groups = []
        touched = self._launch_next()
        if self.last_step is not None:
            self.last_step.num_sampled = self._num_sampled
        return touched

    def _launch_next(self) -> list[Sequence]:
        """Launch the next step and finish the one before it (see the module's docstring)."""
        inflight, self.inflight = self.inflight, None
        batch = None
        if inflight is not None:
            if inflight.batch.is_prefill and inflight.batch.num_decode == 0:  # prompts first, as in ``schedule``
                batch = self.scheduler.schedule_prompts_next()
            if batch is None and not inflight.prompts_only:
                batch = self.scheduler.schedule_next()
        if batch is not None:
            launched = self.launch(batch, inflight)
            touched = self.finish(inflight)
            # its decoding sequences could overlap last step, so they still can: only the admitted ones decide
            if all(map(self._needs_no_host_tokens, batch.sample_seqs[batch.num_decode:])):
                self.inflight = launched
                return touched
            return touched + self.finish(launched)
        touched = self.finish(inflight) if inflight is not None else []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            self.last_step = StepInfo(False, 0, 0, 0)
            finished = self.drain_finished()
            if not finished and not touched and self.scheduler.has_unfinished():
                raise RuntimeError(f"the scheduler made no progress (waiting={len(self.scheduler.waiting)}, "
                                   f"running={len(self.scheduler.running)}, free blocks="
                                   f"{self.scheduler.manager.num_free_blocks})")
            return touched + finished
        launched = self.launch(batch, None)
        if self.can_overlap(batch):
            self.inflight = launched
            return touched + self.drain_finished()
        return touched + self.finish(launched)

    def can_overlap(self, batch) -> bool:
        """Whether the next step may start before this one's tokens reach the host: a step of the
        single-process runner that leaves no prompt part-way and whose sequences need none of their tokens on
        the host to sample the next (no beams, penalties or min_tokens still to reach). A prefill step beside
        other running sequences is then followed only by more prompts (``Launched.prompts_only``)."""
        if batch.beam_seqs or not isinstance(self.runner, ModelRunner):
            return False
        if batch.is_prefill and not all(batch.logit_mask):
            return False
        return all(map(self._needs_no_host_tokens, batch.sample_seqs))

    @staticmethod
    def _needs_no_host_tokens(seq: Sequence) -> bool:
        """Whether ``seq`` samples its next token without its last one on the host (no penalties, min_tokens
        reached)."""
        return not seq.sampling_params.has_penalties and seq.num_output_tokens >= seq.sampling_params.min_tokens

    def launch(self, batch, previous: "Launched | None") -> "Launched":
        """Queue a step on the device: the model, then the sampler. ``previous``: the step still in flight whose
        sampled tokens are this (decode) step's inputs."""
        self.record_step_stats()
        pending_tokens = None
        num_pending = batch.num_decode if previous is not None else 0  # the decoding sequences' inputs
        if num_pending:
            tokens, before = previous.sample.tokens, previous.batch.sample_seqs
            decoding = batch.seqs[:num_pending]
            if decoding == before[:num_pending]:  # the usual case: the same sequences, the newest maybe gone
                pending_tokens = tokens[:num_pending]
            else:
                row_of = {id(seq): row for row, seq in enumerate(before)}
                pending_tokens = self._rows(tokens, [row_of[id(seq)] for seq in decoding])
        logits = self.runner.execute(self.runner.prepare(batch, pending_tokens))
        sample = None
        if batch.sample_seqs:
            sample = self.sampler.launch(self._rows(logits, batch.sample_rows), batch.sample_seqs,
                                         self.eos_token_ids, num_pending_rows=num_pending)
        beams = None
        if batch.beam_seqs:
            k = max(s.beam_group.search.num_candidates for s in batch.beam_seqs)
            beams = self.sampler.beam_candidates(logits[batch.beam_rows], k)
        num_decode = batch.num_decode
        num_tokens = num_decode + sum(s.num_scheduled_tokens for s in batch.seqs[num_decode:])
        self.last_step = StepInfo(batch.is_prefill, len(batch.seqs), num_tokens, 0, num_decode)
        prompts_only = num_decode == 0 and len(batch.sample_seqs) != len(self.scheduler.running)
        return Launched(batch, sample, beams, prompts_only)

    @staticmethod
    def _rows(logits: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """``logits[rows]`` (None: all), without a host sync: a slice when the rows are the first ones in order,
        else a gather whose index travels from page-locked memory (a copy from pageable memory would wait
        for the GPU to finish the work queued before it, the step in flight included)."""
        if rows is None or rows == list(range(len(rows))):
            return logits if rows is None else logits[:len(rows)]
        return logits.index_select(0, Sampler.to_device(rows, torch.int64, logits.device))

    def finish(self, launched: "Launched") -> list[Sequence]:
        """Wait for a launched step's tokens and process them."""
        batch = launched.batch
        out = self._sample_result(launched)
        live = [s.status is not FINISHED for s in batch.sample_seqs]  # those ended meanwhile get no token
        self.scheduler.postprocess(batch, out.token_ids, out.logprobs, launched.beams)
        if out.top_logprobs.count(None) != len(out.top_logprobs):  # some row asked for logprobs
            for seq, top, alive in zip(batch.sample_seqs, out.top_logprobs, live):
                if top is not None and alive:
                    seq.top_logprobs.append(top)
        self._check_stop_strings(batch.sample_seqs)
        self._num_sampled += sum(live)
        return [*batch.sample_seqs, *self.drain_finished()]

    def _sample_result(self, launched: "Launched"):
        """The sampler's choice for ``batch.sample_seqs``; a request whose logits are not finite ends with an
        error (naming why), and the others keep their tokens, drawn as usual."""
        batch = launched.batch
        seqs = batch.sample_seqs
        if launched.sample is None:
            return SamplerOutput([], [], [])
        try:
            return launched.sample.result()
        except SamplingError as e:
            bad = set(e.request_ids)
            for seq in seqs:
                if seq.request_id in bad:
                    self.scheduler.finish(seq, "error", str(e))
            keep = [i for i, s in enumerate(seqs) if s.request_id not in bad]
            batch.sample_seqs = [seqs[i] for i in keep]
            o = e.output
            return SamplerOutput([o.token_ids[i] for i in keep], [o.logprobs[i] for i in keep],
                                 [o.top_logprobs[i] for i in keep])

    def flush(self) -> list[Sequence]:
        """Process the step in flight, if any."""
        inflight, self.inflight = self.inflight, None
        return self.finish(inflight) if inflight is not None else []

    def _check_stop_strings(self, seqs: list[Sequence]) -> None:
        """End a request whose text now contains one of its stop strings; its text ends before it."""
        for seq in seqs:
            stops = seq.sampling_params.stop
            if not stops or self.tokenizer is None or seq.finish_reason == "error" or seq.stop_text_end is not None:
                continue
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            found = [i for i in (text.find(s) for s in stops) if i >= 0]
            if found:
                seq.stop_text_end = min(found)
                if seq.is_finished:
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")

    def drain_finished(self) -> list[Sequence]:
        """The sequences (and beam searches, into ``finished_beam_groups``) that ended since the last call."""
        finished, self.scheduler.finished = self.scheduler.finished, []
        self.finished_beam_groups += self.scheduler.finished_beam_groups
        self.scheduler.finished_beam_groups = []
        return finished

    def abort_all(self) -> None:
        self.inflight = None
        self.scheduler.abort_all()
        self.scheduler.finished = []
