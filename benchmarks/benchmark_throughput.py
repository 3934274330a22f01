"""Offline throughput: continuous vs static batching on the workloads W1 and W2.

    python benchmarks/benchmark_throughput.py                  # GPU: Qwen2.5-0.5B shape, random weights
    python benchmarks/benchmark_throughput.py --tiny           # CPU: embedded tiny model, small workloads

W1: 256 requests, prompts U[128, 512] tokens (ids U[100, 150000)), 256 new tokens each, EOS ignored.
W2 (nano-vllm's benchmark): 256 requests, prompts U[100, 1024] tokens (ids U[0, 10000]), U[100, 1024] new
tokens each, EOS ignored. Both are drawn from random.Random(0); weights are random (speed does not care).

Reported per run: requests/s, output tok/s (generated tokens / wall time; for W2 the same as nano-vllm's
requested output tokens / time), total tok/s (prompt + output), and mean/p50/p99 of TTFT and TPOT, with
every request arriving at t=0; the engine's steps (prefill/decode counts and times, the batch occupancy over
time) and, per batch cap, the ceiling of continuous over static batching that the requests allow. With
transformers installed the same requests also run through Hugging Face (static ``generate`` and its continuous
batching; ``--hf off`` skips them). JSON goes to benchmarks/results/throughput_<device>.json, with two plots
beside it (throughput bars, and the occupancy timeline that shows static batching's bubbles).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from pagedattention import LLM, SamplingParams
from pagedattention.engine.scheduler import Scheduler
from pagedattention.models import ModelConfig

QWEN25_05B = ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768, eos_token_id=151643)


def workload(name: str, tiny: bool, temperature: float):
    """(prompt token ids, SamplingParams) per request; --tiny shrinks lengths and counts ~16x."""
    rng = random.Random(0)
    scale, n = (16, 32) if tiny else (1, 256)
    if name == "W1":
        id_range = (100, 500) if tiny else (100, 149_999)
        prompts = [[rng.randint(*id_range) for _ in range(rng.randint(128 // scale, 512 // scale))] for _ in range(n)]
        outputs = [256 // scale] * n
    elif name == "W2":  # nano-vllm's bench.py: prompts first, then output lengths
        prompts = [[rng.randint(0, 500 if tiny else 10_000) for _ in range(rng.randint(100 // scale, 1024 // scale))]
                   for _ in range(n)]
        outputs = [rng.randint(100 // scale, 1024 // scale) for _ in range(n)]
    else:
        raise ValueError(f"unknown workload {name!r}")
    params = [SamplingParams(temperature=temperature, max_tokens=m, ignore_eos=True) for m in outputs]
    return prompts, params


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def use_scheduler(llm: LLM, scheduling: str, max_num_seqs: int) -> None:
    """Swap the engine's policy in place: one engine (weights, KV cache, CUDA graphs up to its
    max_num_seqs) serves every (scheduling, batch cap) pair."""
    llm.scheduler = Scheduler(llm.manager, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=llm.config.max_num_batched_tokens,
                              max_model_len=llm.max_model_len, eos_token_ids=llm.eos_token_ids,
                              scheduling=scheduling)


def ideal_decode_steps(max_tokens: list[int], cap: int, scheduling: str) -> int:
    """Decode steps the request set needs at batch cap ``cap`` if every step produced one token for each
    running sequence and admissions were free: the ceiling of what scheduling alone can change.
    Static: each batch of ``cap`` requests lasts as long as its longest output. Continuous: a finished
    request's slot is refilled at once, in arrival order."""
    if scheduling == "static":
        return sum(max(max_tokens[i:i + cap]) for i in range(0, len(max_tokens), cap))
    waiting, running, steps = list(reversed(max_tokens)), [], 0
    while waiting or running:
        while waiting and len(running) < cap:
            running.append(waiting.pop())
        steps += 1
        running = [left - 1 for left in running if left > 1]
    return steps


class StepTimeline:
    """Records every engine step of a run: when it started, whether it was a prefill step, how many
    sequences were running (the batch occupancy) and how many tokens it computed."""

    def __init__(self, llm: LLM):
        self.llm, self.steps = llm, []

    def __enter__(self):
        run, scheduler, start, steps = self.llm.runner.run, self.llm.scheduler, time.perf_counter(), self.steps

        def traced(seqs, is_prefill):
            steps.append((time.perf_counter() - start, is_prefill, len(scheduler.running),
                          sum(s.num_scheduled_tokens for s in seqs)))
            return run(seqs, is_prefill)
        self.llm.runner.run = traced  # an instance attribute: shadows the method for this run only
        return self

    def __exit__(self, *exc):
        del self.llm.runner.run

    def summary(self, wall: float) -> dict:
        """Step counts and times by kind (a step lasts until the next begins: scheduling and sampling
        included), and the time-weighted mean number of running sequences."""
        ends = [t for t, *_ in self.steps[1:]] + [wall]
        durations = [end - t for (t, *_), end in zip(self.steps, ends)]
        prefill = [d for d, (_, is_prefill, *_) in zip(durations, self.steps) if is_prefill]
        decode = [d for d, (_, is_prefill, *_) in zip(durations, self.steps) if not is_prefill]
        return {
            "prefill_steps": len(prefill), "prefill_s": sum(prefill),
            "decode_steps": len(decode), "decode_s": sum(decode),
            "decode_step_ms": 1e3 * statistics.fmean(decode) if decode else None,
            "mean_running": sum(d * n for d, (_, _, n, _) in zip(durations, self.steps)) / wall,
        }

    def to_json(self) -> dict:
        return timeline_segments(self.steps)


