"""How one request's tokens are chosen and when it stops (the vLLM ``SamplingParams`` subset we support)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

# Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS). Dividing float32 logits by a smaller
# temperature can overflow to inf, and softmax turns inf into NaN; from 1e-5 up the quotient stays finite
# for any logit below 3e33 and the distribution is already a point mass in practice.
GREEDY_TEMPERATURE_BELOW = 1e-5
MAX_LOGPROBS = 20  # top log-probabilities per token, as OpenAI allows
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as OpenAI allows
# torch.Generator.manual_seed takes any int in [-2**63, 2**64 - 1]; completion i of a request uses seed + i.
MIN_SEED, MAX_SEED = -(2 ** 63), 2 ** 64 - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(name: str, value) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _int(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, checked and normalised when built; immutable afterwards (derive a
    variant with ``dataclasses.replace``, which checks again).

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling. Values below
    1e-5 are greedy too (stored as 0.0).
    top_p: keep the smallest set of tokens whose probability adds up to at least top_p (1.0 = all).
    top_k: keep the k most likely tokens (-1 or 0 = all).
    max_tokens: new tokens to generate at most. min_tokens: EOS and stop tokens are masked until this many.
    stop_token_ids: extra token ids that end the request (the stop token is kept in the output ids); a tuple.
    stop: strings that end the request (the text is cut before the stop string); a tuple of non-empty strings.
    ignore_eos: keep generating past EOS (benchmarks). seed: a private random stream for this request, so its
    tokens do not depend on what else is in the batch.
    n: completions per prompt (parallel sampling): after the prompt's prefill the sequence is forked into n
    sequences that share the prompt's KV blocks; completion i draws from its own stream seeded with seed + i.
    logprobs: None, or return for every generated token the log-probabilities of the ``logprobs`` (0..20)
    most likely tokens and of the chosen one.
    presence_penalty, frequency_penalty: in [-2, 2], OpenAI's definitions over the tokens generated so far:
    logits[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t], before temperature.
    output_kind: what ``LLM.step`` reports of the request, as vLLM's RequestOutputKind: "cumulative" (every step,
    all tokens and text so far), "delta" (every step, only what is new since the last report) or "final_only"
    (once, when it ends; the cheapest for batch jobs). ``generate`` always returns the whole output.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | tuple[str, ...] | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    output_kind: str = "cumulative"

    def __post_init__(self):
        set_ = object.__setattr__  # the dataclass is frozen: normalised values are stored this way, here only
        temperature = _number("temperature", self.temperature)
        if temperature < 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        set_(self, "temperature", 0.0 if temperature < GREEDY_TEMPERATURE_BELOW else temperature)
        top_p = _number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        set_(self, "top_p", top_p)
        if _int("top_k", self.top_k) < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive int, got {self.top_k}")
        if _int("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= _int("min_tokens", self.min_tokens) <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        set_(self, "stop_token_ids", self._token_ids(self.stop_token_ids))
        set_(self, "stop", self._stop_strings(self.stop))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        if _int("n", self.n) < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
            if not MIN_SEED <= self.seed <= MAX_SEED - (self.n - 1):
                raise ValueError(f"seed must be in [-2**63, 2**64 - n] (completion i uses seed + i, n={self.n}), "
                                 f"got {self.seed}")
        if self.logprobs is not None and not 0 <= _int("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
            set_(self, name, value)
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")

    @staticmethod
    def _token_ids(ids) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise TypeError(f"stop_token_ids must be a list of ints, got {ids!r}")
        if any(t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {list(ids)}")
        return tuple(ids)

    @staticmethod
    def _stop_strings(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        strings = (stop,) if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
            raise TypeError(f"stop must be a str, a list of str or None, got {stop!r}")
        if not all(strings):
            raise ValueError(f"stop strings must be non-empty, got {list(strings)}")
        return tuple(strings)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @cached_property
    def plain(self) -> bool:
        """No top-k/top-p filter, penalty or top-N logprobs: the one-pass sampling kernel serves it (a top_k at
        least the vocabulary's size filters nothing either, but that takes the vocabulary to know)."""
        return self.logprobs is None and not self.has_penalties and self.top_p == 1.0 and self.top_k <= 0
