"""A request inside the engine: its tokens, how many are in the KV cache, and its life cycle.

The KV cache blocks themselves belong to ``PagedAttentionManager`` (keyed by ``seq_id``); a Sequence only
counts how far its prefill has got (``num_computed_tokens``) and how far this step takes it
(``num_scheduled_tokens``).
"""
from __future__ import annotations

import enum
import itertools
import time

import torch

from .outputs import RequestMetrics
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()   # queued, holds no blocks (new, or preempted and to be recomputed)
    RUNNING = enum.auto()   # holds blocks; prefilling (maybe in chunks) or decoding
    FINISHED = enum.auto()  # blocks freed; finish_reason set


FINISHED = SequenceStatus.FINISHED  # for per-row tests: a module name reads faster than the enum class's attribute


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], sampling_params: SamplingParams, *,
                 request_id: str | None = None, prompt: str | None = None, device: str | torch.device = "cpu"):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.sampling_params = sampling_params
        self.token_ids = list(prompt_token_ids)          # prompt, then generated tokens
        self.num_prompt_tokens = len(self.token_ids)
        # tokens when max_tokens ends it (its scheduler lowers it to max_model_len where that comes first)
        self.max_len = self.num_prompt_tokens + sampling_params.max_tokens
        self.stop_ids: frozenset[int] = frozenset()  # the token ids that end it (its scheduler sets them)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0     # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0    # tokens this step feeds the model (a prefill chunk, or 1 to decode)
        self.prefill_end = 0             # len(token_ids) when last admitted: the prefill computes up to here
        self.num_preemptions = 0
        self.cumulative_logprob = 0.0
        # SamplingParams.logprobs: {token id: logprob} per generated token; stop strings: where the text ends
        self.top_logprobs: list[dict[int, float]] | None = [] if sampling_params.logprobs is not None else None
        self.stop_text_end: int | None = None
        self.reported = (0, 0)  # output tokens and characters of text a "delta" report has given out
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        self.device = device
        # Parallel sampling: completion `index` of its request; `group` lists the request's sequences (shared by
        # all of them); the first one forks the others when its prefill ends.
        self.index = 0
        self.group = [self]
        self.pending_forks = sampling_params.n - 1
        # Beam search: the request's BeamGroup (beam_search.py), shared by its beams; a new beam names the
        # sequence it was forked from until the scheduler has forked its blocks.
        self.beam_group = None
        self.parent_seq_id = None
        # A private random stream makes a seeded request's tokens independent of its batch-mates.
        self.generator = self._generator(sampling_params.seed)

    def _generator(self, seed: int | None):
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed + self.index)

    def fork(self, index: int) -> "Sequence":
        """Completion ``index`` of the same request, at the same point: same tokens, same progress.

        Its KV blocks are the caller's business (``PagedAttentionManager.fork_sequence``).
        """
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id = next(Sequence._ids)
        child.token_ids = list(self.token_ids)
        child.top_logprobs = None if self.top_logprobs is None else list(self.top_logprobs)
        child.metrics = RequestMetrics(arrival_time=self.metrics.arrival_time,
                                       first_token_time=self.metrics.first_token_time)
        child.index = index
        child.pending_forks = 0
        child.generator = child._generator(self.sampling_params.seed)
        self.group.append(child)
        return child

    @property
    def num_seats(self) -> int:
        """Sequences this one stands for in the batch cap: its fork children, or its search's beams."""
        if self.beam_group is not None and self.num_output_tokens == 0:
            return self.beam_group.search.beam_width
        return 1 + self.pending_forks

    @property
    def request_finished(self) -> bool:
        """Whether every completion of this sequence's request has finished."""
        return all(s.is_finished for s in self.group) and (self.group[0].pending_forks == 0
                                                          or self.group[0].finish_reason == "error")

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, outputs={self.num_output_tokens})")

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefilling(self) -> bool:
        """True while the tokens present at admission are not all in the cache yet.

        A new request prefills its prompt; a preempted one recomputes prompt + generated tokens. Once the
        prefill is done the cache always holds all tokens but the last sampled one, which the next decode
        step writes.
        """
        return self.num_computed_tokens < self.prefill_end

    @property
    def num_uncomputed_prefill_tokens(self) -> int:
        return self.prefill_end - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is FINISHED

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.perf_counter()
