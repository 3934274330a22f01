"""The user-facing engine (vLLM's offline ``LLM``): ``LLM(...).generate(prompts, sampling_params)``.

Built once: the config (config.py) is checked, the model loaded (``models.load``) and bound to its attention
backend, the KV cache sized (kv_cache.py) and allocated (``PagedAttentionManager``) and bound to the model,
then the runner captures its CUDA graphs. Each step (stepper.py): the scheduler picks the sequences (a prefill
or a decode batch) and which of them sample, the model runner turns them into tensors and returns logits, the
sampler picks tokens (beam searches rank theirs), and the scheduler appends them, stops finished requests and
frees their blocks; consecutive decode steps overlap (the host prepares step t + 1 while the GPU runs step t).

Requests: ``generate`` and ``beam_search`` run their prompts to the end; ``add_request`` / ``step`` /
``abort_request`` drive the same loop one step at a time (a server). Every public method takes one lock, so
calls from several threads are serialised.

Sharing KV blocks: ``enable_prefix_caching`` reuses cached full blocks of equal prompt prefixes,
``SamplingParams(n=...)`` forks a prompt's sequence into n when its prefill ends, and ``beam_search`` forks and
frees beams; ``stats()`` tells what the sharing saved.
"""
from __future__ import annotations

import itertools
import threading
import time
import warnings

import torch
from tqdm.auto import tqdm

from pagedattention import models
from pagedattention.memory.paged_attention_manager import PagedAttentionManager

from . import kv_cache
from .beam_search import BeamGroup, BeamSearch, BeamSearchOutput, BeamSearchParams
from .config import EngineConfig
from .inputs import parse_prompts, parse_sampling_params
from .model_runner import ModelRunner
from .outputs import RequestOutput, request_output
from .prefix_cache import PrefixCache
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler, cdiv
from .sequence import FINISHED, Sequence
from .stats import EngineStats
from .stepper import StepInfo, Stepper


