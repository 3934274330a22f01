"""Host (CPU) time of one decode step, per phase, with the model forward replaced by random logits.

    python benchmarks/bench_host_overhead.py               # 64 and 256 running sequences
    python benchmarks/bench_host_overhead.py --steps 100

The engine is real (Scheduler, PagedAttentionManager over the C++ allocator, Sampler, the runner's decode
input staging into its static buffers, ``LLM.step``), on the CPU; only the forward pass is a stub returning
logits of vocab 151,936 (Qwen2.5). Sequences start decoding with contexts U[500, 1000], block 16, W2's
sampling (temperature 0.6, EOS ignored), and max_model_len 32768 (so block-table rows are 2048 wide, as on
the H100 run). Each step is timed whole and by phase:

    schedule     Scheduler.schedule (decode: one slot per sequence, new blocks every 16 tokens)
    stats        LLM.record_step_stats
    stage        ModelRunner._stage_decode (block tables, positions, slots into the static buffers)
    sample_host  Sampler on 8-column logits: the same code path with negligible tensor math; the tensor
                 math (full vocabulary minus 8 columns) is timed separately after the steps
    postprocess  Scheduler.postprocess (append the token, stop checks)
    other        the rest of the step loop (LLM._run's bookkeeping: progress bar, finished requests)

"host" = the whole step loop iteration, i.e. every phase except the sampler's tensor math. JSON: benchmarks/results/host_overhead_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from pagedattention import LLM, SamplingParams
from pagedattention.engine.sequence import Sequence, SequenceStatus
from pagedattention.models import ModelConfig

VOCAB = 151936
BLOCK_SIZE = 16
MAX_MODEL_LEN = 32768
# The forward pass never runs: the smallest model that builds, with Qwen2.5's vocabulary and context.
STUB_MODEL = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=16, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=MAX_MODEL_LEN, eos_token_id=151643)


class Timer:
    """Accumulates the wall time of calls to wrapped functions, per phase."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
        return timed


