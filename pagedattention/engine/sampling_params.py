"""How one request's tokens are chosen and when it stops (the vLLM ``SamplingParams`` subset we support)."""
from __future__ import annotations

from dataclasses import dataclass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Per-request sampling settings, checked when built.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    top_p: keep the smallest set of tokens whose probability adds up to at least top_p (1.0 = all).
    top_k: keep the k most likely tokens (-1 or 0 = all).
    max_tokens: new tokens to generate at most. min_tokens: EOS and stop tokens are masked until this many.
    stop_token_ids: extra token ids that end the request (the stop token is kept in the output ids).
    ignore_eos: keep generating past EOS (benchmarks). seed: a private random stream for this request, so its
    tokens do not depend on what else is in the batch.
    n: completions per prompt (parallel sampling): after the prompt's prefill the sequence is forked into n
    sequences that share the prompt's KV blocks; completion i draws from its own stream seeded with seed + i.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1

    def __post_init__(self):
        if not _is_number(self.temperature):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_number(self.top_p):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive int, got {self.top_k}")
        if not _is_int(self.max_tokens):
            raise TypeError(f"max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not _is_int(self.min_tokens):
            raise TypeError(f"min_tokens must be an int, got {type(self.min_tokens).__name__}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) for t in self.stop_token_ids):
                raise TypeError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
            if any(t < 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
            self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if not _is_int(self.n):
            raise TypeError(f"n must be an int, got {type(self.n).__name__}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