class LLM:
    """An inference engine over a paged KV cache with continuous batching.

    model: a Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3), None for the embedded tiny
    model (random weights, byte tokenizer), or a ``ModelConfig`` for random weights of that shape.
    Every other keyword is an ``EngineConfig`` field.
    """

    def __init__(self, model=None, **engine_config):
        self.config = config = EngineConfig(model=model, **engine_config)
        self._lock = threading.RLock()
        if config.device.type == "cpu":
            # The tiny model's matmuls are 64 wide: splitting them over threads costs more than it saves, and on
            # a busy machine oversubscribed threads make a step tens of times slower.
            threads = config.cpu_threads or (1 if config.model is None else None)
            if threads is not None:
                torch.set_num_threads(threads)
        # --- tensor parallelism: one process per shard; engine/distributed.py builds every rank's part ---
        if config.tensor_parallel_size > 1:
            from .distributed import TensorParallelRunner
            self.runner = runner = TensorParallelRunner(config)
            self.model, self.tokenizer, self.model_config = runner.model, runner.tokenizer, runner.model_config
            self.manager, mc = runner.manager, runner.model_config
        else:
            self.model, self.tokenizer, self.model_config = models.load(
                config.model, dtype=config.dtype, device=config.device, seed=config.seed)
            config.set_model_limits(self.model_config)
            ops = self.model.bind_backend(config.attention_backend)
            num_blocks = kv_cache.num_kv_blocks(config, self.model, self.model_config)
            if config.cap_max_model_len(num_blocks):
                warnings.warn(f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens, so "
                              f"max_model_len is lowered to {config.max_model_len} (the model allows "
                              f"{self.model_config.max_position_embeddings}); requests end at that length. Raise "
                              "gpu_memory_utilization or num_kv_blocks for longer ones", stacklevel=2)
            mc = self.model_config
            self.manager = PagedAttentionManager(num_blocks, config.block_size, mc.num_hidden_layers,
                                                 mc.num_key_value_heads, mc.head_dim, config.dtype, config.device,
                                                 copy_blocks=ops.copy_blocks)
            self.model.bind_kv_cache(self.manager.key_caches, self.manager.value_caches)
            self.runner = ModelRunner(config, self.model, self.manager)
        # --- end tensor parallelism ---
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.prefix_cache = self._new_prefix_cache() if config.enable_prefix_caching else None
        self.scheduler = Scheduler(config, self.manager, self.eos_token_ids, self.prefix_cache,
                                   mixed_prompt_limit=getattr(self.runner, "mixed_prompt_limit", None))
        self.sampler = Sampler.from_config(config)
        graphs = getattr(self.runner, "graphs", None)
        if graphs is not None and graphs.sampler_graphs:  # decode steps sample in captured graphs too
            self.sampler.sample_in_graph = graphs.sample
        self._stats = EngineStats(self.manager.bytes_per_block)
        self._request_counter = itertools.count()
        self._requests: dict[str, Sequence] = {}  # live requests: id -> first sequence
        self._touched_meanwhile: list[Sequence] = []  # add_request sequences stepped by generate/beam_search
        self.stepper = Stepper(self.scheduler, self.runner, self.sampler, self.tokenizer, self.eos_token_ids,
                               lambda: self._record_step_stats())

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def last_step(self) -> StepInfo | None:
        """What the last step launched (prefill or decode, sequences, tokens) and how many tokens it appended."""
        return self.stepper.last_step

    # --- offline API ---------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; returns one RequestOutput per prompt, in prompt order.

        prompts: a string, a list of token ids, or a list of either. sampling_params: one SamplingParams
        for all prompts, a list with one per prompt, or None for the defaults. Bad input raises
        TypeError/ValueError before anything runs.
        """
        with self._lock:
            requests = self._parse_prompts(prompts)
            params = parse_sampling_params(sampling_params, len(requests), self.config.max_num_seqs)
            seqs = [self._add(text, ids, p, None) for (text, ids), p in zip(requests, params)]
            self._run(set(seqs), "Processed prompts", use_tqdm, num_registered=len(seqs))
            for seq in seqs:
                self._requests.pop(seq.request_id, None)
            return [request_output(seq, self.tokenizer) for seq in seqs]

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search for every prompt (vLLM's ``LLM.beam_search``); one BeamSearchOutput per prompt.

        Beams share their KV blocks: a beam extended by several tokens is forked, a dropped beam is freed. The
        searches run through the same scheduler as ``generate``, in the same batches as other requests.
        """
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if params.beam_width > self.config.max_num_seqs:
            raise ValueError(f"beam_width={params.beam_width} exceeds max_num_seqs={self.config.max_num_seqs}")
        with self._lock:
            groups = [self._beam_group(i, text, ids, params)
                      for i, (text, ids) in enumerate(self._parse_prompts(prompts))]
            for group in groups:  # all checked: now queue them
                seq = Sequence(group.prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=1),
                               request_id=group.request_id, prompt=group.prompt, device=self.config.device)
                seq.beam_group, group.seqs = group, [seq]
                self.scheduler.add(seq)
            self._run(set(groups), "Beam search", use_tqdm, num_registered=0)
            return [group.output(self.tokenizer) for group in groups]

    def _beam_group(self, i: int, text, ids: list[int], params: BeamSearchParams) -> BeamGroup:
        width, bs = params.beam_width, self.config.block_size
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        eos = frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)
        worst_case = width * cdiv(len(ids) + max_tokens - 1, bs)  # the last token's K/V is never needed
        if worst_case > self.manager.num_blocks:
            raise ValueError(f"prompts[{i}]: {width} beams of {len(ids)} + {max_tokens} tokens may need "
                             f"{worst_case} KV blocks, the cache has {self.manager.num_blocks}")
        search = BeamSearch(width, max_tokens, params.length_penalty, eos)
        return BeamGroup(str(next(self._request_counter)), text, ids, search, worst_case)

    # --- request-level API (a server's loop) ------------------------------------------------------------

    def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request; it joins the running batch at a coming step. Returns its id."""
        with self._lock:
            if request_id is not None:
                if not isinstance(request_id, str) or not request_id:
                    raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
                if request_id in self._requests:
                    raise ValueError(f"request_id {request_id!r} is already in use by a running request")
            (text, ids), = self._parse_prompts([prompt])
            params, = parse_sampling_params(sampling_params, 1, self.config.max_num_seqs)
            return self._add(text, ids, params, request_id).request_id

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the output of every request that got tokens or ended in it, as its
        ``SamplingParams.output_kind`` asks (everything so far, what is new, or only once it has ended)."""
        with self._lock:
            touched, self._touched_meanwhile = self._touched_meanwhile + self._step(), []
            # a "final_only" request reports nothing until it ends: skip its running sequences in one pass
            touched = [s for s in touched if s.status is FINISHED
                       or s.sampling_params.output_kind != "final_only"]
            outputs = []
            for first in {id(s.group[0]): s.group[0] for s in touched}.values():
                if self._requests.get(first.request_id) is not first or first.beam_group is not None:
                    continue
                kind, finished = first.sampling_params.output_kind, first.request_finished
                if kind != "final_only" or finished:
                    outputs.append(request_output(first, self.tokenizer, delta=kind == "delta"))
                if finished:
                    del self._requests[first.request_id]
            return outputs

    def abort_request(self, request_id: str) -> bool:
        """End a request now and free its blocks; False when no such request is running."""
        with self._lock:
            first = self._requests.pop(request_id, None)
            if first is None:
                return False
            for seq in list(first.group if first.beam_group is None else [first, *first.beam_group.seqs]):
                self.scheduler.finish(seq, "abort")
            return True

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when the engine is collected or Python
        exits); the engine takes no more steps after it."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or self.stepper.inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    @property
    def num_running_seqs(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting_seqs(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # --- settings that may change between runs ------------------------------------------------------------

    def set_scheduling(self, scheduling: str | None = None, *, max_num_seqs: int | None = None) -> None:
        """Switch between "continuous" and "static" batching, or lower the batch cap (CUDA graphs were
        captured up to the cap the engine was built with). Only while no request is in flight."""
        with self._lock:
            self._check_idle("set_scheduling")
            self.config.set_scheduling(scheduling, max_num_seqs)

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn prefix caching on (an empty cache) or off (every cached block freed). Only while idle."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        with self._lock:
            self._check_idle("set_prefix_caching")
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            self.prefix_cache = self._new_prefix_cache() if enabled else None
            self.scheduler.prefix_cache = self.prefix_cache
            self.config.enable_prefix_caching = enabled

    def _check_idle(self, what: str) -> None:
        self.stepper.flush()
        if self.scheduler.has_unfinished():
            raise RuntimeError(f"{what} needs an idle engine: {len(self._requests)} requests are in flight")

    def _new_prefix_cache(self) -> PrefixCache:
        return PrefixCache(self.manager.block_manager, self.config.block_size)

    # --- statistics --------------------------------------------------------------------------------------

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

    def _record_step_stats(self) -> None:
        """Blocks held by the running sequences vs. held without sharing (the manager keeps their table
        lengths summed, so a step costs O(1) rather than a pass over the batch)."""
        held = self.manager.num_blocks - self.manager.num_free_blocks
        if self.prefix_cache is not None:
            held -= self.prefix_cache.num_evictable  # cached blocks that no sequence holds
        self._stats.record_step(held, self.manager.num_table_entries)

    # --- the loop ------------------------------------------------------------------------------------

    def _add(self, text, ids: list[int], params: SamplingParams, request_id: str | None) -> Sequence:
        while request_id is None or request_id in self._requests:  # never an id a caller chose
            request_id = str(next(self._request_counter))
        seq = Sequence(ids, params, request_id=request_id, prompt=text, device=self.config.device)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _run(self, pending: set, desc: str, use_tqdm: bool, num_registered: int) -> None:
        """Step until every request in ``pending`` (first sequences, or beam groups) has ended; on any error,
        abort every request so that the engine stays usable. ``num_registered``: how many of ``_requests`` are
        this call's; beyond them, add_request ones share the steps and ``step()`` reports them later."""
        bar = tqdm(total=len(pending), desc=desc, dynamic_ncols=True, disable=not use_tqdm)
        start, num_output_tokens = time.perf_counter(), 0
        pending = {id(r) for r in pending}
        try:
            while pending:
                touched = self._step()
                if len(self._requests) > num_registered:  # add_request ones ran too: step() reports them
                    self._touched_meanwhile += touched
                num_output_tokens += self.stepper.last_step.num_sampled
                ended = {id(s.group[0]) for s in touched if s.is_finished and s.request_finished}
                ended.update(id(g) for g in self.stepper.finished_beam_groups)
                if ended & pending:
                    bar.update(len(ended & pending))
                    pending -= ended
                bar.set_postfix_str(f"output {num_output_tokens / (time.perf_counter() - start):.0f} tok/s",
                                    refresh=False)
            if not self.scheduler.has_unfinished():
                self.stepper.flush()  # a last, wasted step of requests that had ended
        except BaseException:
            self._abort_all()
            raise
        finally:
            bar.close()

    def _step(self) -> list[Sequence]:
        return self.stepper.step()

    def _abort_all(self) -> None:
        self.stepper.abort_all()
        self._requests.clear()

    def _parse_prompts(self, prompts):
        return parse_prompts(prompts, self.tokenizer, self.model_config.vocab_size, self.max_model_len)
