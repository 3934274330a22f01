"""Where a prefill step's time goes: the GPU time of each part against its own bound.

    python benchmarks/profile_prefill.py            # GPU: Qwen2.5-0.5B shape, W1- and W2-like prompt batches
    python benchmarks/profile_prefill.py --tiny     # CPU smoke run of the same pipeline

A step's prompts are drawn like W1's (U[128, 512] tokens) or W2's (U[100, 1024]) until the next would pass the
engine's 8,192 tokens per step, added through the public loop to an idle engine and run by one ``llm.step()``.
Each kind runs one step that compiles what its shapes need, ``--steps`` untraced steps timed from the call
until it returns and until the device is done (the host's preparation and launches included: a prefill step
runs eagerly, with no CUDA graph), with the caching allocators' calls into CUDA in each, then one under
cProfile (the host functions it spent its time in), then ``--steps`` traced ones. Kernels are put in parts by
name as in profile_step.py (a step's last GEMM is the LM head, over one row per sequence). A traced step's
``llm.step()`` time, the span from its first kernel's start to its last one's end and the share of that span
with no kernel running are recorded too, but the profiler adds host time to every op: untraced time minus
traced GPU time is the host's exposed share.

Bounds, per step: the GEMMs' FLOPs (2 x tokens x the layers' projection parameters) at the measured bf16 GEMM
rate, or their weights at the copy bandwidth, whichever is longer; attention's causal FLOPs (QK^T and PV over
the keys up to each token, ``common.prefill_flops``) at the same rate; the layer ops' activations moved once
(RoPE reads q/k/v and writes q and the cache; each add + RMSNorm reads and writes x and the residual; SwiGLU
reads gate and up, writes their product) at the copy bandwidth. JSON: results/profile_prefill_<card>.json.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from profile_step import (STEP_LABEL, classify_step, device_events, layer_op_bytes, load_trace,  # noqa: E402
                          measured_rates, span_of, step_windows)
from pagedattention import LLM, SamplingParams  # noqa: E402

KINDS = {"W1-like": (128, 512), "W2-like": (100, 1024)}   # prompt tokens, U[low, high]
TINY_SCALE = 8   # --tiny: prompts and the step's token budget shrunk 8x (the tiny model's context is 256)


def prefill_bounds(mc, prompt_lens: list[int], dtype_bytes: int, copy_bw: float, rate: float) -> dict:
    """Seconds each part of one prefill step needs at least (module docstring)."""
    tokens, d, layers, h = sum(prompt_lens), dtype_bytes, mc.num_hidden_layers, mc.hidden_size
    q = mc.num_attention_heads * mc.head_dim
    linear = common.layer_linear_params(mc)
    attention = sum(layers * 4 * q * n * (n + 1) / 2 for n in prompt_lens)
    return {"gemm": max(2 * tokens * layers * linear / rate, layers * linear * d / copy_bw),
            "attention": attention / rate,
            "layer_ops": layer_op_bytes(mc, tokens, d) / copy_bw,
            "lm_head": max(2 * len(prompt_lens) * h * mc.vocab_size / rate, mc.vocab_size * h * d / copy_bw)}


def prompt_batch(rng: random.Random, low: int, high: int, budget: int) -> list[int]:
    lens = []
    while sum(lens) + (n := rng.randint(low, high)) <= budget:
        lens.append(n)
    return lens


ALLOCATOR_COUNTS = ("device_allocs", "alloc_retries", "pinned_allocs")


def allocator_counts() -> dict:
    """Running counts of the caching allocators' calls into CUDA: device blocks (cudaMalloc), retries after
    freeing the cache, and page-locked host blocks (cudaHostAlloc: ``pin_memory`` of a size not cached yet)."""
    device = torch.cuda.memory_stats()
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return {"device_allocs": device.get("num_device_alloc", 0), "alloc_retries": device.get("num_alloc_retries", 0),
            "pinned_allocs": host.get("allocations.allocated", host.get("num_host_alloc", 0))}


def host_functions(profiler: cProfile.Profile, top: int = 15) -> list[list]:
    """The ``top`` functions of a cProfile'd step by time spent in them (``tottime``): [where, calls, ms, ms
    including what they call]."""
    stats = pstats.Stats(profiler).stats
    rows = [[f"{Path(file).name}:{line}({name})", calls, 1e3 * tottime, 1e3 * cumtime]
            for (file, line, name), (_, calls, tottime, cumtime, _) in stats.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]


def run_prefill(llm: LLM, lens: list[int], rng: random.Random, traced: bool,
                profiler: cProfile.Profile | None = None) -> list[dict] | dict:
    """One step over prompts of ``lens``: its trace if ``traced``, else ms from ``llm.step()``'s call until it
    returns and until the device has finished the step, and the allocators' calls into CUDA in between
    (``allocator_counts``: one costs far more than a kernel launch); with ``profiler``, the untraced step runs
    under it. The requests are then aborted."""
    vocab, on_gpu = llm.model_config.vocab_size, llm.config.device.type == "cuda"
    params = SamplingParams(max_tokens=4, ignore_eos=True, output_kind="final_only")
    ids = [llm.add_request([rng.randrange(vocab) for _ in range(n)], params) for n in lens]
    trace = None
    if traced:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            with record_function(STEP_LABEL):
                llm.step()
            if on_gpu:
                torch.cuda.synchronize()   # the step's kernels may still run when step() returns
        trace = load_trace(prof)
    else:
        before = allocator_counts() if on_gpu else {}
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        llm.step()
        if profiler is not None:
            profiler.disable()
        returned = time.perf_counter()
        if on_gpu:
            torch.cuda.synchronize()
        after = allocator_counts() if on_gpu else {}
        untraced = {"ms": 1e3 * (time.perf_counter() - start), "returned_ms": 1e3 * (returned - start)}
        untraced |= {key: after.get(key, 0) - before.get(key, 0) for key in ALLOCATOR_COUNTS}
    if not llm.last_step.is_prefill or llm.last_step.num_seqs != len(lens):
        raise RuntimeError(f"the step ran {llm.last_step.num_seqs} sequences, not a prefill of all {len(lens)}")
    for request_id in ids:
        llm.abort_request(request_id)
    while llm.has_unfinished_requests():
        llm.step()
    return trace if traced else untraced


def profile_kind(llm: LLM, kind: str, budget: int, steps: int, copy_bw: float, rate: float, seed: int,
                 scale: int = 1) -> dict:
    rng, (low, high) = random.Random(seed), (n // scale for n in KINDS[kind])
    mc, dtype_bytes = llm.model_config, llm.config.dtype.itemsize
    run_prefill(llm, prompt_batch(rng, low, high, budget), rng, traced=False)  # compiles what the shapes need
    untraced = [run_prefill(llm, prompt_batch(rng, low, high, budget), rng, traced=False) for _ in range(steps)]
    profiler = cProfile.Profile()  # one more untraced step, its host side under cProfile
    profiled = run_prefill(llm, prompt_batch(rng, low, high, budget), rng, traced=False, profiler=profiler)
    rows = []
    for _ in range(steps):
        lens = prompt_batch(rng, low, high, budget)
        trace = run_prefill(llm, lens, rng, traced=True)
        events = sorted(device_events(trace), key=lambda e: e["ts"])
        parts, _, kernels = classify_step(events)
        (start, end), = step_windows(trace)
        span = span_of(events)
        bounds = prefill_bounds(mc, lens, dtype_bytes, copy_bw, rate)
        rows.append({"tokens": sum(lens), "sequences": len(lens), "host_step_ms": (end - start) / 1e3,
                     "device_span_ms": span / 1e3, "device_idle_in_span": 1 - sum(parts.values()) / span,
                     "parts_ms": {k: v / 1e3 for k, v in parts.items() if v},
                     "bounds_ms": {k: 1e3 * v for k, v in bounds.items()},
                     "kernels": sorted(([k[1], part, calls, us / 1e3] for k, (part, calls, us) in kernels.items()),
                                       key=lambda r: -r[3])[:12]})
    return {"kind": kind, "prompt_lens": [low, high], "untraced_step_ms": [u["ms"] for u in untraced],
            "untraced_step_returned_ms": [u["returned_ms"] for u in untraced],
            **{f"untraced_step_{key}": [u[key] for u in untraced] for key in ALLOCATOR_COUNTS},
            "host_profiled_step_returned_ms": profiled["returned_ms"], "host_functions": host_functions(profiler),
            "steps": rows}


def print_kind(report: dict) -> None:
    print(f"\n{report['kind']} prefill steps (prompts U{report['prompt_lens']}), ms of device time per part "
          f"[its bound]:")
    for row in report["steps"]:
        busy = sum(row["parts_ms"].values())
        parts = "  ".join(f"{k} {v:.3f}" + (f" [{row['bounds_ms'][k]:.3f}]" if k in row["bounds_ms"] else "")
                          for k, v in row["parts_ms"].items())
        print(f"  {row['tokens']:5d} tokens, {row['sequences']:3d} seqs: busy {busy:.3f} ms:  {parts}")
        print(f"      traced: llm.step() {row['host_step_ms']:.3f} ms, first to last kernel "
              f"{row['device_span_ms']:.3f} ms ({row['device_idle_in_span']:.0%} idle)")
    print(f"  untraced, llm.step() until the device is done: "
          f"{', '.join(f'{ms:.3f}' for ms in report['untraced_step_ms'])} ms; until it returns: "
          f"{', '.join(f'{ms:.3f}' for ms in report['untraced_step_returned_ms'])} ms; allocations: "
          + ", ".join(f"{key} {report[f'untraced_step_{key}']}" for key in ALLOCATOR_COUNTS))
    print(f"  host side of one more untraced step under cProfile ({report['host_profiled_step_returned_ms']:.3f} ms "
          f"until llm.step() returned), by ms spent in each function (ms including its calls):")
    for where, calls, ms, cumulative in report["host_functions"]:
        print(f"    {ms:8.3f} ({cumulative:8.3f}) {calls:6d}x  {where[:90]}")
    print("  largest kernels of the last step (ms, launches, part):")
    for name, part, calls, ms in report["steps"][-1]["kernels"]:
        print(f"    {ms:8.3f} {calls:4d}x  {part:10s} {name[:90]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model on the CPU (a smoke run)")
    parser.add_argument("--model-shape", choices=list(common.MODEL_SHAPES), default=common.DEFAULT_SHAPE)
    parser.add_argument("--steps", type=int, default=2, help="untraced, then traced steps per kind (default 2)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    llm = LLM(None if args.tiny else common.model_shape(args.model_shape), device=device, max_num_seqs=256,
              max_model_len=256 if args.tiny else 2048)
    scale = TINY_SCALE if args.tiny else 1
    budget = llm.config.max_num_batched_tokens // scale
    _, copy_bw, rate = measured_rates(llm)
    kinds = [profile_kind(llm, kind, budget, args.steps, copy_bw, rate, seed, scale)
             for seed, kind in enumerate(KINDS)]
    for report in kinds:
        print_kind(report)
    tag = common.result_tag(common.card_name(device), args.tiny, None if args.tiny else args.model_shape)
    result = {**common.run_info(device), "model": common.model_description(None if args.tiny else args.model_shape),
              "dtype": str(llm.config.dtype).removeprefix("torch."), "tokens_per_step": budget,
              "copy_tbps": copy_bw / 1e12, "matmul_tflops": rate / 1e12, "kinds": kinds}
    busy = [statistics.mean(sum(r["parts_ms"].values()) for r in k["steps"]) for k in kinds]
    print("\nmean busy ms per step: " + ", ".join(f"{k['kind']} {b:.3f}" for k, b in zip(kinds, busy)))
    path = common.write_json(args.out / f"profile_prefill_{tag}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
