"""Hugging Face transformers baselines for the offline throughput benchmark (benchmark_throughput.py).

    model = hf_model(common.qwen25_05b(), dtype=torch.bfloat16, device="cuda")
    run_hf_static(model, prompts, max_tokens, batch_size=64, temperature=0.6)
    run_hf_continuous(model, prompts, max_tokens, temperature=0.6, use_cuda_graph=True)

``max_tokens`` holds one output length per prompt (``Workload.output_lens``). Both runs return the metrics of
``benchmark_throughput.run_engine`` (without its step counts) plus an "engine" description. Every request
arrives at t=0 (the start of the timed run), EOS is ignored, and sampling is plain temperature sampling (no
top-k or top-p), as in our engine. On a CPU the caller sets torch's thread count (the engine's, so that the
two compare): these functions leave it alone.

Written against transformers 5.17 and 5.24, whose continuous-batching APIs differ (see run_hf_continuous);
differences are feature-detected, not version-checked.
"""
from __future__ import annotations

import dataclasses
import inspect
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

from common import summary

# mistral without a sliding window (all ModelConfig accepts) is the llama decoder
_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def _metrics(wall: float, prompts, max_tokens: list[int], ttft: list[float], tpot: list[float], engine: str) -> dict:
    # only the requested tokens count: static batching's extra tokens (up to the batch's longest) are waste
    num_prompt, num_output = sum(map(len, prompts)), sum(max_tokens)
    return {
        "wall_s": wall, "num_requests": len(prompts), "prompt_tokens": num_prompt, "output_tokens": num_output,
        "requests_per_s": len(prompts) / wall, "output_tok_per_s": num_output / wall,
        "total_tok_per_s": (num_prompt + num_output) / wall,
        "ttft_s": summary(ttft), "tpot_s": summary(tpot), "engine": engine,
    }


def _per_request(max_tokens, n: int) -> list[int]:
    max_tokens = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    if len(max_tokens) != n or min(max_tokens) < 1:
        raise ValueError("need one max_tokens >= 1 per prompt")
    return max_tokens


def _sampling(temperature: float) -> dict:
    if temperature <= 0:
        return {"do_sample": False}
    # top_k=0 / top_p=1.0 override the generation-config defaults (top_k=50) so sampling matches our engine's
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def hf_model(model_config, *, dtype, device, seed: int = 0):
    """An HF AutoModelForCausalLM with random weights, shaped like ``model_config`` (a pagedattention ModelConfig)."""
    mc = model_config
    if mc.model_type not in _CONFIG_CLASSES:
        raise ValueError(f"no HF baseline for model_type {mc.model_type!r}")
    kwargs = dict(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
        rope_parameters={"rope_type": "default", **(mc.rope_scaling or {}), "rope_theta": mc.rope_theta},
        tie_word_embeddings=mc.tie_word_embeddings, max_position_embeddings=mc.max_position_embeddings,
        bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_id)
    if mc.model_type != "qwen2":  # Qwen2 hard-wires its q/k/v bias; the others take a switch
        kwargs["attention_bias"] = mc.attention_bias
    config = getattr(transformers, _CONFIG_CLASSES[mc.model_type])(**kwargs)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    with torch.device(device):  # random init directly on the GPU: seconds instead of a CPU init and a copy
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()  # a no-op when the device context was honoured
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("random init produced non-finite weights")
    return model


