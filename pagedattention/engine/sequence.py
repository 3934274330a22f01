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
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0     # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0    # tokens this step feeds the model (a prefill chunk, or 1 to decode)
        self.prefill_end = 0             # len(token_ids) when last admitted: the prefill computes up to here
        self.num_preemptions = 0
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        # A private random stream makes a seeded request's tokens independent of its batch-mates.
        self.generator = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sampling_params.seed)

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
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.perf_counter()
