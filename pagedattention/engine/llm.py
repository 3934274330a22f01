"""The user-facing engine (vLLM's offline ``LLM``): ``LLM(...).generate(prompts, sampling_params)``.

Each step: the scheduler picks the sequences (a prefill or a decode batch), the model runner turns them
into tensors and returns logits, the sampler picks tokens, and the scheduler appends them, stops
finished requests and frees their blocks.

Sharing KV blocks: ``enable_prefix_caching`` reuses cached full blocks of equal prompt prefixes,
``SamplingParams(n=...)`` forks a prompt's sequence into n after its prefill, and ``beam_search`` forks and
frees beams (beam_search.py); ``stats()`` tells what the sharing saved.
"""
from __future__ import annotations

import itertools
import numbers
import time

import torch
from tqdm.auto import tqdm

from .beam_search import BeamSearchOutput, BeamSearchParams, run_beam_search
from .config import EngineConfig
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .prefix_cache import PrefixCache
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .stats import EngineStats


class LLM:
    """An inference engine over a paged KV cache with continuous batching.

    model: a Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3), None for the embedded tiny
    model (random weights, byte tokenizer), or a ``ModelConfig`` for random weights of that shape.
    See ``EngineConfig`` for the other arguments.
    """

    def __init__(self, model=None, *, dtype="auto", device="auto", block_size: int = 16,
                 gpu_memory_utilization: float = 0.9, num_kv_blocks: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False, seed: int = 0,
                 scheduling: str = "continuous", enable_prefix_caching: bool = False):
        self.config = EngineConfig(
            model=model, dtype=dtype, device=device, block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization, num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, attention_backend=attention_backend, enforce_eager=enforce_eager,
            seed=seed, scheduling=scheduling, enable_prefix_caching=enable_prefix_caching)
        self.runner = ModelRunner(self.config)
        self.tokenizer = self.runner.tokenizer
        self.model_config = self.runner.model_config
        self.manager = self.runner.manager
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.prefix_cache = PrefixCache(self.manager.block_manager, block_size) if enable_prefix_caching else None
        self.scheduler = Scheduler(
            self.manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids, scheduling=scheduling,
            prefix_cache=self.prefix_cache)
        self._stats = EngineStats(self.manager.bytes_per_block)
        self.sampler = Sampler(self.config.device, seed=seed)
        self._request_ids = itertools.count()

    # --- the API -------------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; returns one RequestOutput per prompt, in prompt order.

        prompts: a string, a list of token ids, or a list of either. sampling_params: one SamplingParams
        for all prompts, a list with one per prompt, or None for the defaults. Bad input raises
        TypeError/ValueError before anything runs.
        """
        requests = self._parse_prompts(prompts)
        params = self._parse_sampling_params(sampling_params, len(requests))
        for i, p in enumerate(params):
            if p.n > self.config.max_num_seqs:  # its n sequences could never run together
                raise ValueError(f"sampling_params.n={p.n} (prompts[{i}]) exceeds "
                                 f"max_num_seqs={self.config.max_num_seqs}")
        seqs = [Sequence(ids, p, request_id=str(next(self._request_ids)), prompt=text, device=self.config.device)
                for (text, ids), p in zip(requests, params)]
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            self._run(len(seqs), use_tqdm)
        except BaseException:
            self._abort_all()  # leave the engine usable: no sequence queued, no block held
            raise
        return [self._request_output(seq) for seq in seqs]

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search for every prompt (vLLM's ``LLM.beam_search``); one BeamSearchOutput per prompt.

        Beams share their KV blocks: a beam extended by several tokens is forked, a dropped beam is freed.
        """
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if params.beam_width > self.config.max_num_seqs:
            raise ValueError(f"beam_width={params.beam_width} exceeds max_num_seqs={self.config.max_num_seqs}")
        requests = self._parse_prompts(prompts)
        if self.scheduler.has_unfinished():
            raise RuntimeError("beam_search cannot run while generate requests are in flight")
        try:
            return run_beam_search(self, requests, params, use_tqdm)
        except BaseException:
            self._abort_all()
            raise

    def stats(self) -> EngineStats:
        """Sharing statistics since the engine was built (or ``reset_stats``): KV blocks held vs. what no sharing
        would hold, per step, and prefix-cache hits."""
        stats = EngineStats(**self._stats.__dict__)
        if self.prefix_cache is not None:
            cache = self.prefix_cache.stats
            stats.prefix_cache_queries = cache.queries
            stats.prefix_cache_query_tokens = cache.query_tokens
            stats.prefix_cache_hit_tokens = cache.hit_tokens
        return stats

    def reset_stats(self) -> None:
        self._stats = EngineStats(self.manager.bytes_per_block)
        if self.prefix_cache is not None:
            self.prefix_cache.stats = type(self.prefix_cache.stats)()

    def reset_prefix_cache(self) -> None:
        """Drop every cached block (those no sequence uses become free)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def record_step_stats(self, seqs=None) -> None:
        """Blocks held by ``seqs`` (the step's sequences, after its allocations) vs. held without sharing.

        ``None``: every sequence the manager holds (in a ``generate`` step, the running ones), whose block
        table lengths the manager keeps summed, so a step costs O(1) rather than a pass over the batch.
        """
        if seqs is None:
            unshared = self.manager.num_table_entries
        else:
            bs = self.manager.block_size
            unshared = sum(-(-self.manager.context_len(s.seq_id) // bs)
                           for s in seqs if self.manager.has_sequence(s.seq_id))
        held = self.manager.num_blocks - self.manager.num_free_blocks
        if self.prefix_cache is not None:
            held -= self.prefix_cache.num_evictable  # cached blocks that no sequence holds
        self._stats.record_step(held, unshared)

    # --- the loop ------------------------------------------------------------------------------------

    def step(self) -> int:
        """One scheduled step; returns the number of tokens sampled."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if not self.scheduler.finished and self.scheduler.has_unfinished():
                raise RuntimeError(f"the scheduler made no progress (waiting={len(self.scheduler.waiting)}, "
                                   f"running={len(self.scheduler.running)}, free blocks="
                                   f"{self.manager.num_free_blocks})")
            return 0
        self.record_step_stats()  # the running sequences are those the manager holds
        logits = self.runner.run(batch.seqs, batch.is_prefill)
        child_rows = self.scheduler.fork(batch) if batch.is_prefill else []
        if child_rows:  # each child samples its own first token from its parent's logits
            logits = torch.cat([logits, logits[child_rows]])
        # every sequence of a decode step samples; in a prefill step those whose prompt ends
        sampling = [seq for seq in batch.seqs if Scheduler.samples(seq)] if batch.is_prefill else batch.seqs
        token_ids, logprobs = self.sampler(logits, sampling, self.eos_token_ids) if sampling else ([], [])
        self.scheduler.postprocess(batch, token_ids, logprobs)
        return len(token_ids)

    def _run(self, num_requests: int, use_tqdm: bool) -> None:
        bar = tqdm(total=num_requests, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, num_output_tokens = time.perf_counter(), 0
        while self.scheduler.has_unfinished():
            sampled = self.step()
            num_output_tokens += sampled
            finished, self.scheduler.finished = self.scheduler.finished, []
            done = {id(seq.group): seq for seq in finished if seq.request_finished}
            if done:
                bar.update(len(done))
            bar.set_postfix_str(f"output {num_output_tokens / (time.perf_counter() - start):.0f} tok/s",
                                refresh=False)
        self.scheduler.finished = []
        bar.close()

    def _abort_all(self) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if self.manager.has_sequence(seq.seq_id):
                self.scheduler.free(seq)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.scheduler.finished = []

    def _request_output(self, seq: Sequence) -> RequestOutput:
        """The request of ``seq`` (its first sequence): one CompletionOutput per sequence of its group."""
        group = sorted(seq.group, key=lambda s: s.index)
        if len(group) < seq.sampling_params.n:  # it failed before forking: every completion carries the error
            group = [group[0]] * seq.sampling_params.n
        outputs = []
        for index, s in enumerate(group):
            ids = s.output_token_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
            outputs.append(CompletionOutput(index=index, text=text, token_ids=ids,
                                            cumulative_logprob=s.cumulative_logprob, finish_reason=s.finish_reason,
                                            error=s.error))
        return RequestOutput(request_id=seq.request_id, prompt=seq.prompt,
                             prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens], outputs=outputs,
                             finished=seq.request_finished, metrics=self._request_metrics(group))

    @staticmethod
    def _request_metrics(group: list[Sequence]):
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

    # --- input checks (all before anything runs) ----------------------------------------------------

    def _parse_prompts(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(_is_token_id(t) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a list of token ids, or a list of those; "
                            f"got {type(prompts).__name__}")
        return [self._parse_prompt(i, p) for i, p in enumerate(prompts)]

    def _parse_prompt(self, i: int, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:  # a tokenizer may still emit BOS for it, but there is nothing to continue
                raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one character or token")
            if self.tokenizer is None:
                raise TypeError(f"prompts[{i}] is text but this model has no tokenizer; pass token ids")
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, (list, tuple)):
            bad = next((t for t in prompt if not _is_token_id(t)), None)
            if bad is not None:
                raise TypeError(f"prompts[{i}] must hold int token ids, found {type(bad).__name__} {bad!r}")
            text, ids = None, [int(t) for t in prompt]
        else:
            raise TypeError(f"prompts[{i}] must be a str or a list of int token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompts[{i}] has token id {bad} outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens; max_model_len={self.max_model_len} leaves no "
                             f"room for a generated token")
        return text, ids

    @staticmethod
    def _parse_sampling_params(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for {n} prompts")
            for i, p in enumerate(sampling_params):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
            return list(sampling_params)
        raise TypeError(f"sampling_params must be a SamplingParams, a list of them, or None; "
                        f"got {type(sampling_params).__name__}")


def _is_token_id(t) -> bool:
    return type(t) is int or (isinstance(t, numbers.Integral) and not isinstance(t, bool))
