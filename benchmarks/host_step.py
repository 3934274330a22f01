"""The engine's host time per decode step, without the model: what the Python around the GPU costs.

On the H200 a decode step of the Qwen2.5-0.5B shape at batch 256 takes about as long on the host (scheduling,
block tables, staging, sampler set-up, postprocess) as on the GPU, so the host's own cost decides W1 there.
This measures it on any machine: the embedded tiny model's engine on the CPU, its forward pass replaced by a
ready logits tensor, and the one-pass sampling kernel by a ready [2, rows] result, so everything else runs as
in a GPU step (the overlapped loop, the scheduler, the manager's block tables, the sampler's per-row set-up,
``PendingSample.result``, postprocess). Requests never end during the timed steps.

    python benchmarks/host_step.py [--batches 1,64,256] [--steps 50] [--rounds 40] [--out benchmarks/results]
    python benchmarks/host_step.py --workload W3 [--repeats 3]   # a whole request set, continuous at 256 seats

Prints ms per step at each batch, wall and the process's CPU time, each the minimum and the median over the
rounds, and writes results/host_step_cpu.json (the machine is the host it ran on). On a shared machine the
minimum over many short rounds is the figure to compare: other tenants slow whole seconds of a run down.

``--workload``: every request of W1, W2 or W3 (workloads.py) at t=0, continuous batching at 256 seats, the
GPU's mixed-step prompt limit (2,048 tokens, 8 prompts; ``cuda_graphs.MIXED_PROMPTS``), the model and the
sampling kernel replaced as above: the same steps as on the GPU (outputs end by length, so the schedule does not
depend on the tokens), and the host's seconds in each kind of step. Writes results/hostload_<workload>_cpu.json.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
import benchmarks.workloads as workloads  # noqa: E402
from pagedattention import LLM, SamplingParams  # noqa: E402
from pagedattention.kernels import sampling  # noqa: E402

GPU_MIXED_PROMPT_LIMIT = (2048, 8)  # (tokens, prompts): the largest mixed bucket of the GPU's CUDA graphs


def host_ms_per_step(batch: int, steps: int, repeats: int = 5) -> tuple[list[float], list[float]]:
    """ms per ``llm.step()`` over ``repeats`` rounds of ``steps`` decode steps at ``batch`` running sequences:
    each round's wall time and the process's CPU time."""
    llm = LLM(None, device="cpu", max_num_seqs=batch, max_model_len=4096, num_kv_blocks=batch * 260,
              cpu_threads=1)
    vocab = llm.model_config.vocab_size
    rng = random.Random(batch)
    for _ in range(batch):
        params = SamplingParams(temperature=0.6, max_tokens=4000, ignore_eos=True, output_kind="final_only")
        llm.add_request([rng.randrange(vocab) for _ in range(8)], params)
    while llm.last_step is None or llm.last_step.is_prefill or llm.last_step.num_seqs < batch:
        llm.step()
    real_sample_tokens = replace_model_and_sampling(llm, batch)
    try:
        walls, cpus = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                llm.step()
            walls.append((time.perf_counter() - start) / steps * 1e3)
            cpus.append((time.process_time() - cpu) / steps * 1e3)
    finally:
        sampling.sample_tokens = real_sample_tokens
    assert llm.last_step.num_seqs == batch, "a request ended during the timed steps"
    return walls, cpus


def replace_model_and_sampling(llm: LLM, rows: int):
    """The model's forward pass returns ready logits (up to ``rows`` rows) and the sampling kernel a ready result;
    returns the real ``sample_tokens``, to be put back."""
    vocab = llm.model_config.vocab_size
    logits = torch.randn(rows, vocab)
    drawn = torch.stack([torch.randint(0, vocab, (rows,)).float(), torch.full((rows,), -1.0)])
    llm.stepper.runner.execute = lambda inputs, eager=False: logits[:len(inputs.logit_rows)]
    llm.stepper.sampler.use_kernel = True
    real, sampling.sample_tokens = sampling.sample_tokens, lambda logits, _: drawn[:, :logits.shape[0]].contiguous()
    return real


def workload_engine(cap: int) -> LLM:
    """The engine a workload runs on here: the embedded tiny model on the CPU, sized as the GPU runs are
    (2,048-token context, 8,192-token steps, ``cap`` seats) and with the GPU's mixed-step prompt limit."""
    llm = LLM(None, device="cpu", max_num_seqs=cap, max_model_len=2048, num_kv_blocks=cap * 2048 // 16,
              max_num_batched_tokens=8192, cpu_threads=1)
    llm.scheduler.mixed_prompt_limit = GPU_MIXED_PROMPT_LIMIT
    return llm


