"""Offline throughput: continuous vs static batching on the workloads W1, W2 and W3 (benchmarks/workloads.py).

    python benchmarks/benchmark_throughput.py                          # GPU: Qwen2.5-0.5B shape, W1/W2/W3
    python benchmarks/benchmark_throughput.py --model-shape 7b --hf off --max-num-seqs 256
    python benchmarks/benchmark_throughput.py --tiny                   # CPU: embedded tiny model, small sets

One engine (random weights) serves every run: ``set_scheduling`` switches static/continuous batching and the
batch cap between runs. W1 and W2 run at every cap of --max-num-seqs, W3 (2,048 ShareGPT-like requests) at the
largest. Each run adds every request at t=0 and steps the engine (``add_request`` / ``step``), recording each
step from ``llm.last_step`` (the requests ask for ``output_kind="final_only"``, so ``step()`` builds an output only
when a request ends); ``--loop generate`` times one ``generate`` call instead (no timeline).

Reported per run: requests/s, output tok/s (requested output tokens / wall time; for W2 nano-vllm's figure),
total tok/s, mean/p50/p99 TTFT (from t=0) and TPOT, preemptions; the steps (prefill/decode counts and times,
batch occupancy over time) and, per cap, the ceiling of continuous over static batching that the requests
allow (``ideal_decode_steps``). With transformers installed, Hugging Face runs the same requests (static
``generate`` and its continuous batching; W1 and W2 only: W3 would take HF many minutes), and every engine
figure is set against them and against the peers' figures of the notes (workloads.PEERS). On a CPU the engine
and HF use the same torch thread count (--cpu-threads).

Output: benchmarks/results/throughput_<card>[_<shape>].json (``_cpu_tiny`` for CPU --tiny runs) with two
plots beside it; --profile also writes the decode step profile (profile_step.py) of the same engine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared modules, also when run through runpy

import common  # noqa: E402
import workloads  # noqa: E402
from common import summary  # noqa: E402
from pagedattention import LLM, SamplingParams  # noqa: E402


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


# --- one run ---------------------------------------------------------------------------------------------

def timeline_segments(steps) -> dict:
    """Columns of the timeline with runs of steps of one kind and one occupancy merged (a decode stretch of
    hundreds of steps is one entry): ``t_s`` where the run starts, ``steps`` and ``tokens`` in it, ``prefill``
    1 for a run of prefill steps (mixed steps count as decode steps here: the batch keeps decoding). ``steps``:
    (start time, kind, sequences running, tokens computed) per engine step."""
    columns = {"t_s": [], "prefill": [], "running": [], "steps": [], "tokens": []}
    for t, kind, running, tokens in steps:
        is_prefill = int(kind == "prefill")
        if columns["t_s"] and (columns["prefill"][-1], columns["running"][-1]) == (is_prefill, running):
            columns["steps"][-1] += 1
            columns["tokens"][-1] += tokens
            continue
        for name, value in zip(columns, (round(t, 5), is_prefill, running, 1, tokens)):
            columns[name].append(value)
    return columns


def timeline_summary(steps, wall: float) -> dict:
    """Step counts and times by kind (a step lasts until the next begins: scheduling and sampling included),
    and the time-weighted mean number of running sequences. Mixed steps (decodes and admitted prompts) are
    counted apart and also among the decode steps, since every running sequence decodes in them."""
    ends = [t for t, *_ in steps[1:]] + [wall]
    durations = [end - t for (t, *_), end in zip(steps, ends)]
    by_kind = {kind: [d for d, (_, k, *_) in zip(durations, steps) if k == kind]
               for kind in ("prefill", "mixed", "decode")}
    prefill, mixed = by_kind["prefill"], by_kind["mixed"]
    decode = by_kind["decode"] + mixed
    return {
        "prefill_steps": len(prefill), "prefill_s": sum(prefill),
        "mixed_steps": len(mixed), "mixed_s": sum(mixed),
        "decode_steps": len(decode), "decode_s": sum(decode),
        "decode_step_ms": 1e3 * statistics.fmean(decode) if decode else None,
        "mean_running": sum(d * n for d, (_, _, n, _) in zip(durations, steps)) / wall,
    }


def run_engine(llm: LLM, w: workloads.Workload, temperature: float, loop: str = "step") -> dict:
    """Every request of ``w`` at t=0, run to the end; its metrics. ``loop="step"``: ``add_request`` each, then
    ``llm.step()`` until all are done, recording every step (``llm.last_step``); ``"generate"``: one
    ``llm.generate`` call, which builds no per-step outputs (``step()`` returns every running request's output
    each step, a host cost of its own), and records no steps."""
    llm.generate(w.prompts[:4], [SamplingParams(max_tokens=4, ignore_eos=True)] * 4, use_tqdm=False)  # warm-up
    preemptions = llm.num_preemptions
    steps, done = [], {}
    start = time.perf_counter()
    if loop == "generate":
        done = dict(enumerate(llm.generate(w.prompts, w.sampling_params(temperature), use_tqdm=False)))
    else:
        for prompt, params in zip(w.prompts, w.sampling_params(temperature)):
            llm.add_request(prompt, params)
    while llm.has_unfinished_requests():
        t = time.perf_counter() - start
        done.update((o.request_id, o) for o in llm.step() if o.finished)
        info = llm.last_step
        if info.num_seqs:  # occupancy: a decode step's batch; after a prefill step, every sequence holding a slot
            steps.append((t, info.kind, llm.num_running_seqs if info.is_prefill else info.num_seqs, info.num_tokens))
    wall = time.perf_counter() - start
    outputs = list(done.values())
    bad = [o for o in outputs if o.outputs[0].finish_reason != "length"]
    if len(outputs) != w.num_requests or bad:
        raise RuntimeError(f"{len(outputs)}/{w.num_requests} requests ended, {len(bad)} not at max_tokens"
                           + (f" (first: {bad[0].outputs[0].finish_reason}, {bad[0].outputs[0].error})" if bad else ""))
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "loop": loop, "wall_s": wall, "num_requests": len(outputs), "prompt_tokens": w.prompt_tokens,
        "output_tokens": num_output, "requests_per_s": len(outputs) / wall, "output_tok_per_s": num_output / wall,
        "total_tok_per_s": (w.prompt_tokens + num_output) / wall,
        "ttft_s": summary(o.metrics.first_token_time - start for o in outputs),
        "tpot_s": summary(o.metrics.time_per_output_token for o in outputs),
        "preemptions": llm.num_preemptions - preemptions,
        **(timeline_summary(steps, wall) if steps else {}),
        "timeline": timeline_segments(steps),
    }


def run_hf_baselines(args, model_config, device: str, names: list[str]) -> list[dict]:
    """Hugging Face transformers on the same requests: ``generate`` in static batches (W1: 128, W2: 256 per
    batch, each running to its longest output) and its continuous batching (CUDA graphs on a GPU). Rows of a
    baseline that cannot run carry its error instead of metrics."""
    try:
        from hf_baselines import hf_model, run_hf_continuous, run_hf_static
    except ImportError as e:
        print(f"no Hugging Face baselines ({e})")
        return []
    from pagedattention.models import ModelConfig
    from pagedattention.models.tiny import TINY_CONFIG

    dtype = torch.float32 if device == "cpu" else torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
    model = hf_model(model_config or ModelConfig(**TINY_CONFIG), dtype=dtype, device=device)
    rows = []
    for name in names:
        w = workloads.make_workload(name, tiny=args.tiny, vocab_size=model.config.vocab_size)
        batch_size = 8 if args.tiny else {"W1": 128}.get(name, 256)
        runs = [("hf-static", batch_size, lambda: run_hf_static(
                    model, w.prompts, w.output_lens, batch_size=batch_size, temperature=args.temperature)),
                ("hf-continuous", None, lambda: run_hf_continuous(
                    model, w.prompts, w.output_lens, temperature=args.temperature, use_cuda_graph=device == "cuda",
                    max_batch_tokens=args.max_num_batched_tokens if device == "cuda" else None))]
        for scheduling, cap, run in runs:
            row = {"workload": name, "scheduling": scheduling, "max_num_seqs": cap}
            started = time.perf_counter()
            try:
                row.update(run())
                print(f"{name} {scheduling}: {row['output_tok_per_s']:.0f} output tok/s ({row['engine']}) "
                      f"[{time.perf_counter() - started:.0f} s]", flush=True)
            except RuntimeError as e:
                row["error"] = str(e)
                print(f"{name} {scheduling} failed: {e}", flush=True)
            rows.append(row)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# --- what the runs say --------------------------------------------------------------------------------------

def speedup_line(results: list[dict], workload: str, cap: int) -> str | None:
    by = {r["scheduling"]: r for r in results if r["workload"] == workload and r.get("max_num_seqs") == cap
          and "error" not in r}
    if "static" not in by or "continuous" not in by:
        return None
    x, y = by["static"]["requests_per_s"], by["continuous"]["requests_per_s"]
    return (f"Static Batching Throughput: {x:.2f} req/s. Continuous Batching (with PagedAttention) Throughput: "
            f"{y:.2f} req/s. Achieved {y / x:.2f}x speedup!")


def comparisons(results: list[dict], card: str, shape: str | None) -> list[str]:
    """Lines setting each workload's best engine run against the HF runs of this run and the notes' peers."""
    lines = []
    for name in dict.fromkeys(r["workload"] for r in results):
        best = max((r for r in results if r["workload"] == name and r["scheduling"] in ("static", "continuous")
                    and "error" not in r), key=lambda r: r["output_tok_per_s"], default=None)
        if best is None:
            continue
        ours = (f"{name}: engine ({best['scheduling']}, {best['max_num_seqs']} seqs) "
                f"{best['output_tok_per_s']:,.0f} tok/s")
        for r in results:
            if r["workload"] == name and r["scheduling"].startswith("hf-") and "error" not in r:
                lines.append(f"{ours} = {best['output_tok_per_s'] / r['output_tok_per_s']:.1f}x {r['engine']} "
                             f"({r['output_tok_per_s']:,.0f} tok/s, same run, {card})")
        for peer in workloads.peers(name, shape) if shape else []:
            lines.append(f"{ours} on {card} = {best['output_tok_per_s'] / peer.output_tok_per_s:.1f}x {peer.engine} "
                         f"({peer.output_tok_per_s:,.0f} tok/s on {peer.card}, notes)")
    return lines


def print_results(results: list[dict], card: str) -> None:
    print(f"{'workload':<8} {'scheduling':<13} {'seqs':>4} {'req/s':>7} {'out tok/s':>10} {'total tok/s':>11} "
          f"{'TTFT mean/p50/p99 (s)':>24} {'TPOT mean/p50/p99 (ms)':>24} {'preempt':>7}   ({card})")
    nan = dict.fromkeys(("mean", "p50", "p99"), float("nan"))
    for r in results:
        if "error" in r:
            print(f"{r['workload']:<8} {r['scheduling']:<13} failed: {r['error']}")
            continue
        t, p = r["ttft_s"] or nan, r["tpot_s"] or nan
        print(f"{r['workload']:<8} {r['scheduling']:<13} {r['max_num_seqs'] or '':>4} {r['requests_per_s']:>7.2f} "
              f"{r['output_tok_per_s']:>10.0f} {r['total_tok_per_s']:>11.0f} "
              f"{t['mean']:>8.2f}/{t['p50']:.2f}/{t['p99']:.2f} "
              f"{p['mean'] * 1e3:>10.1f}/{p['p50'] * 1e3:.1f}/{p['p99'] * 1e3:.1f} {r.get('preemptions', ''):>7}")
    print("\ncontinuous / static output tok/s, against the ceiling of free admissions (static's decode steps /"
          " continuous' decode steps, ideal_decode_steps):")
    by_key = {(r["workload"], r["max_num_seqs"], r["scheduling"]): r for r in results if "error" not in r}
    for (name, cap, scheduling), r in by_key.items():
        static = by_key.get((name, cap, "static"))
        if scheduling == "continuous" and static:
            steps = (f"; decode steps {static['decode_steps']} vs {r['decode_steps']} (mixed {static['mixed_steps']} "
                     f"vs {r['mixed_steps']}), prefill steps {static['prefill_steps']} vs {r['prefill_steps']} "
                     f"({static['prefill_s']:.2f} s vs {r['prefill_s']:.2f} s)") \
                if "decode_steps" in r and "decode_steps" in static else ""
            print(f"{name} max_num_seqs={cap}: {r['output_tok_per_s'] / static['output_tok_per_s']:.2f}x measured, "
                  f"{static['ideal_decode_steps'] / r['ideal_decode_steps']:.2f}x ceiling" + steps)


# --- the benchmark ---------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1,W2,W3", help="comma-separated, of W1, W2, W3")
    parser.add_argument("--scheduling", choices=["continuous", "static", "all"], default="all")
    parser.add_argument("--model-shape", choices=list(common.MODEL_SHAPES), default=common.DEFAULT_SHAPE)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model and small workloads (CPU-friendly)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads on a CPU, for the engine and HF alike (default: 1 with --tiny, else "
                             "torch's)")
    parser.add_argument("--temperature", type=float, default=0.6, help="nano-vllm's benchmark samples at 0.6")
    parser.add_argument("--max-num-seqs", default=None,
                        help="batch caps for W1/W2, comma-separated (default: 16,64,256; 8 with --tiny); W3 runs at "
                             "the largest")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: 2048 (W2's longest is 2048)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--enable-prefix-caching", action="store_true", help="(random prompts share no prefix)")
    parser.add_argument("--hf", choices=["auto", "off"], default="auto",
                        help="auto: also run Hugging Face transformers on the --hf-workloads when it is installed")
    parser.add_argument("--hf-workloads", default="W1,W2")
    parser.add_argument("--loop", choices=["step", "generate"], default="step",
                        help="step: add_request + step(), recording every step (the timeline); generate: one "
                             "generate() call per run (no timeline)")
    parser.add_argument("--profile", action="store_true", help="then profile decode steps (profile_step.py)")
    parser.add_argument("--no-plots", action="store_true", help="only the JSON (plot_throughput.py draws it later)")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="folder of the JSON and plots")
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - set(workloads.NAMES)
    if unknown or not args.workloads:
        parser.error(f"--workloads takes {', '.join(workloads.NAMES)}, got {','.join(args.workloads)}")
    if args.tiny and args.model_shape != common.DEFAULT_SHAPE:
        parser.error("--tiny runs the embedded tiny model: leave --model-shape out")
    try:
        args.caps = [int(c) for c in (args.max_num_seqs or ("8" if args.tiny else "16,64,256")).split(",")]
    except ValueError:
        parser.error(f"--max-num-seqs takes comma-separated ints, got {args.max_num_seqs!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shape = None if args.tiny else args.model_shape
    model = None if args.tiny else common.model_shape(args.model_shape)
    threads = common.cpu_threads(args.tiny, args.cpu_threads) if device == "cpu" else None
    if threads:
        torch.set_num_threads(threads)  # HF runs first, with the engine's count
    max_model_len = args.max_model_len or (256 if args.tiny else 2048)
    schedulings = ["static", "continuous"] if args.scheduling == "all" else [args.scheduling]
    info = common.run_info(device)
    card = info["card"]
    tag = common.result_tag(card, args.tiny, shape)
    path = args.out / f"throughput_{tag}.json"
    # HF first: its continuous batching sizes its cache from free memory, which our engine would hold
    hf_names = [n for n in args.hf_workloads.split(",") if n in args.workloads]
    hf_rows = [] if args.hf == "off" else run_hf_baselines(args, model, device, hf_names)
    results = [{**row, "card": card} for row in hf_rows]
    start = time.perf_counter()
    llm = LLM(model, device=device, dtype=args.dtype, max_num_seqs=max(args.caps), cpu_threads=threads,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_model_len,
              block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager)
    init_s = time.perf_counter() - start  # weights, KV sizing warm-up, CUDA graph capture
    llm.set_prefix_caching(args.enable_prefix_caching)
    dtype = str(llm.config.dtype).removeprefix("torch.")
    sets = {n: workloads.make_workload(n, tiny=args.tiny, vocab_size=llm.model_config.vocab_size)
            for n in args.workloads}

    def write_report(rows):
        report = {**info, "device": card, "model": common.model_description(shape), "model_shape": shape,
                  "engine_init_s": init_s, "kv_blocks": llm.manager.num_blocks, "dtype": dtype,
                  "cpu_threads": threads, "temperature": args.temperature,
                  "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": max_model_len,
                  "block_size": args.block_size, "enforce_eager": args.enforce_eager,
                  "prefix_caching": args.enable_prefix_caching,
                  "loop": args.loop, "workloads": {n: w.description for n, w in sets.items()},
                  "results": rows}
        common.write_json(path, report)
        return report

    for name, w in sets.items():
        for cap in [max(args.caps)] if name == "W3" else args.caps:
            for scheduling in schedulings:
                llm.set_scheduling(scheduling, max_num_seqs=cap)
                row = {"workload": name, "scheduling": scheduling, "max_num_seqs": cap, "card": card,
                       "ideal_decode_steps": ideal_decode_steps(w.output_lens, cap, scheduling),
                       **run_engine(llm, w, args.temperature, args.loop)}
                results.append(row)
                write_report(results)
                print(f"{name} {scheduling:>10} max_num_seqs={cap}: {row['requests_per_s']:.2f} req/s, "
                      f"{row['output_tok_per_s']:.0f} output tok/s, {row['total_tok_per_s']:.0f} total tok/s "
                      f"[{row['wall_s']:.1f} s]", flush=True)
    report = write_report(results)
    try:
        from plot_throughput import plot_throughput
        for png in [] if args.no_plots else plot_throughput(report, args.out, tag):
            print(f"wrote {png}")
    except ImportError as e:  # matplotlib is optional
        print(f"no plots ({e})")

    print(f"\n{card}, {report['model']}, {dtype}, {llm.manager.num_blocks} KV blocks of {args.block_size}, "
          f"engine start {init_s:.1f} s" + (f", {threads} CPU threads" if threads else ""))
    print_results(results, card)
    for line in comparisons(results, card, shape):
        print(line)
    print(f"wrote {path}")
    if args.profile:
        import profile_step
        w2 = max((r for r in results if r["workload"] == "W2" and r["scheduling"] == "continuous"),
                 key=lambda r: r["max_num_seqs"], default=None)
        profile_step.main_with_engine(llm, args.out, tag, tiny=args.tiny, temperature=args.temperature,
                                      w2_output_tok_per_s=w2 and w2["output_tok_per_s"], shape=shape)
    headlines = [(name, speedup_line(results, name, max(args.caps))) for name in args.workloads]
    headlines = [(name, line) for name, line in headlines if line]
    if headlines:  # the last workload's (W3's) is the run's last line
        name, line = headlines[-1]
        print(f"\n{card}, {common.model_description(shape)}, {name} at max_num_seqs={max(args.caps)}:\n{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