class _StepClock(LogitsProcessor):
    """Wall time of every generation step: generate calls its logits processors once per new token, right
    after that step's forward, so the i-th timestamp is when token i of every row in the batch exists."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"  # else the timestamp is only when the kernels were queued
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def _generate_batch(model, batch: list[list[int]], new_tokens: int, temperature: float) -> list[float]:
    """One left-padded model.generate of exactly ``new_tokens`` tokens per row; returns the step timestamps."""
    pad_id = 0  # any valid id: the attention mask hides it
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(batch):  # left padding: every row's next token goes in the same column
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    clock = _StepClock(model.device)
    # eos_token_id=None as a kwarg overrides the model's generation config (a GenerationConfig with None would
    # not); min_new_tokens also masks EOS should one still be set, so no row finishes early.
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                         pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]), **_sampling(temperature))
    if out.shape[1] - width != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"HF generate made {out.shape[1] - width} tokens in {len(clock.times)} steps, "
                           f"expected {new_tokens}")
    return clock.times


def run_hf_static(model, prompts, max_tokens, *, batch_size: int, temperature: float) -> dict:
    """HF ``generate`` over static batches of ``batch_size`` consecutive requests; each batch runs to its
    longest output (that is static batching), but only the requested tokens are counted."""
    max_tokens = _per_request(max_tokens, len(prompts))
    _generate_batch(model, [p[:16] for p in prompts[:2]], 4, temperature)  # warm-up: kernels, allocator
    ttft, tpot = [], []
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        wanted = max_tokens[first:first + batch_size]
        times = _generate_batch(model, prompts[first:first + batch_size], max(wanted), temperature)
        for m in wanted:  # request i has its first token at step 0 and its last at step m_i - 1
            ttft.append(times[0] - start)
            if m > 1:
                tpot.append((times[m - 1] - times[0]) / (m - 1))
    wall = time.perf_counter() - start
    engine = (f"HF generate (transformers {transformers.__version__}), static batches of {batch_size}, "
              f"{model.config._attn_implementation}, left padding")
    return _metrics(wall, prompts, max_tokens, ttft, tpot, engine)


def _serve(manager, prompts, max_tokens: list[int], tag: str, record_timestamps: bool) -> list:
    """Submit every request (each with its own max_new_tokens), wait for all; outputs in request order."""
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        # eos_token_id=-1 disables EOS for this request (ids < 0 are dropped from the stop set)
        if manager.add_request(list(prompt), request_id=f"{tag}{i}", max_new_tokens=m,
                               record_timestamps=record_timestamps, eos_token_id=-1) is None:
            raise RuntimeError("HF continuous batching manager refused a request")
    done = {}
    while len(done) < len(prompts):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                error = getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)
                raise RuntimeError(f"HF continuous batching loop stopped with {len(done)}/{len(prompts)} "
                                   f"requests done: {error!r}")
        elif result.is_finished():
            done[result.request_id] = result
    outputs = [done[f"{tag}{i}"] for i in range(len(prompts))]
    for out, m in zip(outputs, max_tokens):
        if out.error is not None or len(out.generated_tokens) < m:
            raise RuntimeError(f"HF request {out.request_id} made {len(out.generated_tokens)}/{m} tokens "
                               f"(error: {out.error})")
    return outputs


def run_hf_continuous(model, prompts, max_tokens, *, temperature: float, use_cuda_graph: bool | None = False,
                      max_batch_tokens: int | None = None, **cb_options) -> dict:
    """transformers' own continuous batching (ContinuousBatchingManager, paged KV cache), with per-request
    max_new_tokens and per-token timestamps. ``use_cuda_graph`` (None: transformers decides),
    ``max_batch_tokens`` (None: sized from free GPU memory) and ``cb_options`` are ContinuousBatchingConfig
    fields. Raises RuntimeError when the installed transformers lacks the API or the run fails."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError as error:
        raise RuntimeError(f"transformers {transformers.__version__} has no ContinuousBatchingConfig") from error
    if not hasattr(model, "init_continuous_batching"):
        raise RuntimeError(f"transformers {transformers.__version__} models have no init_continuous_batching")
    max_tokens = _per_request(max_tokens, len(prompts))
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    options = {"use_cuda_graph": use_cuda_graph, "max_batch_tokens": max_batch_tokens, "seed": 0, **cb_options}
    # The manager swaps sdpa for flash attention when flash is installed; we want the sdpa baseline.
    paged_prefix = "auto_switch_to_flash" not in fields  # 5.17: pre-set "paged|sdpa", which is never swapped
    if not paged_prefix:  # 5.24: runs plain "sdpa" on the paged cache, and the swap is a config switch
        options["auto_switch_to_flash"] = False
    unknown = set(options) - fields
    if unknown:
        raise RuntimeError(f"not ContinuousBatchingConfig fields in transformers {transformers.__version__}: {unknown}")
    cb_config = ContinuousBatchingConfig(**{k: v for k, v in options.items() if v is not None})
    # max_new_tokens here is only a default: every request passes its own
    generation_config = GenerationConfig(max_new_tokens=max(max_tokens), eos_token_id=-1, **_sampling(temperature))
    init_kwargs = {"generation_config": generation_config, "continuous_batching_config": cb_config}
    if "workload_hints" in inspect.signature(model.init_continuous_batching).parameters:
        # the hints size max_requests_per_batch and the cache, as generate_batch would
        from transformers.generation.continuous_batching.utils import WorkloadHints
        init_kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                                      max_generated_length=max(max_tokens), num_requests=len(prompts))
    original_attn, manager = model.config._attn_implementation, None
    try:
        if paged_prefix and not original_attn.startswith("paged|"):
            model.set_attn_implementation(f"paged|{original_attn}")
        manager = model.init_continuous_batching(**init_kwargs)
        if hasattr(manager, "warmup"):
            manager.warmup()  # builds the cache and captures the CUDA graphs before the clock starts
        manager.start()
        _serve(manager, [p[:16] for p in prompts[:2]], [4, 4], "warmup", False)  # first forwards allocate
        start = time.perf_counter()
        outputs = _serve(manager, prompts, max_tokens, "req", True)
        wall = time.perf_counter() - start
        resolved = getattr(manager, "continuous_batching_config", cb_config)
        attn = model.config._attn_implementation
    except RuntimeError:
        raise
    except Exception as error:  # the API moves between releases: report it as "baseline unavailable"
        raise RuntimeError(f"HF continuous batching failed: {type(error).__name__}: {error}") from error
    finally:
        if manager is not None:
            if manager.is_running():
                manager.stop(block=True)
            if hasattr(manager, "destroy"):
                manager.destroy()
        if model.config._attn_implementation != original_attn:  # stop() restores only what it swapped itself
            model.set_attn_implementation(original_attn)
    ttft, tpot = [], []
    for out, m in zip(outputs, max_tokens):
        if out.timestamps:  # one perf_counter per generated token, when record_timestamps is supported
            ttft.append(out.timestamps[0] - start)
            if m > 1:
                tpot.append((out.timestamps[m - 1] - out.timestamps[0]) / (m - 1))
    engine = (f"HF ContinuousBatchingManager (transformers {transformers.__version__}), {attn}, per-request "
              f"max_new_tokens, cuda graphs {resolved.use_cuda_graph}, max_batch_tokens {resolved.max_batch_tokens}")
    return _metrics(wall, prompts, max_tokens, ttft, tpot, engine)
