"""The sampling kernel (kernels/sampling.py) at the engine's shape: rows of 151,936 bf16 logits (Qwen2.5's
vocabulary), greedy and T = 0.6, against reading the logits once at the copy roofline and against torch's
sampler (log_softmax, softmax, multinomial, gather) measured in the same run.

    python benchmarks/bench_sampling.py [--rows 1,16,64,128,256] [--out benchmarks/results]

The kernel is timed as the engine runs it between decode steps' graphs: 20 launches captured in a CUDA graph,
replayed 10 times (ms per launch). Each row also checks the kernel's result: greedy tokens equal torch.argmax
and every log-probability equals log_softmax's within 1e-5. Writes results/sampling_<card>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
from pagedattention.kernels.sampling import sample_tokens, temperature_bits  # noqa: E402

VOCAB = 151936
LAUNCHES = 20


def graph_ms(fn, device) -> float:
    """ms per call of ``fn`` replayed from a graph of LAUNCHES calls (median of 10 replays)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            fn()
    return statistics.median(common.time_ms(graph.replay, device, reps=10)) / LAUNCHES


def torch_sampler(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.float()
    logprobs = torch.log_softmax(x, dim=-1)
    tokens = x.argmax(-1) if temperature == 0 else torch.multinomial(torch.softmax(x / temperature, -1), 1)[:, 0]
    return logprobs.gather(1, tokens.view(-1, 1))


def measure(rows: int, temperature: float, copy_bw: float, device) -> dict:
    logits = (torch.randn(rows, VOCAB, device=device) * 2).bfloat16()
    params = torch.tensor([list(range(rows)), [5] * rows, temperature_bits([temperature] * rows)],
                          dtype=torch.int64, device=device)
    out = sample_tokens(logits, params)
    tokens = out[0].long()
    expected = torch.log_softmax(logits.float(), -1).gather(1, tokens.view(-1, 1)).view(-1)
    logprob_error = (expected - out[1]).abs().max().item()
    greedy_ok = temperature != 0 or bool((tokens == logits.float().argmax(-1)).all())
    if logprob_error > 1e-5 or not greedy_ok:
        raise AssertionError(f"rows {rows}, T={temperature}: greedy == argmax {greedy_ok}, "
                             f"log-probability error {logprob_error:.2e}")
    kernel = graph_ms(lambda: sample_tokens(logits, params), device)
    baseline = statistics.median(common.time_ms(lambda: torch_sampler(logits, temperature), device, reps=10))
    bound = logits.numel() * logits.element_size() / copy_bw * 1e3  # read once at the copy roofline
    return {"rows": rows, "temperature": temperature, "kernel_ms": kernel, "torch_ms": baseline,
            "read_once_ms": bound, "fraction_of_read_roofline": bound / kernel, "speedup_vs_torch": baseline / kernel,
            "logprob_max_error": logprob_error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64,128,256")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sampling benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    copy_bw = common.copy_bandwidth(device)
    results = [measure(int(r), t, copy_bw, device) for r in args.rows.split(",") for t in (0.6, 0.0)]
    card = common.card_name(device)
    print(f"sampling kernel, {VOCAB} bf16 logits per row, on {card} (copy roofline {copy_bw / 1e12:.2f} TB/s)")
    print(f"{'rows':>5} {'T':>4} {'kernel us':>10} {'torch us':>9} {'read once us':>13} {'of roofline':>12} "
          f"{'vs torch':>9}")
    for r in results:
        print(f"{r['rows']:5d} {r['temperature']:4.1f} {1e3 * r['kernel_ms']:10.1f} {1e3 * r['torch_ms']:9.1f} "
              f"{1e3 * r['read_once_ms']:13.1f} {r['fraction_of_read_roofline']:12.0%} {r['speedup_vs_torch']:8.1f}x")
    report = {**common.run_info(device), "vocab": VOCAB, "dtype": "bfloat16", "copy_tbps": copy_bw / 1e12,
              "launches_per_graph": LAUNCHES, "results": results}
    print("wrote", common.write_json(args.out / f"sampling_{card.replace(' ', '_')}.json", report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
