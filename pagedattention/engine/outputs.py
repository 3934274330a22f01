"""What ``LLM.generate`` returns: one ``RequestOutput`` per prompt (vLLM's shape)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated continuation.

    finish_reason: "stop" (EOS or a stop token), "length" (max_tokens or max_model_len) or "error"
    (then ``error`` says why, e.g. the request cannot fit in the KV cache even alone).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str | None
    error: str | None = None


@dataclass
class RequestMetrics:
    """One request's timeline in ``time.perf_counter`` seconds.

    time_to_first_token = first_token_time - arrival_time; time_per_output_token is vLLM's TPOT,
    (finish_time - first_token_time) / (output tokens - 1), 0.0 for a single token.
    """

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    time_to_first_token: float | None = None
    time_per_output_token: float | None = None

    def finish(self, now: float, num_output_tokens: int) -> None:
        self.finish_time = now
        if self.first_token_time is not None:
            self.time_to_first_token = self.first_token_time - self.arrival_time
            gaps = num_output_tokens - 1
            self.time_per_output_token = (now - self.first_token_time) / gaps if gaps > 0 else 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = field(default=None, repr=False)

