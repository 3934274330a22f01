"""The engine's host time per decode step, without the model: what the Python around the GPU costs.

On the H200 a decode step of the Qwen2.5-0.5B shape at batch 256 takes about as long on the host (scheduling,
block tables, staging, sampler set-up, postprocess) as on the GPU, so the host's own cost decides W1 there.
This measures it on any machine: the embedded tiny model's engine on the CPU, its forward pass replaced by a
ready logits tensor, and the one-pass sampling kernel by a ready [2, rows] result, so everything else runs as
in a GPU step (the overlapped loop, the scheduler, the manager's block tables, the sampler's per-row set-up,
``PendingSample.result``, postprocess). Requests never end during the timed steps.

    python benchmarks/host_step.py [--batches 1,64,256] [--steps 50] [--rounds 40] [--out benchmarks/results]

Prints ms per step at each batch, wall and the process's CPU time, each the minimum and the median over the
rounds, and writes results/host_step_cpu.json (the machine is the host it ran on). On a shared machine the
minimum over many short rounds is the figure to compare: other tenants slow whole seconds of a run down.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
from pagedattention import LLM, SamplingParams  # noqa: E402
from pagedattention.kernels import sampling  # noqa: E402


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
    logits = torch.randn(batch, vocab)
    drawn = torch.stack([torch.randint(0, vocab, (batch,)).float(), torch.full((batch,), -1.0)])
    stepper = llm.stepper
    stepper.runner.execute = lambda inputs, eager=False: logits[:inputs.num_seqs]
    stepper.sampler.use_kernel = True
    real_sample_tokens, sampling.sample_tokens = sampling.sample_tokens, lambda rows, _: drawn[:, :rows.shape[0]]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
