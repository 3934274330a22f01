"""Prometheus metrics in the text exposition format, written by hand (it is small; no extra dependency).

Gauges come from the engine's state after its last step (``EngineSnapshot``); counters and the latency
histograms are updated by the server as requests finish. Everything is read and written on the event
loop's thread, so nothing here needs a lock.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

PREFIX = "pagedattention_"
# seconds; TTFT spans a queue wait, TPOT one decode step
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


@dataclass
class EngineSnapshot:
    """The engine's state after its last step (or its last add/abort), published by the engine thread."""
    num_running_seqs: int = 0
    num_waiting_seqs: int = 0
    num_kv_blocks: int = 0
    num_kv_blocks_used: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0     # prompts of the requests that reached their first output
    num_generated_tokens: int = 0  # every token sampled, aborted requests' included


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for le, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class ServerMetrics:
    def __init__(self):
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.time_per_output_token = Histogram(TPOT_BUCKETS)
        self.e2e_request_latency = Histogram(E2E_BUCKETS)
        self.requests_finished: dict[str, int] = {}  # by finish reason
        self.requests_aborted = 0
        self.requests_rejected = 0

    def record_finished(self, finish_reason: str, ttft: float | None, tpot: float | None, e2e: float) -> None:
        self.requests_finished[finish_reason] = self.requests_finished.get(finish_reason, 0) + 1
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        if tpot is not None:
            self.time_per_output_token.observe(tpot)
        self.e2e_request_latency.observe(e2e)

    def render(self, engine: EngineSnapshot, num_in_flight: int) -> str:
        lines: list[str] = []

        def metric(name, kind, help, samples):
            lines.append(f"# HELP {PREFIX}{name} {help}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            lines.extend(f"{PREFIX}{name}{sample}" for sample in samples)

        hit_rate = (engine.prefix_cache_hit_tokens / engine.prefix_cache_query_tokens
                    if engine.prefix_cache_query_tokens else 0.0)
        usage = engine.num_kv_blocks_used / engine.num_kv_blocks if engine.num_kv_blocks else 0.0
        metric("num_requests_running", "gauge", "Sequences in the running batch (a request with n=k counts k).",
               [f" {engine.num_running_seqs}"])
        metric("num_requests_waiting", "gauge", "Sequences waiting to be scheduled (queued or preempted).",
               [f" {engine.num_waiting_seqs}"])
        metric("num_requests_in_flight", "gauge", "HTTP requests accepted and not yet answered.",
               [f" {num_in_flight}"])
        metric("kv_blocks_used", "gauge", "KV cache blocks held by requests.", [f" {engine.num_kv_blocks_used}"])
        metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.", [f" {engine.num_kv_blocks}"])
        metric("kv_cache_usage_ratio", "gauge", "Share of KV cache blocks held by requests.", [f" {usage!r}"])
        metric("prefix_cache_hit_rate", "gauge", "Share of looked-up prompt tokens found in the prefix cache.",
               [f" {hit_rate!r}"])
        metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [f" {engine.prefix_cache_query_tokens}"])
        metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
               [f" {engine.prefix_cache_hit_tokens}"])
        metric("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
               [f" {engine.num_preemptions}"])
        metric("request_success_total", "counter", "Requests finished, by finish reason.",
               [f'{{finished_reason="{r}"}} {n}' for r, n in sorted(self.requests_finished.items())])
        metric("request_aborted_total", "counter", "Requests aborted (the client disconnected).",
               [f" {self.requests_aborted}"])
        metric("request_rejected_total", "counter", "Requests refused with 503 (queue full or shutting down).",
               [f" {self.requests_rejected}"])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [f" {engine.num_prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Tokens generated (aborted requests' included).",
               [f" {engine.num_generated_tokens}"])
        for name, help, hist in (
                ("time_to_first_token_seconds", "Arrival to first token, per request.", self.time_to_first_token),
                ("time_per_output_token_seconds", "Mean time between a request's tokens after its first.",
                 self.time_per_output_token),
                ("e2e_request_latency_seconds", "Arrival to the last token, per request.", self.e2e_request_latency)):
            lines.append(f"# HELP {PREFIX}{name} {help}")
            lines.append(f"# TYPE {PREFIX}{name} histogram")
            lines.extend(hist.lines(PREFIX + name))
        return "\n".join(lines) + "\n"
