"""Many requests, one long system prompt: the KV cache memory that sharing blocks saves, measured.

    python examples/demo_memory.py                      # or: pagedattention demo memory
    python examples/demo_memory.py --num-requests 8 --prompt-len 256 --answer-len 16 --json out.json

Every request is the same system prompt followed by a short question of its own, and gets an answer of
``--answer-len`` tokens. Without sharing, each request holds its own copy of the prompt's K/V:

    naive blocks = num_requests * ceil((prompt_len + answer_len) / block_size)

With PagedAttention the system prompt's full blocks are stored once and every request's block table points
at them (reference counts, copy-on-write for the partial last block); each request owns only the blocks of
its question and answer. The paged figure is measured, not computed: the peak number of blocks in use in the
block allocator while the requests run, times the bytes of one block (K and V of every layer).

Two ways to build the sharing (the output names the one used):
- "engine": the requests go through ``LLM(enable_prefix_caching=True).generate``; the system prompt is
  prefilled once first, as a server's prefix cache holds it after its first request.
- "manager": no model runs; ``PagedAttentionManager.fork_sequence`` shares the system prompt's blocks with
  each request by hand, then each request appends its question and answer tokens.

Defaults: on a GPU 64 requests x a 4,096-token prompt + 128-token answers with the Qwen2.5-0.5B shape
(random weights); on a CPU 16 x 512 + 32 with the embedded tiny model, in seconds.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GB = 1e9  # decimal gigabytes, as the printed "GB" says
GPU_DEFAULTS = dict(num_requests=64, prompt_len=4096, answer_len=128)
CPU_DEFAULTS = dict(num_requests=16, prompt_len=512, answer_len=32)
# The Qwen2.5-0.5B shape the benchmarks use (random weights: memory does not depend on their values).
QWEN_0_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                 max_position_embeddings=32768, eos_token_id=151643)


@dataclass
class PeakTracker:
    """Follows the block allocator through a run and keeps its statistics at the last moment of its peak.

    Sampled after every manager call that can take a block (instance attributes shadow the methods); the
    statistics are read again just before a sequence gives its blocks back while the count is still at the
    peak, and at the end, so they describe the peak with all its tokens written.
    """

    manager: object
    peak_blocks: int = 0
    stats_at_peak: object = None

    def __post_init__(self):
        self.num_blocks = self.manager.memory_stats().num_blocks

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self.manager.num_free_blocks  # one call into the allocator

    def sample(self) -> None:
        if self.stats_at_peak is None or self.blocks_in_use > self.peak_blocks:
            self._snapshot()

    def refresh(self) -> None:
        if self.blocks_in_use == self.peak_blocks:
            self._snapshot()

    def release(self) -> None:
        """Keep the cache's shape, drop the manager: its caches may be freed (a GPU holds one pool at a time)."""
        cache = self.manager.key_caches[0]
        self.cache_shape = dict(num_layers=len(self.manager.key_caches), block_size=cache.shape[1],
                                num_kv_heads=cache.shape[2], head_dim=cache.shape[3], dtype=cache.dtype,
                                device=cache.device)
        self.manager = None

    def _snapshot(self) -> None:
        self.stats_at_peak = self.manager.memory_stats()
        self.peak_blocks = self.stats_at_peak.blocks_in_use

    def watch(self) -> None:
        # every public method that may take blocks (add_sequence, append_token, append_token_batch, ...)
        # or give them back (free_sequence)
        for name in dir(self.manager):
            if name.startswith(("add_", "append_", "fork_")) and callable(getattr(self.manager, name)):
                self._wrap(name, after=self.sample)
            elif name.startswith("free_") and callable(getattr(self.manager, name)):
                self._wrap(name, before=self.refresh)

    def _wrap(self, name, before=None, after=None):
        method = getattr(self.manager, name)

        def call(*args, **kwargs):
            if before:
                before()
            result = method(*args, **kwargs)
            if after:
                after()
            return result
        setattr(self.manager, name, call)