def timeline_segments(steps) -> dict:
    """Columns of the timeline with runs of steps of one kind and one occupancy merged (a decode stretch of
    hundreds of steps is one entry): ``t_s`` where the run starts, ``steps`` and ``tokens`` in it."""
    columns = {"t_s": [], "prefill": [], "running": [], "steps": [], "tokens": []}
    for t, is_prefill, running, tokens in steps:
        if columns["t_s"] and (columns["prefill"][-1], columns["running"][-1]) == (int(is_prefill), running):
            columns["steps"][-1] += 1
            columns["tokens"][-1] += tokens
            continue
        for name, value in zip(columns, (round(t, 5), int(is_prefill), running, 1, tokens)):
            columns[name].append(value)
    return columns


def to_json_text(report: dict) -> str:
    """Indented JSON with every list of numbers on one line (the timelines would take a line per number)."""
    text = json.dumps(report, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def run_one(llm: LLM, prompts, params) -> dict:
    llm.generate(prompts[:4], [SamplingParams(max_tokens=4, ignore_eos=True)] * 4, use_tqdm=False)  # warm-up
    with StepTimeline(llm) as timeline:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        wall = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs), "a request did not run to max_tokens"
    return {
        "wall_s": wall, "num_requests": len(outputs), "prompt_tokens": num_prompt, "output_tokens": num_output,
        "requests_per_s": len(outputs) / wall, "output_tok_per_s": num_output / wall,
        "total_tok_per_s": (num_prompt + num_output) / wall,
        "ttft_s": summary([o.metrics.time_to_first_token for o in outputs]),
        "tpot_s": summary([o.metrics.time_per_output_token for o in outputs]),
        "preemptions": llm.scheduler.num_preemptions,
        **timeline.summary(wall),
        "timeline": timeline.to_json(),
    }


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["W1", "W2", "all"], default="all")
    parser.add_argument("--scheduling", choices=["continuous", "static", "all"], default="all")
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model and small workloads (CPU-friendly)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperature", type=float, default=0.6, help="nano-vllm's benchmark samples at 0.6")
    parser.add_argument("--max-num-seqs", default=None,
                        help="batch caps to compare, comma-separated (default: 16,64,256; 8 with --tiny)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: 2048 (W2's longest is 2048)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--hf", choices=["auto", "off"], default="auto",
                        help="auto: also run Hugging Face transformers (static generate, continuous batching) "
                             "on the same requests when it is installed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = None if args.tiny else QWEN25_05B
    max_model_len = args.max_model_len or (256 if args.tiny else 2048)
    caps = [int(c) for c in (args.max_num_seqs or ("8" if args.tiny else "16,64,256")).split(",")]
    workloads = ["W1", "W2"] if args.workload == "all" else [args.workload]
    schedulings = ["static", "continuous"] if args.scheduling == "all" else [args.scheduling]
    # HF first: its continuous batching sizes its cache from free memory, which our engine would hold
    results = [] if args.hf == "off" else run_hf_baselines(args, model, device, workloads)
    start = time.perf_counter()
    llm = LLM(model, device=device, dtype=args.dtype, max_num_seqs=max(caps),
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_model_len,
              block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager)
    init_s = time.perf_counter() - start  # weights, KV sizing warm-up, CUDA graph capture
    dtype = str(llm.config.dtype).removeprefix("torch.")
    card = device_name(device)
    tag = card.replace(" ", "_").replace("/", "_") + ("_tiny" if args.tiny else "")
    path = args.out / f"throughput_{tag}.json"

    def write_report(rows):
        report = {
            "device": card, "model": "tiny (embedded)" if args.tiny else "Qwen2.5-0.5B shape, random weights",
            "engine_init_s": init_s, "kv_blocks": llm.manager.num_blocks,
            "dtype": dtype, "torch": torch.__version__, "temperature": args.temperature,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": max_model_len, "block_size": args.block_size, "enforce_eager": args.enforce_eager,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": "python " + " ".join(sys.argv), "results": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json_text(report))
        return report

    for name in workloads:
        prompts, params = workload(name, args.tiny, args.temperature)
        for cap in caps:
            for scheduling in schedulings:
                use_scheduler(llm, scheduling, cap)
                row = {"workload": name, "scheduling": scheduling, "max_num_seqs": cap,
                       "ideal_decode_steps": ideal_decode_steps([p.max_tokens for p in params], cap, scheduling),
                       **run_one(llm, prompts, params)}
                results.append(row)
                write_report(results)
                print(f"{name} {scheduling:>10} max_num_seqs={cap}: {row['requests_per_s']:.2f} req/s, "
                      f"{row['output_tok_per_s']:.0f} output tok/s, {row['total_tok_per_s']:.0f} total tok/s",
                      flush=True)

    report = write_report(results)
    try:
        from plot_throughput import plot_throughput
        for png in plot_throughput(report, args.out, tag):
            print(f"wrote {png}")
    except ImportError as e:  # matplotlib is optional
        print(f"no plots ({e})")

    print(f"\n{card}, {report['model']}, {dtype}, {llm.manager.num_blocks} KV blocks of {args.block_size}, "
          f"engine start {init_s:.1f} s")
    print(f"{'workload':<8} {'scheduling':<13} {'seqs':>4} {'req/s':>7} {'out tok/s':>10} {'total tok/s':>11} "
          f"{'TTFT mean/p50/p99 (s)':>24} {'TPOT mean/p50/p99 (ms)':>24} {'preempt':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['workload']:<8} {r['scheduling']:<10} failed: {r['error']}")
            continue
        t, p = r["ttft_s"] or dict.fromkeys(("mean", "p50", "p99"), float("nan")), r["tpot_s"]
        p = p or dict.fromkeys(("mean", "p50", "p99"), float("nan"))
        print(f"{r['workload']:<8} {r['scheduling']:<13} {r['max_num_seqs'] or '':>4} {r['requests_per_s']:>7.2f} "
              f"{r['output_tok_per_s']:>10.0f} {r['total_tok_per_s']:>11.0f} "
              f"{t['mean']:>8.2f}/{t['p50']:.2f}/{t['p99']:.2f} "
              f"{p['mean'] * 1e3:>10.1f}/{p['p50'] * 1e3:.1f}/{p['p99'] * 1e3:.1f} {r.get('preemptions', ''):>7}")
    print("\ncontinuous / static output tok/s, against the ceiling of free admissions (static's decode steps /"
          " continuous' decode steps, ideal_decode_steps):")
    by_key = {(r["workload"], r["max_num_seqs"], r["scheduling"]): r for r in results}
    for (name, cap, scheduling), r in by_key.items():
        static = by_key.get((name, cap, "static"))
        if scheduling == "continuous" and static:
            print(f"{name} max_num_seqs={cap}: {r['output_tok_per_s'] / static['output_tok_per_s']:.2f}x measured, "
                  f"{static['ideal_decode_steps'] / r['ideal_decode_steps']:.2f}x ceiling; decode steps "
                  f"{static['decode_steps']} vs {r['decode_steps']}, prefill steps {static['prefill_steps']} vs "
                  f"{r['prefill_steps']} ({static['prefill_s']:.2f} s vs {r['prefill_s']:.2f} s)")
    for name in workloads:
        best = max((r for r in results if r["workload"] == name and r["scheduling"] in ("static", "continuous")),
                   key=lambda r: r["output_tok_per_s"], default=None)
        for r in results:
            if best and r["workload"] == name and r["scheduling"].startswith("hf-") and "error" not in r:
                print(f"{name}: engine ({best['scheduling']}, {best['max_num_seqs']} seqs) "
                      f"{best['output_tok_per_s'] / r['output_tok_per_s']:.1f}x {r['engine']}")
    print(f"wrote {path}")
    return 0


def run_hf_baselines(args, model_config, device: str, workloads: list[str]) -> list[dict]:
    """Hugging Face transformers on the same requests: ``generate`` in static batches (W1: 128, W2: 256 per
    batch, each running to its longest output) and its continuous batching (CUDA graphs on a GPU). Rows of a
    baseline that cannot run carry its error instead of metrics."""
    try:
        from hf_baselines import hf_model, run_hf_continuous, run_hf_static
    except ImportError as e:
        print(f"no Hugging Face baselines ({e})")
        return []
    from pagedattention.models.tiny import TINY_CONFIG

    dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype))
    model = hf_model(model_config or ModelConfig(**TINY_CONFIG), dtype=dtype, device=device)
    rows = []
    for name in workloads:
        prompts, params = workload(name, args.tiny, args.temperature)
        max_tokens = [p.max_tokens for p in params]
        batch_size = 8 if args.tiny else {"W1": 128, "W2": 256}[name]
        runs = [("hf-static", batch_size, lambda: run_hf_static(
                    model, prompts, max_tokens, batch_size=batch_size, temperature=args.temperature)),
                ("hf-continuous", None, lambda: run_hf_continuous(
                    model, prompts, max_tokens, temperature=args.temperature, use_cuda_graph=device == "cuda",
                    max_batch_tokens=args.max_num_batched_tokens if device == "cuda" else None))]
        for scheduling, cap, run in runs:
            row = {"workload": name, "scheduling": scheduling, "max_num_seqs": cap}
            try:
                row.update(run())
                print(f"{name} {scheduling}: {row['output_tok_per_s']:.0f} output tok/s ({row['engine']})", flush=True)
            except RuntimeError as e:
                row["error"] = str(e)
                print(f"{name} {scheduling} failed: {e}", flush=True)
            rows.append(row)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
