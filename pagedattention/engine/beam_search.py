"""Beam search: the API of vLLM's ``LLM.beam_search``, the search and scoring of Hugging Face's ``generate``.

One search per prompt keeps ``beam_width`` running beams and at most ``beam_width`` finished hypotheses.
Each step (``BeamSearch.step``):

1. every running beam proposes every token; a candidate's score is the beam's ``cum_logprob`` plus the token's
   log-probability, and the best ``max(2, 1 + #eos) * beam_width`` candidates over all beams are kept, best first
   (more than ``beam_width``, so that enough of them continue even when the best ones end with EOS; they are
   among each beam's own best that many, which is all the engine copies to the host);
2. a candidate ending in EOS becomes a finished hypothesis if it ranks among the first ``beam_width``; its score
   is ``cum_logprob / num_generated_tokens ** length_penalty`` (EOS counted), and only the ``beam_width`` best
   finished hypotheses are kept;
3. the best ``beam_width`` candidates that did not end in EOS become the next running beams;
4. at the step that reaches ``max_tokens`` every one of the first ``beam_width`` candidates finishes.

The search stops after ``max_tokens`` steps, or earlier once ``beam_width`` hypotheses have finished and no
running beam could still beat the worst of them: a beam's score can at best reach
``cum_logprob / max_tokens ** length_penalty`` when ``length_penalty > 0`` (its log-probability only falls as
it grows) and ``cum_logprob / num_generated ** length_penalty`` otherwise. This is exactly Hugging Face's
``generate(num_beams=beam_width, do_sample=False, length_penalty=..., early_stopping="never")`` (with
``length_penalty=0`` its docstring's "canonical" beam search). vLLM's ``LLM.beam_search`` differs in details:
it always runs ``max_tokens`` steps, finishes every EOS candidate, and counts the prompt in the length.

``BeamSearch`` is pure. ``run_beam_search`` runs it in the engine: each beam is a sequence of the
``PagedAttentionManager``; a beam that several new beams extend is forked (all blocks shared, the last one
copied on its next write), a beam that none extends is freed. A prompt's search is admitted once its worst case
(``beam_width`` beams of ``prompt + max_tokens`` tokens, no sharing) fits beside the searches running, so a
search never waits for memory half-way; all beams of all running searches decode in one batch.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")


@dataclass
class BeamSearchSequence:
    """A hypothesis: its generated tokens (EOS included when it ended it), their summed log-probability."""
    token_ids: list[int]
    cum_logprob: float
    text: str = ""


@dataclass
class BeamSearchOutput:
    """The finished hypotheses of one prompt, best (highest length-penalised score) first."""
    sequences: list[BeamSearchSequence]


@dataclass(frozen=True)
class Candidate:
    """Running beam ``beam`` extended by ``token_id``; ``cum_logprob`` includes the new token."""
    beam: int
    token_id: int
    cum_logprob: float


def length_penalized_score(cum_logprob: float, num_tokens: int, length_penalty: float) -> float:
    return cum_logprob / num_tokens ** length_penalty


def top_candidates(cum_logprobs: torch.Tensor, logprobs: torch.Tensor, token_ids: torch.Tensor,
                   k: int) -> list[Candidate]:
    """The ``k`` best one-token extensions over all beams, best first.

    ``cum_logprobs`` float32 ``[num_beams]``; ``logprobs [num_beams, m]`` are the log-probabilities of the next
    tokens ``token_ids [num_beams, m]``: the whole vocabulary, or each beam's best ``m >= k`` tokens (the best k
    over all beams are among those). The sum is taken in float32, as Hugging Face does.
    """
    m = logprobs.shape[1]
    scores = (logprobs.float() + cum_logprobs.float()[:, None]).reshape(-1)
    values, flat = torch.topk(scores, k=min(k, scores.numel()))
    beams, tokens = (flat // m).tolist(), token_ids.reshape(-1)[flat].tolist()
    return [Candidate(b, t, v) for b, t, v in zip(beams, tokens, values.tolist())]


@dataclass
class BeamSearch:
    """The search for one prompt. ``beams`` start as one empty beam (the prompt itself)."""
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    eos_token_ids: frozenset[int] = frozenset()  # empty when EOS is ignored
    beams: list[BeamSearchSequence] = field(default_factory=lambda: [BeamSearchSequence([], 0.0)])
    finished: list[tuple[float, BeamSearchSequence]] = field(default_factory=list)  # (score, hyp), best first
    num_steps: int = 0
    done: bool = False

    @property
    def num_candidates(self) -> int:
        """Candidates a step ranks: enough that ``beam_width`` of them continue even if EOS ends the best."""
        return max(2, 1 + len(self.eos_token_ids)) * self.beam_width

    def step(self, logprobs: torch.Tensor, token_ids: torch.Tensor | None = None) -> list[Candidate]:
        """Advance by one token given ``logprobs [len(beams), vocab]``; returns the new running beams.

        Or given only each beam's best tokens: ``token_ids [len(beams), m]`` (``m >= num_candidates``) and
        their ``logprobs`` (the engine takes them for all searches at once). Each returned candidate names
        the index (in the old ``beams``) of the beam it extends; ``beams`` is replaced by the new ones in the
        same order. Sets ``done`` when the search is over (``beams`` is then empty).
        """
        if self.done:
            raise RuntimeError("the beam search is already done")
        if logprobs.dim() != 2 or logprobs.shape[0] != len(self.beams):
            raise ValueError(f"logprobs must be [{len(self.beams)}, vocab], got {list(logprobs.shape)}")
        keep = self.num_candidates
        if token_ids is None:
            logprobs, token_ids = torch.topk(logprobs.float(), min(keep, logprobs.shape[1]), dim=-1)
        elif token_ids.shape != logprobs.shape:
            raise ValueError(f"token_ids {list(token_ids.shape)} must have the shape of logprobs "
                             f"{list(logprobs.shape)}")
        self.num_steps += 1
        last_step = self.num_steps == self.max_tokens
        cum = torch.tensor([b.cum_logprob for b in self.beams], dtype=torch.float32, device=logprobs.device)
        running = []
        for rank, cand in enumerate(top_candidates(cum, logprobs, token_ids, keep)):
            ends = last_step or cand.token_id in self.eos_token_ids
            if ends and rank < self.beam_width:
                self._add_finished(cand)
            elif not ends and len(running) < self.beam_width:
                running.append(cand)
        self.beams = [BeamSearchSequence(self.beams[c.beam].token_ids + [c.token_id], c.cum_logprob)
                      for c in running]
        self.done = last_step or not running or not self._can_improve()
        if self.done:
            self.beams, running = [], []
        return running

    def results(self) -> list[BeamSearchSequence]:
        """Finished hypotheses, best first (at most ``beam_width``)."""
        return [hyp for _, hyp in self.finished]

    def _add_finished(self, cand: Candidate) -> None:
        hyp = BeamSearchSequence(self.beams[cand.beam].token_ids + [cand.token_id], cand.cum_logprob)
        score = length_penalized_score(cand.cum_logprob, len(hyp.token_ids), self.length_penalty)
        if len(self.finished) == self.beam_width and score <= self.finished[-1][0]:
            return
        # insert after equal scores so that earlier hypotheses win ties
        at = next((i for i, (s, _) in enumerate(self.finished) if s < score), len(self.finished))
        self.finished.insert(at, (score, hyp))
        del self.finished[self.beam_width:]

    def _can_improve(self) -> bool:
        """Could a running beam still finish with a better score than the worst kept hypothesis?"""
        if len(self.finished) < self.beam_width:
            return True
        best_cum = max(b.cum_logprob for b in self.beams)
        length = self.max_tokens if self.length_penalty > 0 else self.num_steps
        return length_penalized_score(best_cum, length, self.length_penalty) > self.finished[-1][0]


# --- in the engine -------------------------------------------------------------------------------------------

def run_beam_search(llm, requests: list[tuple[str | None, list[int]]], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Beam search for each ``(text, token ids)`` prompt on ``llm``'s model runner and KV cache."""
    from .sampling_params import SamplingParams
    from .scheduler import Scheduler, cdiv
    from .sequence import Sequence, SequenceStatus

    manager, runner, cache, config = llm.manager, llm.runner, llm.prefix_cache, llm.config
    bs, width = manager.block_size, params.beam_width
    eos = frozenset() if params.ignore_eos else frozenset(llm.eos_token_ids)
    searches, worst_case = [], []
    num_candidates = BeamSearch(width, params.max_tokens, eos_token_ids=eos).num_candidates
    for i, (_, ids) in enumerate(requests):
        max_tokens = min(params.max_tokens, llm.max_model_len - len(ids))
        searches.append(BeamSearch(width, max_tokens, params.length_penalty, eos))
        worst_case.append(width * cdiv(len(ids) + max_tokens - 1, bs))  # the last token's K/V is never needed
        if worst_case[-1] > manager.num_blocks:
            raise ValueError(f"prompts[{i}]: {width} beams of {len(ids)} + {max_tokens} tokens may need "
                             f"{worst_case[-1]} KV blocks, the cache has {manager.num_blocks}")

    def make_room(num_blocks: int, keep=()) -> None:
        if manager.num_free_blocks < num_blocks and cache is not None:
            cache.evict(num_blocks - manager.num_free_blocks, keep=keep)

    def free(seq) -> None:
        table = manager.block_table(seq.seq_id)
        manager.free_sequence(seq.seq_id)
        if cache is not None:
            cache.release(table)

    greedy = SamplingParams(temperature=0.0)  # unused: beams are chosen here, not sampled
    pending, active, prefilling = deque(range(len(requests))), {}, []  # active: search -> its beams' sequences
    reserved, outputs = 0, [None] * len(requests)
    bar = tqdm(total=len(requests), desc="Beam search", dynamic_ncols=True, disable=not use_tqdm)
    try:
        while pending or active:
            while pending:  # admit searches whose worst case fits
                i = pending[0]
                num_beams = sum(map(len, active.values()))
                fits = reserved + worst_case[i] <= manager.num_blocks and num_beams + width <= config.max_num_seqs
                if active and not fits:
                    break
                pending.popleft()
                ids = requests[i][1]
                seq = Sequence(ids, greedy, request_id=str(i), device=config.device)
                cached = cache.match(ids) if cache is not None else []
                make_room(cdiv(len(ids), bs) - len(cached), keep=cached)
                manager.add_sequence(seq.seq_id, len(ids), shared_blocks=cached)
                if cached:
                    cache.acquire(cached)
                seq.status, seq.prefill_end = SequenceStatus.RUNNING, len(ids)
                seq.num_computed_tokens = len(cached) * bs
                active[i], reserved = [seq], reserved + worst_case[i]
                prefilling.append(seq)
            search_of = {seq.seq_id: i for i, seqs in active.items() for seq in seqs}
            if prefilling:  # prompts first, in chunks within the token budget
                step, budget = [], config.max_num_batched_tokens
                for seq in prefilling:
                    if budget == 0:
                        break
                    seq.num_scheduled_tokens = min(seq.num_uncomputed_prefill_tokens, budget)
                    budget -= seq.num_scheduled_tokens
                    step.append(seq)
            else:  # every beam of every running search advances by one token
                step = [seq for seqs in active.values() for seq in seqs]
                for seq in step:
                    make_room(manager.blocks_needed_to_append(seq.seq_id))
                    manager.append_token(seq.seq_id)
                    seq.num_scheduled_tokens = 1
            llm.record_step_stats([seq for seqs in active.values() for seq in seqs])
            logits = runner.run(step, is_prefill=bool(prefilling))
            sampled = [seq for seq in step if Scheduler.samples(seq)]
            for seq in step:
                seq.num_computed_tokens += seq.num_scheduled_tokens
                seq.num_scheduled_tokens = 0
                if prefilling and cache is not None:
                    cache.insert(seq.token_ids[:seq.num_computed_tokens], manager.block_table(seq.seq_id))
            prefilling = [seq for seq in prefilling if seq.is_prefilling]
            # each beam's best next tokens, for all searches at once: one top-k and one copy to the host
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, tokens = (t.cpu() for t in torch.topk(logprobs, min(num_candidates, logprobs.shape[1]), dim=-1))
            rows_of: dict[int, list[int]] = {}
            for row, seq in enumerate(sampled):
                rows_of.setdefault(search_of[seq.seq_id], []).append(row)
            for i, rows in rows_of.items():
                search = searches[i]
                active[i] = _advance(manager, free, active[i], search.step(values[rows], tokens[rows]))
                if search.done:
                    for seq in active.pop(i):
                        free(seq)
                    reserved -= worst_case[i]
                    outputs[i] = BeamSearchOutput([_with_text(llm.tokenizer, h) for h in search.results()])
                    bar.update(1)
    finally:
        for seq in (seq for seqs in active.values() for seq in seqs):
            free(seq)
        bar.close()
    return outputs


def _advance(manager, free, seqs: list, candidates: list[Candidate]) -> list:
    """The sequences of the new beams: a beam's first extension continues in its sequence, each further one in
    a fork of it; beams without an extension are freed."""
    new, extended = [], set()
    for cand in candidates:
        parent = seqs[cand.beam]
        if cand.beam in extended:
            child = parent.fork(len(new))
            manager.fork_sequence(parent.seq_id, child.seq_id)
            new.append(child)
        else:
            extended.add(cand.beam)
            new.append(parent)
    for beam, seq in enumerate(seqs):
        if beam not in extended:
            free(seq)
    for seq, cand in zip(new, candidates):  # after the forks, which copy the parent's tokens so far
        seq.token_ids.append(cand.token_id)
    return new


def _with_text(tokenizer, hyp: BeamSearchSequence) -> BeamSearchSequence:
    text = tokenizer.decode(hyp.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return BeamSearchSequence(hyp.token_ids, hyp.cum_logprob, text)
