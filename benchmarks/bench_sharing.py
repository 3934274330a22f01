"""Sharing KV blocks: memory saved by parallel sampling and beam search, and what prefix caching buys.

    python benchmarks/bench_sharing.py --out benchmarks/results   # GPU: Qwen2.5-0.5B shape, random weights
    python benchmarks/bench_sharing.py --tiny     # CPU: embedded tiny model, small workloads (seconds)

1. Parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6) on Alpaca-like lengths, as in the
   PagedAttention paper's section 6.3 (Alpaca: 19.3 prompt and 58.5 output tokens on average): prompts ~U[8, 32]
   random token ids, outputs ~U[24, 96] tokens for sampling (temperature 1) and 60 for beam search, EOS ignored.
   KV memory saving = 1 - (blocks the sequences hold) / (blocks they would hold unshared), from the allocator
   after every step's allocations, summed over the run (the paper: 6.1-9.8% for parallel sampling, 37.6-55.2%
   for beam search, OPT-13B, block size 16). Also the same completions as n independent requests.
2. Prefix caching on a shared-system-prompt workload: every prompt is one system prompt (512 tokens) followed
   by its own U[32, 128] tokens, 64 output tokens each; all requests arrive at t=0. Time to first token and
   throughput with caching off and on (the cache is emptied before each run, then one request with the
   system prompt alone runs untimed, as on a server that has served it before).

JSON and PNG go to sharing_<card>[_tiny].{json,png} under --out: by default benchmarks/results for a GPU run
and a scratch directory for a CPU or --tiny one, so a quick run never overwrites a committed result.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pagedattention import LLM, SamplingParams
from pagedattention.engine.beam_search import BeamSearchParams
from pagedattention.models import ModelConfig

QWEN25_05B = ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768, eos_token_id=151643)
PAPER_SAVING = {"parallel sampling": (6.1, 9.8), "beam search": (37.6, 55.2)}
RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(tempfile.gettempdir()) / "pagedattention-results"
# Workload sizes: (requests, beam search tokens, system prompt tokens). --tiny keeps a CPU run to seconds.
SIZES = {"full": (256, 60, 512), "tiny": (16, 32, 64)}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def alpaca_like(rng, num_requests, vocab):
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 32))] for _ in range(num_requests)]
    outputs = [rng.randint(24, 96) for _ in range(num_requests)]
    return prompts, outputs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def memory_row(llm) -> dict:
    s = llm.stats()
    return {"kv_memory_saving_pct": 100 * s.kv_memory_saving, "mean_blocks_held": s.mean_blocks_held,
            "mean_blocks_unshared": s.mean_blocks_unshared, "peak_blocks_held": s.peak_blocks_held,
            "peak_blocks_unshared": s.peak_blocks_unshared, "mean_bytes_saved": s.mean_bytes_saved_by_sharing}


def parallel_sampling(llm, prompts, outputs, n, copies=False) -> dict:
    """n completions per prompt, forked (``copies=False``) or as n independent requests."""
    if copies:
        batch = [p for p in prompts for _ in range(n)]
        params = [SamplingParams(temperature=1.0, max_tokens=m, ignore_eos=True, seed=i)
                  for i, m in enumerate(m for m in outputs for _ in range(n))]
    else:
        batch = prompts
        params = [SamplingParams(n=n, temperature=1.0, max_tokens=m, ignore_eos=True, seed=i)
                  for i, m in enumerate(outputs)]
    llm.reset_stats()
    results, wall = timed(lambda: llm.generate(batch, params, use_tqdm=False))
    tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
    return {"workload": "parallel sampling", "sharing": "copies" if copies else "fork", "n": n,
            "requests_per_s": len(prompts) / wall, "output_tok_per_s": tokens / wall, "wall_s": wall,
            "preemptions": llm.num_preemptions, **memory_row(llm)}


def beam_search(llm, prompts, width, max_tokens) -> dict:
    llm.reset_stats()
    _, wall = timed(lambda: llm.beam_search(prompts, BeamSearchParams(width, max_tokens, ignore_eos=True)))
    return {"workload": "beam search", "sharing": "fork", "n": width, "requests_per_s": len(prompts) / wall,
            "output_tok_per_s": len(prompts) * max_tokens / wall, "wall_s": wall, **memory_row(llm)}


def shared_system_prompt(llm, rng, num_requests, system_len, vocab, on: bool) -> dict:
    system = [rng.randrange(100, vocab) for _ in range(system_len)]
    prompts = [system + [rng.randrange(100, vocab) for _ in range(rng.randint(32, 128))] for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.set_prefix_caching(on)  # an empty cache, or none
    # a server that has seen the system prompt before: one earlier request (both runs, cached only when on)
    llm.generate(system + [100], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    llm.reset_stats()
    results, wall = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    ttft = [r.metrics.time_to_first_token for r in results]
    num_prompt = sum(len(p) for p in prompts)
    num_output = sum(len(r.outputs[0].token_ids) for r in results)
    return {"workload": "shared system prompt", "prefix_caching": on, "num_requests": num_requests,
            "system_prompt_tokens": system_len, "ttft_mean_s": statistics.fmean(ttft),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "output_tok_per_s": num_output / wall, "total_tok_per_s": (num_prompt + num_output) / wall,
            "wall_s": wall, "prefix_cache_hit_rate": llm.stats().prefix_cache_hit_rate}


def plot(report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = report["sharing"]
    for ax_mem, workload, color in ((axes[0], "parallel sampling", "tab:blue"), (axes[0], "beam search", "tab:orange")):
        mine = [r for r in rows if r["workload"] == workload and r["sharing"] == "fork"]
        ax_mem.plot([r["n"] for r in mine], [r["kv_memory_saving_pct"] for r in mine], "o-", color=color,
                    label=f"{workload} (this engine)")
        lo, hi = PAPER_SAVING[workload]
        ax_mem.axhspan(lo, hi, color=color, alpha=0.15, label=f"{workload} (paper, OPT-13B)")
    axes[0].set(xlabel="n / beam width", ylabel="KV memory saved by sharing (%)", title="Memory saving",
                xticks=[2, 4, 6])
    axes[0].legend(fontsize=7)
    for workload, sharing, style in (("parallel sampling", "fork", "o-"), ("parallel sampling", "copies", "o--"),
                                     ("beam search", "fork", "s-")):
        mine = [r for r in rows if r["workload"] == workload and r["sharing"] == sharing]
        axes[1].plot([r["n"] for r in mine], [r["requests_per_s"] for r in mine], style,
                     label=f"{workload}, {'n independent requests' if sharing == 'copies' else 'forked'}")
    axes[1].set(xlabel="n / beam width", ylabel="requests/s", title="Throughput (Alpaca-like lengths)",
                xticks=[2, 4, 6])
    axes[1].legend(fontsize=7)
    prefix = report["prefix_caching"]
    labels = ["off", "on"]
    x = range(len(prefix))
    axes[2].bar([i - 0.2 for i in x], [r["ttft_p50_s"] * 1e3 for r in prefix], 0.4, label="TTFT p50 (ms)")
    axes[2].bar([i + 0.2 for i in x], [r["ttft_mean_s"] * 1e3 for r in prefix], 0.4, label="TTFT mean (ms)")
    twin = axes[2].twinx()
    twin.plot(list(x), [r["total_tok_per_s"] for r in prefix], "k^-", label="total tok/s")
    twin.set_ylabel("total tok/s")
    axes[2].set_xticks(list(x), [f"prefix caching {labels[r['prefix_caching']]}" for r in prefix])
    axes[2].set(ylabel="ms", title="Shared system prompt")
    axes[2].legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{report['device']}: {report['model']}, block size {report['block_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_sharing_table(rows) -> None:
    print(f"{'workload':<18} {'sharing':<7} {'n':>2} {'req/s':>8} {'out tok/s':>10} {'KV saved':>9} {'paper':>11} "
          f"{'peak blocks':>11} {'unshared':>8} {'preempted':>9}")
    for r in rows:
        lo, hi = PAPER_SAVING[r["workload"]]
        print(f"{r['workload']:<18} {r['sharing']:<7} {r['n']:>2} {r['requests_per_s']:>8.2f} "
              f"{r['output_tok_per_s']:>10.0f} {r['kv_memory_saving_pct']:>8.1f}% {f'{lo:.1f}-{hi:.1f}%':>11} "
              f"{r['peak_blocks_held']:>11} {r['peak_blocks_unshared']:>8} {r.get('preemptions', ''):>9}")


def print_prefix_table(rows) -> None:
    print(f"{'prefix caching':<15} {'TTFT mean':>10} {'p50':>8} {'p99':>8} {'out tok/s':>10} {'total tok/s':>11} "
          f"{'hit rate':>8}")
    for r in rows:
        print(f"{'on' if r['prefix_caching'] else 'off':<15} {r['ttft_mean_s'] * 1e3:>8.1f}ms "
              f"{r['ttft_p50_s'] * 1e3:>6.1f}ms {r['ttft_p99_s'] * 1e3:>6.1f}ms {r['output_tok_per_s']:>10.0f} "
              f"{r['total_tok_per_s']:>11.0f} {100 * r['prefix_cache_hit_rate']:>7.1f}%")


def progress(r: dict) -> None:
    what = (f"{r['workload']}, {r['sharing']}, n={r['n']}" if "n" in r
            else f"{r['workload']}, prefix caching {'on' if r['prefix_caching'] else 'off'}")
    print(f"  {what}: {r['wall_s']:.2f} s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model and small workloads (CPU-friendly)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-requests", type=int, default=None,
                        help=f"default {SIZES['full'][0]} ({SIZES['tiny'][0]} with --tiny)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from GPU memory")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for the JSON and PNG (default: {RESULTS.parent.name}/{RESULTS.name} on a "
                             f"GPU, {SCRATCH} for a CPU or --tiny run)")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    default_requests, beam_tokens, system_len = SIZES["tiny" if args.tiny else "full"]
    num_requests = args.num_requests or default_requests
    out_dir = args.out or (RESULTS if device.startswith("cuda") and not args.tiny else SCRATCH)
    llm = LLM(None if args.tiny else QWEN25_05B, device=device, block_size=args.block_size,
              num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs, max_model_len=2048)
    vocab = llm.model_config.vocab_size
    llm.generate([[5] * 20] * 4, SamplingParams(n=2, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    llm.beam_search([[5] * 20], BeamSearchParams(2, 4, ignore_eos=True))

    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    model = "tiny (embedded)" if args.tiny else "Qwen2.5-0.5B shape, random weights"
    print(f"{card}, {model}, block size {args.block_size}, {llm.manager.num_blocks} KV blocks, "
          f"{num_requests} requests", flush=True)
    prompts, outputs = alpaca_like(random.Random(0), num_requests, vocab)
    sharing = []
    for n in (2, 4, 6):
        for copies in (False, True):
            sharing.append(parallel_sampling(llm, prompts, outputs, n, copies))
            progress(sharing[-1])
    for width in (2, 4, 6):
        sharing.append(beam_search(llm, prompts, width, beam_tokens))
        progress(sharing[-1])
    prefix = []
    for on in (False, True):
        prefix.append(shared_system_prompt(llm, random.Random(1), num_requests, system_len, vocab, on))
        progress(prefix[-1])
    llm.set_prefix_caching(False)

    report = {"device": card, "model": model,
              "dtype": str(llm.config.dtype).removeprefix("torch."), "block_size": args.block_size,
              "kv_blocks": llm.manager.num_blocks, "num_requests": num_requests, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": "python " + " ".join(sys.argv),
              "workloads": {"alpaca_like": "prompts U[8,32] random ids; sampling outputs U[24,96], temperature 1; "
                                           f"beam search {beam_tokens} tokens; EOS ignored",
                            "shared_system_prompt": f"{system_len}-token system prompt + U[32,128] own tokens, "
                                                    "64 output tokens, greedy"},
              "paper_kv_memory_saving_pct": PAPER_SAVING, "sharing": sharing, "prefix_caching": prefix}
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = card.replace(" ", "_").replace("/", "_") + ("_tiny" if args.tiny else "")
    path = out_dir / f"sharing_{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, path.with_suffix(".png"))

    print("\nparallel sampling and beam search (KV saved = 1 - blocks held / blocks held without sharing):")
    print_sharing_table(sharing)
    print("\nprefix caching, shared system prompt:")
    print_prefix_table(prefix)
    print(f"\nwrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
