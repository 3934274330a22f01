"""What ``LLM.generate`` returns: one ``RequestOutput`` per prompt (vLLM's shape)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated continuation.

    finish_reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or max_model_len),
    "abort" (``LLM.abort_request``) or "error" (then ``error`` says why, e.g. the request cannot fit in the KV
    cache even alone). ``text`` ends before a stop string; ``token_ids`` keep the token that completed it.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str | None
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} of the top-N and the chosen


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



def request_output(seq, tokenizer, delta: bool = False) -> RequestOutput:
    """The request of ``seq`` (its first sequence) so far: one CompletionOutput per sequence of its group.
    ``delta``: only the tokens, text and logprobs new since the last delta report."""
    group = sorted(seq.group, key=lambda s: s.index)
    if len(group) < seq.sampling_params.n:  # it ended before forking: every completion carries its end
        group = [group[0]] * seq.sampling_params.n
    outputs = [completion_output(index, s, tokenizer, delta) for index, s in enumerate(group)]
    return RequestOutput(request_id=seq.request_id, prompt=seq.prompt,
                         prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens], outputs=outputs,
                         finished=seq.request_finished, metrics=request_metrics(group))


def completion_output(index: int, seq, tokenizer, delta: bool) -> CompletionOutput:
    text, token_ids, logprobs = completion_text(seq, tokenizer), seq.output_token_ids, seq.top_logprobs
    if delta:
        tokens_before, text_before = seq.reported
        seq.reported = (len(token_ids), len(text))
        text, token_ids = text[text_before:], token_ids[tokens_before:]
        logprobs = None if logprobs is None else logprobs[tokens_before:]
    return CompletionOutput(index=index, text=text, token_ids=token_ids, cumulative_logprob=seq.cumulative_logprob,
                            finish_reason=seq.finish_reason, error=seq.error, logprobs=logprobs)


def completion_text(seq, tokenizer) -> str:
    if tokenizer is None:
        return ""
    text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    return text if seq.stop_text_end is None else text[:seq.stop_text_end]


def request_metrics(group) -> RequestMetrics:
    """One sequence's metrics as they are; for n > 1: first token of any, finish of the last."""
    if len(group) == 1:
        return group[0].metrics
    metrics = RequestMetrics(arrival_time=group[0].metrics.arrival_time)
    firsts = [s.metrics.first_token_time for s in group if s.metrics.first_token_time is not None]
    metrics.first_token_time = min(firsts) if firsts else None
    finishes = [s.metrics.finish_time for s in group if s.metrics.finish_time is not None]
    if finishes:
        metrics.finish(max(finishes), max(s.num_output_tokens for s in group))
    return metrics