def make_prompts(args) -> tuple[list[int], list[list[int]]]:
    """A seeded system prompt and one question per request: random token ids below 256 (valid in every
    vocabulary, the byte tokenizer's included), the same on every run."""
    rng = random.Random(args.seed)
    high = 256
    system = [rng.randrange(high) for _ in range(args.prompt_len - args.question_len)]
    questions = [[rng.randrange(high) for _ in range(args.question_len)] for _ in range(args.num_requests)]
    return system, questions


def run_engine(args, device: str, prefix_caching: bool) -> tuple[PeakTracker, dict]:
    from pagedattention import LLM, SamplingParams
    llm_kwargs = dict(device=device, block_size=args.block_size, max_model_len=args.prompt_len + args.answer_len)
    if prefix_caching:
        llm_kwargs["enable_prefix_caching"] = True
    if args.num_kv_blocks is not None:
        llm_kwargs["num_kv_blocks"] = args.num_kv_blocks
    elif not device.startswith("cuda"):  # a CPU engine has a fixed small pool: make room for naive copies
        llm_kwargs["num_kv_blocks"] = (args.num_requests + 1) * math.ceil((args.prompt_len + args.answer_len)
                                                                         / args.block_size)
    llm = LLM(model_to_load(args.model, device), **llm_kwargs)
    system, questions = make_prompts(args)
    greedy = dict(temperature=0.0, ignore_eos=True)
    # The system prompt alone first: afterwards the prefix cache holds its full blocks.
    llm.generate([system], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    llm.reset_stats()  # the engine's own statistics then cover the requests alone
    tracker = PeakTracker(llm.manager)
    tracker.sample()
    tracker.watch()
    outputs = llm.generate([system + q for q in questions], SamplingParams(max_tokens=args.answer_len, **greedy),
                           use_tqdm=not args.no_progress)
    tracker.refresh()
    tracker.release()
    errors = [o.outputs[0].error for o in outputs if o.outputs[0].finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g.: {errors[0]}")
    info = {"generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "preemptions": llm.scheduler.num_preemptions, "engine_stats": _plain(llm.stats())}
    return tracker, info


def run_manager(args, device: str, shape: dict, dtype: torch.dtype) -> tuple[PeakTracker, dict]:
    from pagedattention.memory import PagedAttentionManager
    bs = args.block_size
    # Room for the shared prompt plus every request's own blocks (+1 for the copy-on-write of the last one).
    own_blocks = math.ceil((args.question_len + args.answer_len) / bs) + 1
    num_blocks = args.num_kv_blocks or math.ceil(args.prompt_len / bs) + args.num_requests * own_blocks
    manager = PagedAttentionManager(num_blocks, bs, shape["num_hidden_layers"], shape["num_key_value_heads"],
                                    shape["head_dim"], dtype=dtype, device=device)
    tracker = PeakTracker(manager)
    system_len = args.prompt_len - args.question_len
    manager.add_sequence("system", system_len)
    tracker.sample()
    tracker.watch()
    for i in range(args.num_requests):
        manager.fork_sequence("system", i)
        for _ in range(args.question_len + args.answer_len - 1):  # the last answer token is never stored
            manager.append_token(i)
    tracker.refresh()
    tracker.release()
    return tracker, {}


def cuda_pool_bytes(cache_shape: dict, num_blocks: int) -> int:
    """Bytes torch.cuda allocates for a PagedAttentionManager of ``num_blocks`` blocks of this cache shape."""
    from pagedattention.memory import PagedAttentionManager
    free_gpu_memory()
    before = torch.cuda.memory_allocated()
    s = cache_shape
    pool = PagedAttentionManager(num_blocks, s["block_size"], s["num_layers"], s["num_kv_heads"], s["head_dim"],
                                 dtype=s["dtype"], device=s["device"])
    allocated = torch.cuda.memory_allocated() - before
    del pool
    return allocated


def free_gpu_memory() -> None:
    """Let go of an engine's pool before the next one is sized from the free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def model_to_load(model: str | None, device: str):
    """What LLM loads: a checkpoint directory if given, else the Qwen2.5-0.5B shape with random weights on
    a GPU and the embedded tiny model (None) on a CPU."""
    if model is not None or not device.startswith("cuda"):
        return model
    from pagedattention.models import ModelConfig
    return ModelConfig(**QWEN_0_5B)


def model_name(model: str | None, on_gpu: bool) -> str:
    if model is not None:
        return model
    return "Qwen2.5-0.5B shape, random weights" if on_gpu else "embedded tiny model"


def _plain(obj):
    """JSON-ready copy of dataclasses / dicts of numbers."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="pagedattention demo memory", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="KV memory of many requests sharing one long system prompt: naive copies vs PagedAttention.",
        epilog="defaults: on a GPU {g[num_requests]} requests x {g[prompt_len]}-token prompts + {g[answer_len]}-token "
               "answers;\n          on a CPU {c[num_requests]} x {c[prompt_len]} + {c[answer_len]}\n"
               "examples:\n  pagedattention demo memory --unshared\n"
               "  pagedattention demo memory --num-requests 8 --prompt-len 256 --answer-len 16 --json out.json\n"
               "  pagedattention demo memory --mode manager     # sharing by fork_sequence, no model run"
               .format(g=GPU_DEFAULTS, c=CPU_DEFAULTS))
    p.add_argument("--num-requests", type=int, help="requests sharing the system prompt")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per request (system prompt + question)")
    p.add_argument("--question-len", type=int, default=16, help="tokens of each request's own question (default 16)")
    p.add_argument("--answer-len", type=int, help="tokens generated per request")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default auto)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory (default: Qwen2.5-0.5B shape with random weights on a GPU, "
                        "the embedded tiny model on a CPU)")
    p.add_argument("--mode", choices=("engine", "manager"), default="engine",
                   help="engine: LLM with prefix caching (default); manager: fork_sequence by hand, no model run")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (default: sized by the engine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--unshared", action="store_true",
                   help="also run the engine with prefix caching off and report its measured peak next to the "
                        "computed naive figure")
    p.add_argument("--json", metavar="PATH",
                   help="also write the figures as JSON; a name must not claim another device than the run's "
                        "(demo_memory_gpu.json is refused on a CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    for key, value in (GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("num_requests", "prompt_len", "answer_len", "block_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not 0 <= args.question_len < args.prompt_len:
        p.error(f"--question-len must be in [0, --prompt-len={args.prompt_len}), got {args.question_len}")
    if args.json and claims_other_device(Path(args.json).name, device):
        p.error(f"--json {args.json}: the name says another device than this run's ({device}); results of a "
                f"{'GPU' if device.startswith('cuda') else 'CPU'} run go to a name without "
                f"{'cpu' if device.startswith('cuda') else 'gpu, cuda or a card name'} in it")
    return args, device


GPU_WORDS = re.compile(r"gpu|cuda|nvidia|hbm|[ahl]\d{2,3}(?!\d)", re.IGNORECASE)  # h100, a100, l40, ...


def claims_other_device(file_name: str, device: str) -> bool:
    """Whether ``file_name`` names a device other than ``device``: committed results are named after the
    device that made them, and a CPU run must not overwrite a GPU's (nor the reverse)."""
    if device.startswith("cuda"):
        return "cpu" in file_name.lower()
    return GPU_WORDS.search(file_name) is not None


def main(argv=None) -> int:
    args, device = parse_args(argv)
    mode = args.mode
    on_gpu = device.startswith("cuda")
    start = time.perf_counter()
    if mode == "engine":
        tracker, info = run_engine(args, device, prefix_caching=True)
    else:  # only the model's KV shape matters here
        shape = QWEN_0_5B if on_gpu else dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
        tracker, info = run_manager(args, device, shape, torch.bfloat16 if on_gpu else torch.float32)
    elapsed = time.perf_counter() - start

    peak, bs, n = tracker.stats_at_peak, args.block_size, args.num_requests
    naive_blocks = n * math.ceil((args.prompt_len + args.answer_len) / bs)
    naive_bytes = naive_blocks * peak.bytes_per_block
    paged_bytes = tracker.peak_blocks * peak.bytes_per_block
    result = {
        "demo": "memory", "mode": mode, "device": device,
        "card": torch.cuda.get_device_name() if on_gpu else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "pagedattention demo memory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model_name(args.model, on_gpu) + (" (KV shape only)" if mode == "manager" else ""),
        "num_requests": n, "prompt_len": args.prompt_len, "question_len": args.question_len,
        "answer_len": args.answer_len, "block_size": bs, "bytes_per_block": peak.bytes_per_block,
        "naive_blocks": naive_blocks, "naive_bytes": naive_bytes,
        "paged_peak_blocks": tracker.peak_blocks, "paged_bytes": paged_bytes,
        "saved_fraction": 1.0 - paged_bytes / naive_bytes,
        # a request stores its prompt and every answer token but the last (which is never fed back)
        "naive_tokens": n * (args.prompt_len + args.answer_len - 1),
        "stats_at_peak": _plain(peak), "elapsed_s": elapsed, **info,
    }
    if on_gpu:
        result["torch_cuda"] = {
            "naive_pool_bytes": cuda_pool_bytes(tracker.cache_shape, naive_blocks),
            "paged_pool_bytes": cuda_pool_bytes(tracker.cache_shape, tracker.peak_blocks),
            "run_pool_bytes": peak.num_blocks * peak.bytes_per_block,
            "max_memory_allocated": torch.cuda.max_memory_allocated()}
    if args.unshared:
        free_gpu_memory()
        unshared, _ = run_engine(args, device, prefix_caching=False)
        result["unshared_peak_blocks"] = unshared.peak_blocks
        result["unshared_bytes"] = unshared.peak_blocks * peak.bytes_per_block
    print_report(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def print_report(r: dict) -> None:
    bs, peak = r["block_size"], r["stats_at_peak"]
    how = ("engine: LLM(enable_prefix_caching=True), the system prompt prefilled once first" if r["mode"] == "engine"
           else "manager: PagedAttentionManager.fork_sequence by hand, no model run")
    print(f"{r['num_requests']} requests x ({r['prompt_len'] - r['question_len']}-token shared system prompt + "
          f"{r['question_len']}-token question) + {r['answer_len']}-token answers; {r['model']} on {r['card']}; "
          f"block {bs} tokens = {r['bytes_per_block']:,} bytes (K and V, all layers)")
    print(f"sharing built by {how}")
    print(f"naive: {r['naive_blocks']:,} blocks = {r['num_requests']} x ceil({r['prompt_len'] + r['answer_len']}/{bs}); "
          f"paged: peak {r['paged_peak_blocks']:,} blocks in use (allocator statistics)")
    print(f"internal fragmentation: naive holds {r['naive_blocks'] * bs:,} slots for {r['naive_tokens']:,} tokens; "
          f"paged at its peak holds {peak['slots_held']:,} slots for {peak['tokens_stored']:,} distinct tokens "
          f"(utilization {peak['utilization']:.1%})")
    e = r.get("engine_stats", {})
    if "peak_blocks_held" in e and "prefix_cache_hit_tokens" in e:
        verdict = "agree" if e["peak_blocks_held"] == r["paged_peak_blocks"] else "differ"
        print(f"the engine's own statistics {verdict}: peak {e['peak_blocks_held']:,} blocks held "
              f"({e.get('peak_blocks_unshared', 0):,} without sharing); the prefix cache supplied "
              f"{e['prefix_cache_hit_tokens']:,} of {e['prefix_cache_query_tokens']:,} prompt tokens")
    if "unshared_peak_blocks" in r:
        print(f"measured without sharing (prefix caching off): peak {r['unshared_peak_blocks']:,} blocks = "
              f"{r['unshared_bytes'] / GB:.4g} GB")
    if "torch_cuda" in r:
        c = r["torch_cuda"]
        print(f"torch.cuda: a pool of {r['naive_blocks']:,} blocks allocates {c['naive_pool_bytes'] / GB:.4g} GB, "
              f"one of {r['paged_peak_blocks']:,} blocks {c['paged_pool_bytes'] / GB:.4g} GB "
              f"(this run reserved a pool of {c['run_pool_bytes'] / GB:.4g} GB up front; peak allocated "
              f"{c['max_memory_allocated'] / GB:.4g} GB)")
    print(f"Naive: {r['naive_bytes'] / GB:.4g} GB. PagedAttention: {r['paged_bytes'] / GB:.4g} GB. "
          f"Saved {r['saved_fraction']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
