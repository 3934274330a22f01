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

``BeamSearch`` is pure. In the engine a search is a ``BeamGroup`` that the same scheduler as ``generate`` runs
(scheduler.py), so beams share batches with other requests: each beam is a sequence of the
``PagedAttentionManager``; a beam that several new beams extend is forked (all blocks shared, the last one
copied on its next write), a beam that none extends is freed. A prompt's search is admitted once its worst case
(``beam_width`` beams of ``prompt + max_tokens`` tokens, no sharing) fits beside the searches running, so a
search never waits for memory half-way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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

@dataclass(eq=False)
class BeamGroup:
    """A beam-search request inside the scheduler: its search and the sequences of its running beams, in the
    order of ``search.beams``. Its first sequence is the prompt; ``advance`` forks and drops sequences."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    search: BeamSearch
    worst_case_blocks: int   # beam_width beams of prompt + max_tokens tokens, no sharing
    seqs: list = field(default_factory=list)

    def advance(self, candidates: list[Candidate]) -> tuple[list, list]:
        """The sequences of the new beams (``candidates``, from ``search.step``): a beam's first extension
        continues in its sequence, each further one in a new fork of it (``parent_seq_id`` set; its blocks are
        the scheduler's business). Returns (new beams, beams that none extends)."""
        new, extended = [], set()
        for cand in candidates:
            parent = self.seqs[cand.beam]
            if cand.beam in extended:
                child = parent.fork(len(new))
                child.parent_seq_id = parent.seq_id
                new.append(child)
            else:
                extended.add(cand.beam)
                new.append(parent)
        dropped = [seq for beam, seq in enumerate(self.seqs) if beam not in extended]
        for seq, cand in zip(new, candidates):  # after the forks, which copy the parent's tokens so far
            seq.token_ids.append(cand.token_id)
        self.seqs = new
        return new, dropped

    def output(self, tokenizer) -> BeamSearchOutput:
        return BeamSearchOutput([_with_text(tokenizer, h) for h in self.search.results()])


def _with_text(tokenizer, hyp: BeamSearchSequence) -> BeamSearchSequence:
    text = tokenizer.decode(hyp.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return BeamSearchSequence(hyp.token_ids, hyp.cum_logprob, text)
