"""Decode-sized GEMMs: the tensor-core kernel (kernels/skinny_gemm.py) against torch's (cuBLAS) at a model shape's
four projections, and both against reading the weights once.

    python benchmarks/bench_gemm.py [--model-shape qwen2.5-0.5b] [--batches 1,8,16,32,64,128,256] [--out DIR]

A projection is timed as a decode step runs it: one launch per layer, each on its own weight matrix (so none
comes from L2), captured in one CUDA graph and replayed 10 times; us per launch. The bound is the weight bytes
at the copy bandwidth measured in the same run. Each cell first checks the kernel's output against torch's.
Writes results/gemm_<card>.json (gemm_<shape>_<card>.json for another model shape).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
from pagedattention.kernels.skinny_gemm import skinny_gemm  # noqa: E402


def projections(mc) -> dict[str, tuple[int, int, bool]]:
    """name -> (N, K, has bias) of one layer's projections (q/k/v and gate/up fused, as the model runs them)."""
    head_dim = mc.head_dim
    qkv = (mc.num_attention_heads + 2 * mc.num_key_value_heads) * head_dim
    return {"qkv": (qkv, mc.hidden_size, bool(mc.attention_bias)),
            "o": (mc.hidden_size, mc.num_attention_heads * head_dim, False),
            "gate_up": (2 * mc.intermediate_size, mc.hidden_size, False),
            "down": (mc.hidden_size, mc.intermediate_size, False)}


def graph_us(fns, device) -> float:
    """us per call of the ``fns`` (one per layer) replayed from one graph (median of 10 replays)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return 1e3 * statistics.median(common.time_ms(graph.replay, device, reps=10)) / len(fns)


def measure(name: str, n: int, k: int, has_bias: bool, m: int, layers: int, copy_bw: float, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(m * 7 + n)
    weights = [(torch.randn(n, k, generator=gen, device=device) / k ** 0.5).bfloat16() for _ in range(layers)]
    biases = [torch.randn(n, generator=gen, device=device).bfloat16() if has_bias else None for _ in range(layers)]
    x = torch.randn(m, k, generator=gen, device=device).bfloat16()
    ours = [torch.empty(m, n, dtype=torch.bfloat16, device=device) for _ in range(layers)]
    skinny_gemm(x, weights[0], biases[0], out=ours[0])
    expected = F.linear(x, weights[0], biases[0])
    error = (ours[0].float() - expected.float()).abs().max().item()
    if error > 2e-2 * expected.float().abs().max().item():
        raise AssertionError(f"{name} M={m}: the kernel's output is {error:.3g} from torch's")
    kernel = graph_us([lambda i=i: skinny_gemm(x, weights[i], biases[i], out=ours[i]) for i in range(layers)], device)
    torch_us = graph_us([lambda i=i: F.linear(x, weights[i], biases[i]) for i in range(layers)], device)  # nn.Linear's
    bound = 1e6 * n * k * 2 / copy_bw
    return {"projection": name, "n": n, "k": k, "bias": has_bias, "batch": m, "kernel_us": kernel,
            "torch_us": torch_us, "weights_once_us": bound, "speedup_vs_torch": torch_us / kernel,
            "kernel_fraction_of_bound": bound / kernel, "max_abs_error_vs_torch": error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", choices=list(common.MODEL_SHAPES), default=common.DEFAULT_SHAPE)
    parser.add_argument("--batches", default="1,8,16,32,64,128,256")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the GEMM benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    mc = common.model_shape(args.model_shape)
    copy_bw = common.copy_bandwidth(device)
    batches = [int(b) for b in args.batches.split(",")]
    results = [measure(name, n, k, bias, m, mc.num_hidden_layers, copy_bw, device)
               for m in batches for name, (n, k, bias) in projections(mc).items()]
    card = common.card_name(device)
    print(f"decode GEMMs, {common.model_description(args.model_shape)}, bf16, on {card} "
          f"(copy roofline {copy_bw / 1e12:.2f} TB/s); us per launch, one launch per layer in a graph")
    print(f"{'proj':>8} {'M':>4} {'N':>6} {'K':>5} {'kernel':>8} {'torch':>8} {'weights once':>13} {'vs torch':>9} "
          f"{'of bound':>9}")
    for r in results:
        print(f"{r['projection']:>8} {r['batch']:4d} {r['n']:6d} {r['k']:5d} {r['kernel_us']:8.2f} "
              f"{r['torch_us']:8.2f} {r['weights_once_us']:13.2f} {r['speedup_vs_torch']:8.2f}x "
              f"{r['kernel_fraction_of_bound']:9.0%}")
    for m in batches:
        rows = [r for r in results if r["batch"] == m]
        ours, theirs = sum(r["kernel_us"] for r in rows), sum(r["torch_us"] for r in rows)
        print(f"batch {m}: a layer's four GEMMs {ours:.1f} us (kernel) vs {theirs:.1f} us (torch), "
              f"bound {sum(r['weights_once_us'] for r in rows):.1f} us")
    report = {**common.run_info(device), "model_shape": args.model_shape, "dtype": "bfloat16",
              "copy_tbps": copy_bw / 1e12, "layers_per_graph": mc.num_hidden_layers, "results": results}
    shape = "" if args.model_shape == common.DEFAULT_SHAPE else f"{args.model_shape}_"
    print("wrote", common.write_json(args.out / f"gemm_{shape}{card.replace(' ', '_')}.json", report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
