"""The user-facing engine (vLLM's offline ``LLM``): ``LLM(...).generate(prompts, sampling_params)``.

Each step: the scheduler picks the sequences (a prefill or a decode batch), the model runner turns them
into tensors and returns logits, the sampler picks tokens, and the scheduler appends them, stops
finished requests and frees their blocks.
"""
from __future__ import annotations

import itertools
import numbers
import time

from tqdm.auto import tqdm

from .config import EngineConfig
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


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
                 scheduling: str = "continuous"):
        self.config = EngineConfig(
            model=model, dtype=dtype, device=device, block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization, num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, attention_backend=attention_backend, enforce_eager=enforce_eager,
            seed=seed, scheduling=scheduling)
        self.runner = ModelRunner(self.config)
        self.tokenizer = self.runner.tokenizer
        self.model_config = self.runner.model_config
        self.manager = self.runner.manager
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(
            self.manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids, scheduling=scheduling)
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
        logits = self.runner.run(batch.seqs, batch.is_prefill)
        sampling = [seq for seq in batch.seqs if Scheduler.samples(seq)]
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
            if finished:
                bar.update(len(finished))
            bar.set_postfix_str(f"output {num_output_tokens / (time.perf_counter() - start):.0f} tok/s",
                                refresh=False)
        self.scheduler.finished = []
        bar.close()

    def _abort_all(self) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if self.manager.has_sequence(seq.seq_id):
                self.manager.free_sequence(seq.seq_id)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.scheduler.finished = []

    def _request_output(self, seq: Sequence) -> RequestOutput:
        ids = seq.output_token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        completion = CompletionOutput(index=0, text=text, token_ids=ids, cumulative_logprob=seq.cumulative_logprob,
                                      finish_reason=seq.finish_reason, error=seq.error)
        return RequestOutput(request_id=seq.request_id, prompt=seq.prompt,
                             prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens], outputs=[completion],
                             finished=seq.is_finished, metrics=seq.metrics)

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