@contextlib.contextmanager
def replayed_workload(name: str, cap: int = 256, tiny: bool = False, scheduling: str = "continuous"):
    """``workload_engine(cap)`` with every request of workload ``name`` added and the model and the sampling kernel
    replaced; yields the engine, to be stepped to the end, and puts the sampling kernel back after."""
    llm = workload_engine(cap)
    llm.set_scheduling(scheduling, max_num_seqs=cap)
    w = workloads.make_workload(name, tiny=tiny, vocab_size=llm.model_config.vocab_size)
    real_sample_tokens = replace_model_and_sampling(llm, cap)  # a step samples at most one row a sequence
    try:
        for prompt, params in zip(w.prompts, w.sampling_params(0.6)):
            llm.add_request(prompt, params)
        yield llm
    finally:
        sampling.sample_tokens = real_sample_tokens


def host_seconds_of_workload(name: str, cap: int = 256, tiny: bool = False) -> dict:
    """Run workload ``name`` to the end with the model and the sampling kernel replaced; the host's seconds
    (wall and the process's CPU time) and the number of steps, per step kind."""
    kinds = {kind: {"steps": 0, "wall_s": 0.0, "cpu_s": 0.0} for kind in ("prefill", "mixed", "decode")}
    with replayed_workload(name, cap, tiny) as llm:
        while llm.has_unfinished_requests():
            start, cpu = time.perf_counter(), time.process_time()
            llm.step()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if llm.last_step.num_seqs:
                k = kinds[llm.last_step.kind]
                k["steps"], k["wall_s"], k["cpu_s"] = k["steps"] + 1, k["wall_s"] + wall, k["cpu_s"] + cpu
    return {"workload": name, "max_num_seqs": cap, "kinds": kinds,
            "wall_s": sum(k["wall_s"] for k in kinds.values()), "cpu_s": sum(k["cpu_s"] for k in kinds.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--workload", choices=workloads.NAMES, default=None,
                        help="run this request set instead (continuous, 256 seats)")
    parser.add_argument("--repeats", type=int, default=3, help="--workload: runs (the fastest is reported)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    if args.workload:
        return main_workload(args)
    rows = []
    print(f"host ms per decode step (model and sampling kernel replaced), {platform.processor() or 'cpu'}")
    for batch in map(int, args.batches.split(",")):
        walls, cpus = host_ms_per_step(batch, args.steps, args.rounds)
        rows.append({"batch": batch, "ms_per_step_min": min(walls), "ms_per_step_median": statistics.median(walls),
                     "cpu_ms_per_step_min": min(cpus), "cpu_ms_per_step_median": statistics.median(cpus)})
        print(f"batch {batch:4d}: {min(walls):.3f} ms (median {statistics.median(walls):.3f}), CPU {min(cpus):.3f} ms "
              f"(median {statistics.median(cpus):.3f}) over {len(walls)} rounds of {args.steps} steps", flush=True)
    report = {**common.run_info("cpu"), "machine": platform.platform(), "python": platform.python_version(),
              "steps_per_round": args.steps, "rounds": args.rounds, "rows": rows}
    print(f"wrote {common.write_json(args.out / 'host_step_cpu.json', report)}")
    return 0


def main_workload(args) -> int:
    runs = []
    for _ in range(args.repeats):
        runs.append(host_seconds_of_workload(args.workload))
        kinds = "; ".join(f"{kind} {k['steps']} steps {k['cpu_s']:.3f} s" for kind, k in runs[-1]["kinds"].items())
        print(f"{args.workload}: host {runs[-1]['cpu_s']:.3f} s CPU ({runs[-1]['wall_s']:.3f} s wall): {kinds}",
              flush=True)
    best = min(runs, key=lambda r: r["cpu_s"])
    report = {**common.run_info("cpu"), "machine": platform.platform(), "python": platform.python_version(),
              "mixed_prompt_limit": GPU_MIXED_PROMPT_LIMIT, **best, "cpu_s_runs": [r["cpu_s"] for r in runs]}
    print(f"wrote {common.write_json(args.out / f'hostload_{args.workload}_cpu.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