def build(num_seqs: int, seed: int = 0):
    """An engine with ``num_seqs`` sequences already past their prefill, and a stubbed forward."""
    rng = random.Random(seed)
    contexts = [rng.randint(500, 1000) for _ in range(num_seqs)]
    num_blocks = sum(c // BLOCK_SIZE + 8 for c in contexts) + 64
    llm = LLM(STUB_MODEL, device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
              max_num_seqs=num_seqs, max_model_len=MAX_MODEL_LEN, seed=seed)
    runner = llm.runner
    runner._allocate_decode_buffers()  # the graph path's static buffers (no capture on the CPU)
    params = SamplingParams(temperature=0.6, max_tokens=10**6, ignore_eos=True)
    for ctx in contexts:
        seq = Sequence([rng.randrange(10_000) for _ in range(ctx)], params)
        llm.manager.add_sequence(seq.seq_id, ctx - 1)  # the KV of all but the last token is computed
        seq.status = SequenceStatus.RUNNING
        seq.prefill_end = ctx - 1
        seq.num_computed_tokens = ctx - 1
        llm.scheduler.running.append(seq)
    gen = torch.Generator().manual_seed(seed)
    logits_pool = torch.randn(2, num_seqs, VOCAB, generator=gen)
    return llm, logits_pool


def run(num_seqs: int, steps: int, warmup: int) -> dict:
    llm, logits_pool = build(num_seqs)
    timer = Timer()
    runner, scheduler, sampler = llm.runner, llm.scheduler, llm.sampler
    step_index = [0]

    stage = timer.wrap("stage", runner._stage_decode)

    def forward_stub(seqs, is_prefill):
        assert not is_prefill
        stage(seqs)
        step_index[0] += 1
        return logits_pool[step_index[0] % len(logits_pool), :len(seqs)]  # the sampler does not write to it

    # The loop samples from 8-column logits: the sampler's host work is the same, and the tensor math, which
    # runs on the GPU in the engine, neither counts here nor evicts the host's caches. It is timed after.
    sample_host = timer.wrap("sample_host", sampler.__call__)

    def sample(logits, seqs, eos):
        return sample_host(logits[:, :8].contiguous(), seqs, eos)

    runner.run = forward_stub
    llm.sampler = sample
    scheduler.schedule = timer.wrap("schedule", scheduler.schedule)
    scheduler.postprocess = timer.wrap("postprocess", scheduler.postprocess)
    llm.record_step_stats = timer.wrap("stats", llm.record_step_stats)

    loop_step = _loop_body(llm)
    for _ in range(warmup):
        loop_step()
    timer.totals.clear()
    totals = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loop_step()
        totals.append(time.perf_counter() - t0)
    assert len(scheduler.running) == num_seqs, "every sequence should still be decoding"

    ms = {name: 1e3 * t / steps for name, t in timer.totals.items()}
    step_ms = 1e3 * statistics.fmean(totals)
    phases = {name: ms[name] for name in ("schedule", "stats", "stage", "sample_host", "postprocess")}
    phases["other"] = step_ms - sum(phases.values())
    return {"num_seqs": num_seqs, "steps": steps, "phases_ms": phases, "host_ms": step_ms,
            "host_ms_p50": 1e3 * statistics.median(totals),
            "sample_tensor_math_ms": _sampler_math_ms(sampler, logits_pool[0, :num_seqs], list(scheduler.running),
                                                      llm.eos_token_ids)}


def _sampler_math_ms(sampler, logits, seqs, eos, repeats: int = 3) -> float:
    """The sampler on full-vocabulary logits minus the sampler on 8 columns (its host work)."""
    def best(x):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sampler(x, seqs, eos)
            times.append(time.perf_counter() - t0)
        return min(times)
    return 1e3 * (best(logits) - best(logits[:, :8].contiguous()))


def _loop_body(llm: LLM):
    """One iteration of ``LLM._run``'s loop (the step and its bookkeeping), with a progress bar as there."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1, disable=False, leave=False, file=open("/dev/null", "w"))
    start, produced = time.perf_counter(), [0]

    def body():
        produced[0] += llm.step()
        finished, llm.scheduler.finished = llm.scheduler.finished, []
        done = {id(seq.group): seq for seq in finished if seq.request_finished}
        if done:
            bar.update(len(done))
        bar.set_postfix_str(f"output {produced[0] / (time.perf_counter() - start):.0f} tok/s", refresh=False)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--label", default="", help="a note stored in the JSON (e.g. which engine version)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host_overhead_cpu.json")
    args = parser.parse_args()
    # one thread: the host part is single-threaded Python/numpy anyway, and torch's thread pool would only
    # add barrier waits on tiny tensors (and noise when other processes share the cores)
    torch.set_num_threads(args.threads)
    results = [run(n, args.steps, args.warmup) for n in args.batch]
    names = list(results[0]["phases_ms"])
    print(f"{'ms per decode step':<22}" + "".join(f"{r['num_seqs']:>10} seqs" for r in results))
    for name in names:
        print(f"{name:<22}" + "".join(f"{r['phases_ms'][name]:>15.3f}" for r in results))
    print(f"{'host total (mean)':<22}" + "".join(f"{r['host_ms']:>15.3f}" for r in results))
    print(f"{'host p50':<22}" + "".join(f"{r['host_ms_p50']:>15.3f}" for r in results))
    print(f"{'sampler tensor math':<22}" + "".join(f"{r['sample_tensor_math_ms']:>15.3f}" for r in results)
          + "   (CPU; runs on the GPU in the engine)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"label": args.label, "device": "cpu", "cpu_threads": torch.get_num_threads(), "vocab": VOCAB, "block_size": BLOCK_SIZE,
              "max_model_len": MAX_MODEL_LEN, "context": [500, 1000], "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
