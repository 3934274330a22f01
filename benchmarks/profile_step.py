"""Where a decode step's time goes: the GPU time of each part against its own bound, and how idle the GPU is.

    python benchmarks/profile_step.py                     # GPU: Qwen2.5-0.5B shape, batches 1/16/64/256
    python benchmarks/profile_step.py --tiny              # CPU smoke run of the same pipeline
    python benchmarks/benchmark_throughput.py --profile   # the same, on the benchmark's engine, after its runs

For each batch size, that many requests (random prompts of ~900 tokens, U[0.9, 1.1] x --context) are prefilled
through the public loop (``add_request`` / ``step``) until one decode step runs them all; then decode steps are
(1) timed whole, ``llm.step()`` (schedule + prepare + graph replay + LM head + sample + postprocess), without a
profiler, with timers around the engine's phases (``HOST_PHASES``): the host's time in each, and the time it
spends blocked waiting for the GPU (``host_wait_ms``; the rest of the step is the host's own work, so a step that
never waits is host-bound); (2) traced with torch.profiler:
every CUDA kernel (Numba's appear by their mangled Python names, cuBLAS's by theirs) is put in a part by its
name, except that a step's last GEMM is the LM head and whatever runs after it is sampling (the logits' float
cast, temperature, the draw). Kernel names no rule knows are "other" and are printed, so the table hides
nothing; a second table lists every kernel (launches and time per step, time per launch), largest first.

Bounds, per step: attention reads each sequence's K/V once (+ q, out); the GEMMs read their weights once
(+ activations) or do their FLOPs, whichever takes longer; norms/RoPE/SwiGLU move their activations once; the
LM head reads its matrix and writes the logits (or its FLOPs); sampling reads the logits once. Bytes go at
the measured copy bandwidth, FLOPs at the measured bf16 GEMM rate (the model's gate_up projection over 8,192
tokens). GPU idle = 1 - (kernel + copy time) / step wall time, in two parts: the gaps between the kernels of a
CUDA graph replay (each of its kernels carries the launch's correlation id; a decode step's graph is ~230 kernels)
and the rest, the device waiting for the host's next launch, between steps or between a step's launches.

The W2 bound (same run): every decode step reads the weights once (common.weight_bytes) and the running
sequences' KV; W2's requests all run at once (cap 256), so it has max(output) - 1 decode steps; plus the prompts'
prefill FLOPs at the GEMM rate. Output tokens / those seconds = the bound on output tok/s; W2 is run on the
same engine (continuous, ``generate``) and reported as a fraction of it. JSON: results/profile_<card>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import workloads  # noqa: E402
from benchmark_throughput import ideal_decode_steps  # noqa: E402
from pagedattention import LLM, SamplingParams  # noqa: E402
from pagedattention.engine.cuda_graphs import CudaGraphs  # noqa: E402
from pagedattention.engine.distributed import TensorParallelRunner  # noqa: E402
from pagedattention.engine.model_runner import ModelRunner  # noqa: E402
from pagedattention.engine.sampler import PendingSample, Sampler  # noqa: E402
from pagedattention.engine.scheduler import Scheduler  # noqa: E402
from pagedattention.kernels import sampling  # noqa: E402

STEP_LABEL = "profile_step.decode"
PARTS = ("attention", "gemm", "layer_ops", "lm_head", "sampling", "copies", "other")
# A kernel's part by its (lowercased) name, first match wins. Numba names keep the module and function
# (pagedattention::kernels::layer_ops::_add_rms_norm_kernel::<locals>::kernel); on a CPU the "kernels" are
# aten ops.
NAME_RULES = [
    ("attention", re.compile(r"paged_attention|paged_prefill|build_(v1|v2|tc|merge)_kernel|scaled_dot_product")),
    ("gemm", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|splitkreduce|cublas|wgmma"
                        r"|^aten::(mm|addmm|bmm|linear|matmul)$")),
    ("layer_ops", re.compile(r"layer_ops|rope_write_kv|add_rms_norm|silu|norm(?!al)|cos_kernel|sin_kernel"
                             r"|^aten::(cos|sin)$")),
]
# Host phases: the engine's methods that make each. A phase's time leaves out the phases called inside it (the
# wait for the staging buffers inside ``execute`` is a wait); the tracer is not used, as it inflates Python calls.
HOST_PHASES = {
    "schedule": [(Scheduler, "schedule"), (Scheduler, "schedule_next"), (Scheduler, "schedule_prompts_next")],
    "prepare": [(ModelRunner, "prepare"), (TensorParallelRunner, "prepare")],
    "execute (rest)": [(ModelRunner, "execute"), (TensorParallelRunner, "execute")],
    "staging (graph inputs)": [(CudaGraphs, "stage")],
    "graph replay": [(torch.cuda.CUDAGraph, "replay")],
    "sampler launch (rest)": [(Sampler, "launch")],
    "sampling kernel launch": [(sampling, "sample_tokens")],
    "sampler result": [(PendingSample, "result")],
    "postprocess": [(Scheduler, "postprocess")],
    "waiting for the GPU": [(torch.cuda.Event, "synchronize")],  # the tokens, the staging buffers' last copies
}
GPU_PHASES = ("staging (graph inputs)", "graph replay", "sampling kernel launch", "waiting for the GPU")  # 0 on a CPU


# --- reading a trace -----------------------------------------------------------------------------------

def part_of(name: str) -> str:
    lowered = name.lower()
    return next((part for part, rule in NAME_RULES if rule.search(lowered)), "other")


def load_trace(prof) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        data = json.loads(Path(f"{tmp}/trace.json").read_text())
    return data["traceEvents"] if isinstance(data, dict) else data


def step_windows(events: list[dict]) -> list[tuple[float, float]]:
    """(start, end) in µs of every traced ``llm.step()`` call, as the host saw it."""
    return sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name") == STEP_LABEL)


def launch_times(events: list[dict]) -> dict[int, float]:
    """When the host launched the work of each correlation id: a kernel, copy or graph launch (every kernel of a
    replayed CUDA graph carries its cudaGraphLaunch's id)."""
    return {e["args"]["correlation"]: e["ts"] for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}


def device_events(events: list[dict]) -> list[dict]:
    """The GPU's kernels, copies and memsets. A trace without any (a CPU run) gives its aten ops, each with its
    self time (its duration less its children's) as "dur", so that nested ops are not counted twice."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if gpu:
        return gpu
    ops = sorted((dict(e) for e in events if e.get("cat") == "cpu_op" and "dur" in e),
                 key=lambda e: (e.get("tid"), e["ts"], -e["dur"]))
    stack = []
    for e in ops:
        while stack and (stack[-1]["tid"] != e.get("tid") or stack[-1]["end"] <= e["ts"]):
            stack.pop()
        if stack:
            stack[-1]["self"] -= e["dur"]
        e.update(end=e["ts"] + e["dur"], self=e["dur"])
        stack.append(e)
    return [{**e, "dur": max(e["self"], 0.0)} for e in ops]


def split_steps(windows, events, launched: dict[int, float] | None = None) -> tuple[list[list[dict]], int]:
    """Each window's events in time order, and how many events fell in no window. An event belongs to the step
    that launched it (``launched``: correlation id -> launch time), else to the one it ran in: a step may end
    before the GPU does (an engine that launches the next step before processing the last one)."""
    launched = launched or {}
    steps, outside = [[] for _ in windows], 0
    for e in sorted(events, key=lambda e: e["ts"]):
        when = launched.get(e.get("args", {}).get("correlation"), e["ts"])
        i = next((i for i, (a, b) in enumerate(windows) if a <= when <= b), None)
        if i is None:
            outside += 1
        else:
            steps[i].append(e)
    return steps, outside


def short_name(name: str) -> str:
    """A kernel's name, short enough for a table: a Numba kernel by its module and builder
    (``layer_ops::_add_rms_norm_kernel::kernel``), anything else by its first 60 characters."""
    if "pagedattention::kernels::" in name:
        name = name.split("pagedattention::kernels::", 1)[1]
        name = re.sub(r"::(_3clocals_3e|<locals>)", "", name).split("(")[0]
    return name[:60]


def classify_step(step: list[dict]) -> tuple[dict, dict, dict]:
    """µs per part of one step's events (time-ordered), µs per kernel name of the "other" part, and
    (part, launches, µs) per short kernel name."""
    parts, others, kernels = dict.fromkeys(PARTS, 0.0), defaultdict(float), {}
    kinds = [("copies" if e.get("cat") in ("gpu_memcpy", "gpu_memset") else part_of(e["name"])) for e in step]
    lm_head = max((i for i, k in enumerate(kinds) if k == "gemm"), default=None)
    for i, (e, kind) in enumerate(zip(step, kinds)):
        if lm_head is not None and i == lm_head:
            kind = "lm_head"
        elif lm_head is not None and i > lm_head and kind != "copies":
            kind = "sampling"
        parts[kind] += e["dur"]
        if kind == "other":
            others[e["name"]] += e["dur"]
        _, calls, us = kernels.get(key := (kind, short_name(e["name"])), (kind, 0, 0.0))
        kernels[key] = (kind, calls + 1, us + e["dur"])
    return parts, dict(others), kernels


# --- bounds --------------------------------------------------------------------------------------------

def layer_op_bytes(mc, tokens: int, dtype_bytes: int) -> int:
    """Bytes the fused layer ops move at least over ``tokens`` tokens: each add + RMSNorm reads and writes x and
    the residual (and reads its weights), RoPE reads q/k/v and writes q and the cache (cos/sin in float32), the
    q/k norms read and write q and k, SwiGLU reads gate and up and writes their product."""
    d, h, layers = dtype_bytes, mc.hidden_size, mc.num_hidden_layers
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    norms = (2 * layers + 1) * (4 * tokens * h + h) * d
    rope = layers * tokens * (2 * (q + 2 * kv) * d + 2 * mc.head_dim * 4)
    qk_norm = layers * tokens * 2 * (q + kv) * d if mc.qk_norm else 0
    return norms + rope + qk_norm + layers * tokens * 3 * mc.intermediate_size * d


def measured_rates(llm: LLM) -> tuple[tuple[int, int, int], float, float]:
    """(the GEMM's M, K, N; copy bytes/s; GEMM FLOP/s) on the engine's device: the copy roofline and the bf16
    rate of the model's gate_up projection over a prefill step's tokens (a CPU smoke run takes small sizes, its
    numbers mean little)."""
    device, mc = llm.config.device, llm.model_config
    on_gpu = device.type == "cuda"
    gemm = (8192 if on_gpu else 256, mc.hidden_size, 2 * mc.intermediate_size)
    copy_bw = common.copy_bandwidth(device) if on_gpu else common.copy_bandwidth(device, nbytes=64 << 20, reps=3)
    return gemm, copy_bw, common.matmul_rate(device, *gemm, dtype=llm.config.dtype)


def part_bounds(mc, batch: int, context: float, dtype_bytes: int, copy_bw: float, rate: float) -> dict:
    """Seconds each part of one decode step needs at least (module docstring), for ``batch`` sequences of
    ``context`` tokens."""
    d, h, i, layers = dtype_bytes, mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    q, kv, v = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim, mc.vocab_size
    attention = layers * batch * (2 * context * kv + 2 * q) * d
    linear = common.layer_linear_params(mc)
    activations = layers * batch * d * (h + (q + 2 * kv) + q + h + h + 2 * i + i + h)
    return {"attention": attention / copy_bw,
            "gemm": max((layers * linear * d + activations) / copy_bw, 2 * batch * layers * linear / rate),
            "layer_ops": layer_op_bytes(mc, batch, d) / copy_bw,
            "lm_head": max((v * h + batch * h + batch * v) * d / copy_bw, 2 * batch * h * v / rate),
            "sampling": batch * v * d / copy_bw}


def workload_bound(mc, w: workloads.Workload, dtype_bytes: int, copy_bw: float, rate: float, cap: int = 256) -> dict:
    """The physical bound of a request set at batch cap ``cap`` (module docstring)."""
    decode_lens = [o - 1 for o in w.output_lens if o > 1]  # the first token comes from the prefill
    steps = ideal_decode_steps(decode_lens, cap, "continuous") if decode_lens else 0
    # a request of prompt p decoding n tokens reads p + 1, p + 2, ..., p + n tokens' K/V
    kv_tokens = sum(n * len(p) + n * (n + 1) // 2 for p, n in zip(w.prompts, [o - 1 for o in w.output_lens]))
    weights_s = steps * common.weight_bytes(mc, dtype_bytes) / copy_bw
    kv_s = kv_tokens * common.kv_bytes_per_token(mc, dtype_bytes) / copy_bw
    prefill_s = sum(common.prefill_flops(mc, len(p)) for p in w.prompts) / rate
    seconds = weights_s + kv_s + prefill_s
    return {"decode_steps": steps, "mean_batch": sum(decode_lens) / steps if steps else 0.0,
            "weight_bytes_per_step": common.weight_bytes(mc, dtype_bytes),
            "kv_bytes_per_token": common.kv_bytes_per_token(mc, dtype_bytes), "kv_tokens_read": kv_tokens,
            "weights_s": weights_s, "kv_s": kv_s, "prefill_s": prefill_s, "seconds": seconds,
            "output_tok_per_s": w.output_tokens / seconds}


# --- measuring -----------------------------------------------------------------------------------------

def start_decoding(llm: LLM, batch: int, context: int, max_tokens: int, temperature: float, seed: int) -> list[str]:
    """``batch`` requests of ~``context`` prompt tokens, stepped until one decode step runs them all."""
    rng, vocab = random.Random(seed), llm.model_config.vocab_size
    # final_only: the step's time is the engine's, not that of building every request's output each step
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, output_kind="final_only")
    ids = [llm.add_request([rng.randrange(vocab) for _ in range(rng.randint(int(0.9 * context), int(1.1 * context)))],
                           params) for _ in range(batch)]
    while True:
        if not llm.has_unfinished_requests():
            raise RuntimeError(f"batch {batch}: the requests ended before decoding together")
        llm.step()
        if not llm.last_step.is_prefill and llm.last_step.num_seqs == batch:
            return ids


@contextlib.contextmanager
def host_phase_timers():
    """Seconds in each ``HOST_PHASES`` phase, summed into the yielded dict while it is open. Each phase leaves out
    the timed calls made inside it; "waiting for the GPU" is the time blocked in ``torch.cuda.Event.synchronize``
    (the engine's only waits: a step's tokens, and the staging buffers' last copies). A step's wall time minus
    the wait is the host's own work: a step that waits is GPU-bound, one that does not is host-bound."""
    totals = dict.fromkeys(HOST_PHASES, 0.0)
    inside = [0.0]  # seconds of timed calls made inside the call running now
    # (a method inherited from a C base class is not in the owner's __dict__: it is wrapped, then deleted again)
    originals = [(owner, name, owner.__dict__.get(name)) for methods in HOST_PHASES.values() for owner, name in methods]

    def timer(phase, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            outer, inside[0] = inside[0], 0.0
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                totals[phase] += elapsed - inside[0]
                inside[0] = outer + elapsed
        return timed
    for phase, methods in HOST_PHASES.items():
        for owner, name in methods:
            setattr(owner, name, timer(phase, owner.__dict__.get(name) or getattr(owner, name)))
    try:
        yield totals
    finally:
        for owner, name, method in originals:
            if method is None:
                delattr(owner, name)
            else:
                setattr(owner, name, method)


def traced_steps(llm: LLM, steps: int, on_gpu: bool) -> list[dict]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                llm.step()
    return load_trace(prof)


def profile_batch(llm: LLM, batch: int, context: int, steps: int, temperature: float) -> dict:
    on_gpu = llm.config.device.type == "cuda"
    warmup, timed = 3, max(2 * steps, 5)
    ids = start_decoding(llm, batch, context, warmup + timed + steps + 4, temperature, seed=batch)  # never ends
    for _ in range(warmup):
        llm.step()
    walls = []
    with host_phase_timers() as phases:
        for _ in range(timed):
            start = time.perf_counter()
            llm.step()
            walls.append(1e3 * (time.perf_counter() - start))
    host = {phase: 1e3 * seconds / timed for phase, seconds in phases.items()}
    host["rest of llm.step"] = statistics.fmean(walls) - sum(host.values())
    host["llm.step"] = statistics.fmean(walls)
    trace = traced_steps(llm, steps, on_gpu)
    ran_whole = llm.last_step.num_seqs == batch and not llm.last_step.is_prefill
    for request_id in ids:
        llm.abort_request(request_id)
    per_step, outside = split_steps(step_windows(trace), device_events(trace), launch_times(trace))
    parts, others, kernels = mean_parts(per_step)
    wall, busy = statistics.median(walls), sum(parts.values())
    if busy == 0:
        print(f"batch {batch}: no kernels inside the traced steps (was the GPU traced?); the parts read 0")
    inside_graphs = graph_gaps(per_step)
    return {"batch": batch, "steps_traced": len(per_step), "events_outside_steps": outside, "ran_whole": ran_whole,
            "kernels_per_step": sum(map(len, per_step)) / max(len(per_step), 1),
            "context_mean": context + warmup + timed + steps / 2,
            "wall_ms": wall, "wall_ms_p90": common.percentile(walls, 90),
            "host_wait_ms": host["waiting for the GPU"],
            "device_busy_ms": busy, "device_idle_fraction": 1 - busy / wall, "parts_ms": parts,
            # the idle fraction in two: the gaps between the kernels of a graph (from the trace), and the rest,
            # the device waiting for the host's next launch (between steps, or between a step's launches)
            "device_idle_inside_graphs_fraction": inside_graphs / wall,
            "device_idle_waiting_fraction": 1 - (busy + inside_graphs) / wall,
            "other_kernels_ms": others, "kernels": kernels, "host_phases_ms": host}


def busy_union(step: list[dict]) -> float:
    """µs during which any of a step's events ran (overlapping events counted once)."""
    busy, end = 0.0, float("-inf")
    for e in sorted(step, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy


def span_of(events: list[dict]) -> float:
    """µs from the first event's start to the last one's end."""
    return max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)


def graph_gaps(per_step: list[list[dict]]) -> float:
    """ms per step that the device sat idle inside CUDA graphs: for each graph replay (the kernels that share its
    launch's correlation id), the time from its first kernel's start to its last one's end that no kernel of it
    ran; mean over the traced steps. The device's own clock: tracing the host does not stretch it."""
    total = 0.0
    for step in per_step:
        launches = defaultdict(list)
        for e in step:
            if "correlation" in e.get("args", {}):
                launches[e["args"]["correlation"]].append(e)
        for events in launches.values():
            if len(events) > 1:
                total += span_of(events) - busy_union(events)
    return total / max(len(per_step), 1) / 1e3


def mean_parts(per_step: list[list[dict]]) -> tuple[dict, dict, list[dict]]:
    """ms per step of each part, and of each "other" kernel name (largest first), over the traced steps; and
    each kernel's launches and ms per step (largest first)."""
    parts, others, n = dict.fromkeys(PARTS, 0.0), defaultdict(float), max(len(per_step), 1)
    kernels = defaultdict(lambda: [0.0, 0.0])
    for step in per_step:
        step_parts, step_others, step_kernels = classify_step(step)
        for k, us in step_parts.items():
            parts[k] += us / n / 1e3
        for k, us in step_others.items():
            others[k] += us / n / 1e3
        for key, (_, calls, us) in step_kernels.items():
            kernels[key][0] += calls / n
            kernels[key][1] += us / n / 1e3
    table = [{"part": part, "kernel": name, "launches": calls, "ms": ms, "us_per_launch": 1e3 * ms / calls}
             for (part, name), (calls, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])]
    return parts, dict(sorted(others.items(), key=lambda kv: -kv[1])), table


def profile_engine(llm: LLM, batches, context: int, steps: int, temperature: float, copy_bw: float,
                   rate: float) -> list[dict]:
    rows, built = [], llm.config.max_num_seqs
    dtype_bytes = llm.config.dtype.itemsize
    for batch in batches:
        if batch > built:
            print(f"batch {batch} skipped: the engine was built for {built} sequences")
            continue
        llm.set_scheduling("continuous", max_num_seqs=batch)
        row = profile_batch(llm, batch, context, steps, temperature)
        bounds = part_bounds(llm.model_config, batch, row["context_mean"], dtype_bytes, copy_bw, rate)
        row["bounds_ms"] = {k: 1e3 * v for k, v in bounds.items()}
        row["step_bound_ms"] = sum(row["bounds_ms"].values())
        rows.append(row)
        print(f"batch {batch}: step {row['wall_ms']:.3f} ms wall, device busy {row['device_busy_ms']:.3f} ms "
              f"({100 * row['device_idle_fraction']:.0f}% idle, "
              f"{100 * row['device_idle_waiting_fraction']:.0f}% waiting for the host), "
              f"bound {row['step_bound_ms']:.3f} ms", flush=True)
    llm.set_scheduling(max_num_seqs=built)
    return rows


def print_profile(report: dict) -> None:
    rows = report["rows"]
    print(f"\nDecode step, {report['model']}, {report['dtype']}, context ~{report['context']}, {report['card']} "
          f"(copy {report['copy_tbps']:.3g} TB/s, GEMM {report['matmul_tflops']:.3g} TFLOP/s); ms per step, "
          "measured / bound")
    print(f"{'part':<30}" + "".join(f"{'B=' + str(r['batch']):>20}" for r in rows))
    for part in PARTS:
        cells = [f"{r['parts_ms'][part]:.3f}" + (f" / {r['bounds_ms'][part]:.3f}" if part in r["bounds_ms"] else "")
                 for r in rows]
        print(f"{part:<30}" + "".join(f"{c:>20}" for c in cells))
    busy = [f"{r['device_busy_ms']:.3f} / {r['step_bound_ms']:.3f}" for r in rows]
    print(f"{'device busy / step bound':<30}" + "".join(f"{c:>20}" for c in busy))
    print(f"{'llm.step() wall':<30}" + "".join(f"{r['wall_ms']:>20.3f}" for r in rows))
    print(f"{'device idle':<30}" + "".join(f"{100 * r['device_idle_fraction']:>19.1f}%" for r in rows))
    for key, label in (("device_idle_inside_graphs_fraction", "  between a graph's kernels"),
                       ("device_idle_waiting_fraction", "  waiting for the host")):
        print(f"{label:<30}" + "".join(f"{100 * r[key]:>19.1f}%" for r in rows))
    print(f"{'host waiting for the GPU':<30}" + "".join(f"{r['host_wait_ms']:>20.3f}" for r in rows))
    print("\nhost time per step by phase (ms, timers, untraced; a phase leaves out those inside it):")
    for phase in rows[0]["host_phases_ms"] if rows else []:
        print(f"{phase:<30}" + "".join(f"{r['host_phases_ms'][phase]:>20.3f}" for r in rows))
    for r in rows:
        print(f"\nB={r['batch']} kernels, per step: launches, ms, µs per launch")
        for k in r["kernels"][:14]:
            print(f"  {k['part']:<10} {k['kernel'][:60]:<60} {k['launches']:6.1f} {k['ms']:8.4f} "
                  f"{k['us_per_launch']:7.2f}")
    for r in rows:  # every name no rule knows, so that "other" hides nothing (the JSON keeps them whole)
        if r["other_kernels_ms"]:
            print(f"B={r['batch']} unclassified (\"other\"), ms per step:")
            for name, ms in list(r["other_kernels_ms"].items())[:20]:
                print(f"  {ms:8.4f}  {name[:150]}")
    b = report.get("w2_bound")
    if b:
        print(f"\nW2 bound on {report['card']}: {b['decode_steps']} decode steps at a mean batch of "
              f"{b['mean_batch']:.0f}: weights {b['weights_s']:.3f} s + KV {b['kv_s']:.3f} s + prefill "
              f"{b['prefill_s']:.3f} s = {b['seconds']:.3f} s -> {b['output_tok_per_s']:,.0f} output tok/s")
        if report.get("w2_output_tok_per_s"):
            print(f"W2 measured: {report['w2_output_tok_per_s']:,.0f} output tok/s = "
                  f"{100 * report['w2_fraction_of_bound']:.1f}% of the bound")


# --- the script ------------------------------------------------------------------------------------------

def main_with_engine(llm: LLM, out: Path, tag: str, *, tiny: bool, temperature: float = 0.6, batches=None,
                     context: int | None = None, steps: int | None = None, run_w2: bool = True,
                     w2_output_tok_per_s: float | None = None, shape: str | None = common.DEFAULT_SHAPE) -> dict:
    """Profile ``llm``'s decode steps, compute W2's bound (and run W2 unless its throughput is given), print the
    tables and write results/profile_<tag>.json. ``llm`` must be idle; it is left idle."""
    device, mc = llm.config.device, llm.model_config
    batches = batches or ([1, 4, 8] if tiny else [1, 16, 64, 256])
    context, steps = context or (48 if tiny else 900), steps or (3 if tiny else 10)
    gemm, copy_bw, rate = measured_rates(llm)
    rows = profile_engine(llm, batches, context, steps, temperature, copy_bw, rate)
    w2 = workloads.make_workload("W2", tiny=tiny, vocab_size=mc.vocab_size)
    bound = workload_bound(mc, w2, llm.config.dtype.itemsize, copy_bw, rate, cap=min(256, llm.config.max_num_seqs))
    if w2_output_tok_per_s is None and run_w2:
        llm.set_scheduling("continuous")
        start = time.perf_counter()
        llm.generate(w2.prompts, w2.sampling_params(temperature), use_tqdm=False)
        w2_output_tok_per_s = w2.output_tokens / (time.perf_counter() - start)
    report = {**common.run_info(device), "model": common.model_description(None if tiny else shape),
              "dtype": str(llm.config.dtype).removeprefix("torch."), "context": context,
              "copy_tbps": copy_bw / 1e12, "matmul_tflops": rate / 1e12, "matmul_shape_mkn": list(gemm),
              "rows": rows, "w2_bound": bound, "w2_output_tok_per_s": w2_output_tok_per_s,
              "w2_fraction_of_bound": w2_output_tok_per_s / bound["output_tok_per_s"] if w2_output_tok_per_s else None}
    print_profile(report)
    path = common.write_json(Path(out) / f"profile_{tag}.json", report)
    print(f"wrote {path}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model on the CPU (a smoke run)")
    parser.add_argument("--model-shape", choices=list(common.MODEL_SHAPES), default=common.DEFAULT_SHAPE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,16,64,256; 1,4,8 with --tiny)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens per sequence (default 900; 48 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps traced per batch (default 10; 3 tiny)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--no-w2", action="store_true", help="compute W2's bound but do not run W2")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.tiny and args.model_shape != common.DEFAULT_SHAPE:
        parser.error("--tiny runs the embedded tiny model: leave --model-shape out")
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    except ValueError:
        parser.error(f"--batches takes comma-separated ints, got {args.batches!r}")
    batches = batches or ([1, 4, 8] if args.tiny else [1, 16, 64, 256])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    threads = common.cpu_threads(args.tiny, args.cpu_threads) if device == "cpu" else None
    model = None if args.tiny else common.model_shape(args.model_shape)
    llm = LLM(model, device=device, max_num_seqs=max(batches), max_model_len=256 if args.tiny else 2048,
              cpu_threads=threads)
    tag = common.result_tag(common.card_name(device), args.tiny, None if args.tiny else args.model_shape)
    main_with_engine(llm, args.out, tag, tiny=args.tiny, temperature=args.temperature, batches=batches,
                     context=args.context, steps=args.steps, run_w2=not args.no_w2, shape=args.model_shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
