"""Where the host's time goes while the engine serves a whole request set (W3 at max_num_seqs 256 by default).

    python benchmarks/host_calls.py                  # GPU: Qwen2.5-0.5B shape, W3, continuous, cap 256
    python benchmarks/host_calls.py --tiny           # CPU smoke run of the same pipeline

One engine runs the workload (every request at t=0, ``add_request`` / ``step`` to the end) twice:

1. under cProfile: the functions with the most time of their own (tottime), C calls included, so a CUDA call that
   blocks the host (an event's wait, a copy from pageable memory, a page-locked allocation) shows under its
   own name beside the engine's Python. The profiler slows Python calls (not the GPU), so it shows *which* calls
   take the time, not the unprofiled step's length;
2. under torch.profiler for ``--trace-steps`` steps from the middle of the run: per step, the CUDA runtime and
   driver calls the host made (count and time by name), the host's wall time, and how busy the GPU was
   (kernels, copies and memsets over the traced span).

JSON: results/host_calls_<workload>_<card>.json.
"""
from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import workloads  # noqa: E402
from benchmark_throughput import run_engine  # noqa: E402
from pagedattention import LLM  # noqa: E402
from profile_prefill import host_functions  # noqa: E402
from profile_step import STEP_LABEL, device_events, graph_gaps, load_trace, step_windows  # noqa: E402


def top_functions(prof: cProfile.Profile, seconds: float, steps: int, limit: int) -> list[dict]:
    """The ``limit`` functions with the most time of their own (``profile_prefill.host_functions``): ms in all, per
    step and as a share of the run."""
    return [{"function": where, "calls": calls, "tottime_ms": ms, "cumtime_ms": cumulative,
             "ms_per_step": ms / max(steps, 1), "share": ms / 1e3 / seconds}
            for where, calls, ms, cumulative in host_functions(prof, limit)]


def traced_run(llm: LLM, w: workloads.Workload, temperature: float, skip: int, steps: int) -> list[dict]:
    """Run ``w`` to the end, tracing ``steps`` steps after the first ``skip``; the trace's events."""
    for prompt, params in zip(w.prompts, w.sampling_params(temperature)):
        llm.add_request(prompt, params)
    for _ in range(skip):
        llm.step()
    on_gpu = llm.config.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                llm.step()
    while llm.has_unfinished_requests():
        llm.step()
    return load_trace(prof)


def api_calls(events: list[dict], windows) -> tuple[list[dict], dict]:
    """The CUDA runtime/driver calls made inside the traced steps, by name (count and µs per step), and the
    steps' host wall, the GPU's busy fraction over the span from the first step's start to the last one's end and
    its idle fraction between the kernels of a graph replay (the rest of the idle: waiting for the host)."""
    start, end = windows[0][0], windows[-1][1]
    per_name = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and start <= e["ts"] <= end:
            per_name[e["name"]][0] += 1
            per_name[e["name"]][1] += e.get("dur", 0.0)
    n = len(windows)
    calls = sorted(({"call": name, "per_step": count / n, "us_per_step": us / n, "us_per_call": us / count}
                    for name, (count, us) in per_name.items()), key=lambda r: -r["us_per_step"])
    busy, last = 0.0, start  # the union of the device's intervals inside the span
    device = sorted(device_events(events), key=lambda e: e["ts"])
    for e in device:
        a, b = max(e["ts"], last), min(e["ts"] + e["dur"], end)
        if b > a:
            busy, last = busy + b - a, b
    inside_graphs = 1e3 * graph_gaps([[e for e in device if start <= e["ts"] <= end]])  # µs
    walls = [b - a for a, b in windows]
    return calls, {"steps": n, "wall_ms_mean": statistics.fmean(walls) / 1e3,
                   "wall_ms_p50": statistics.median(walls) / 1e3, "gpu_busy_fraction": busy / (end - start),
                   "gpu_idle_inside_graphs_fraction": inside_graphs / (end - start)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=workloads.NAMES, default="W3")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default 256 (8 with --tiny)")
    parser.add_argument("--scheduling", choices=["continuous", "static"], default="continuous")
    parser.add_argument("--model-shape", choices=list(common.MODEL_SHAPES), default=common.DEFAULT_SHAPE)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model and small workloads (CPU)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--trace-skip", type=int, default=None, help="steps before the traced ones (default 1000; "
                                                                    "20 with --tiny)")
    parser.add_argument("--trace-steps", type=int, default=None, help="default 100 (10 with --tiny)")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cap = args.max_num_seqs or (8 if args.tiny else 256)
    skip = args.trace_skip if args.trace_skip is not None else (20 if args.tiny else 1000)
    steps = args.trace_steps or (10 if args.tiny else 100)
    info = common.run_info(device)
    llm = LLM(None if args.tiny else common.model_shape(args.model_shape), device=device, max_num_seqs=cap,
              max_num_batched_tokens=8192, max_model_len=256 if args.tiny else 2048,
              cpu_threads=common.cpu_threads(args.tiny) if device == "cpu" else None)
    llm.set_scheduling(args.scheduling, max_num_seqs=cap)
    w = workloads.make_workload(args.workload, tiny=args.tiny, vocab_size=llm.model_config.vocab_size)

    run_engine(llm, w, args.temperature)  # warm: every bucket this run takes has run once
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    row = run_engine(llm, w, args.temperature)
    prof.disable()
    seconds = time.perf_counter() - start
    num_steps = row["prefill_steps"] + row["decode_steps"]
    functions = top_functions(prof, seconds, num_steps, args.top)
    skip = max(0, min(skip, num_steps - steps))  # the traced steps lie inside the run
    events = traced_run(llm, w, args.temperature, skip, steps)
    calls, traced = api_calls(events, step_windows(events))

    label = f"{info['card']}, {common.model_description(None if args.tiny else args.model_shape)}, {args.workload} " \
            f"{args.scheduling} at max_num_seqs={cap}"
    print(f"\n{label}: under cProfile {seconds:.2f} s for {num_steps} steps ({row['wall_s']:.2f} s inside run_engine)")
    print(f"{'ms/step':>8} {'share':>6} {'calls':>8}  function (time of its own)")
    for r in functions:
        print(f"{r['ms_per_step']:8.3f} {100 * r['share']:5.1f}% {r['calls']:8d}  {r['function'][:100]}")
    print(f"\n{label}: {traced['steps']} traced steps after {skip}: wall {traced['wall_ms_mean']:.3f} ms mean "
          f"({traced['wall_ms_p50']:.3f} p50), GPU busy {100 * traced['gpu_busy_fraction']:.1f}%, idle between a "
          f"graph's kernels {100 * traced['gpu_idle_inside_graphs_fraction']:.1f}% (the rest: waiting for the host)")
    print(f"{'us/step':>8} {'calls':>6} {'us/call':>8}  CUDA call")
    for r in calls[:20]:
        print(f"{r['us_per_step']:8.1f} {r['per_step']:6.1f} {r['us_per_call']:8.1f}  {r['call']}")
    tag = common.result_tag(info["card"], args.tiny, None)
    path = common.write_json(args.out / f"host_calls_{args.workload}_{tag}.json", {
        **info, "model": common.model_description(None if args.tiny else args.model_shape),
        "workload": args.workload, "scheduling": args.scheduling, "max_num_seqs": cap,
        "cprofile": {"seconds": seconds, "steps": num_steps, "functions": functions},
        "trace": {**traced, "skip": skip, "cuda_calls": calls}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
