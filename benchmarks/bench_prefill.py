"""Paged prefill attention against torch SDPA (flash) on the same data laid out contiguously.

    python benchmarks/bench_prefill.py            # table on stdout, JSON + PNG under benchmarks/results/

Workloads: prefill of 8 prompts of 2,048 tokens, one 512-token chunk on a 4,096-token cached prefix, and the
prompts of one W1-like and one W2-like engine step (as many prompts of U[128, 512] or U[100, 1,024] tokens as fit
in 8,192, drawn as ``profile_prefill.py`` draws them), for the Qwen2.5-0.5B attention shape (14 query / 2 KV heads,
head_dim 64) and the 32/8/128 shape. Causal FLOPs are counted honestly: query row at position p attends p + 1
keys, 4 * head_dim FLOPs each (QK^T and PV). Each call is timed with CUDA events after a warm-up; the median of
the repeats is reported. The paged kernel reads K/V through randomly ordered blocks of 16 tokens; SDPA gets
contiguous K/V with the KV heads expanded to the query heads (so flash runs with the same causal alignment:
bottom-right for the chunk). Prompts of different lengths go to SDPA as one batch padded to the longest (flash
has no padding mask; a causal row never sees the padding after it), so SDPA does the padding's work too: its
TFLOP/s count only the real rows' FLOPs, like the paged kernel's.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.profile_prefill import KINDS, prompt_batch  # noqa: E402
from pagedattention.kernels.paged_prefill import choose_warps, launch_prefill, paged_prefill_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qwen2.5-0.5b (14q/2kv, d64)": (14, 2, 64), "32q/8kv, d128": (32, 8, 128)}


def engine_step(low: int, high: int, seed: int) -> list[tuple[int, int]]:
    """(context_len, q_len) of the prompts of one 8,192-token prefill step of prompts of U[low, high] tokens."""
    return [(n, n) for n in prompt_batch(random.Random(seed), low, high, 8192)]


# each workload: (context_len, q_len) per sequence
WORKLOADS = {"prefill 8 x 2048": [(2048, 2048)] * 8, "chunk 512 on 4096 prefix": [(4096 + 512, 512)],
             "W1-like step": engine_step(*KINDS["W1-like"], seed=0),
             "W2-like step": engine_step(*KINDS["W2-like"], seed=1)}


def causal_flops(batch: int, context_len: int, q_len: int, num_heads: int, head_dim: int) -> float:
    """Row at position p (context_len - q_len <= p < context_len) attends p + 1 keys."""
    visible = q_len * context_len - q_len * (q_len - 1) // 2
    return 4.0 * head_dim * visible * num_heads * batch


def time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_inputs(specs, num_heads, num_kv_heads, head_dim, dtype, block_size=16, dev="cuda"):
    """Random K/V and queries for sequences of (context_len, q_len): contiguous, padded to the longest (``[B, L,
    H, D]``; the queries are each sequence's last q_len positions), and the same K/V scattered over randomly
    ordered cache blocks with the queries packed (the paged kernel's arguments). One padded batch has one causal
    alignment, so the sequences must all be alike or all whole prompts (q_len = context_len)."""
    if len(set(specs)) > 1 and any(c != n for c, n in specs):
        raise ValueError(f"sequences of different lengths must be whole prompts (q_len = context_len), got {specs}")
    batch, max_ctx, max_q = len(specs), max(c for c, _ in specs), max(q for _, q in specs)
    k = torch.zeros(batch, max_ctx, num_kv_heads, head_dim, device=dev, dtype=dtype)
    v, q = torch.zeros_like(k), torch.zeros(batch, max_q, num_heads, head_dim, device=dev, dtype=dtype)
    for i, (ctx, q_len) in enumerate(specs):
        k[i, :ctx].normal_()
        v[i, :ctx].normal_()
        q[i, :q_len].normal_()
    blocks_per_seq = -(-max_ctx // block_size)
    num_blocks = batch * blocks_per_seq + 1
    block_tables = (torch.randperm(num_blocks - 1, device=dev)[:batch * blocks_per_seq] + 1)
    block_tables = block_tables.to(torch.int32).view(batch, blocks_per_seq)
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device=dev, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    pad = blocks_per_seq * block_size - max_ctx
    kp = F.pad(k, (0, 0, 0, 0, 0, pad)).view(batch, blocks_per_seq, block_size, num_kv_heads, head_dim)
    vp = F.pad(v, (0, 0, 0, 0, 0, pad)).view(batch, blocks_per_seq, block_size, num_kv_heads, head_dim)
    key_cache[block_tables.long()] = kp
    value_cache[block_tables.long()] = vp
    q_lens = torch.tensor([q_len for _, q_len in specs], device=dev)
    cu_seqlens_q = torch.zeros(batch + 1, device=dev, dtype=torch.int32)
    cu_seqlens_q[1:] = q_lens.cumsum(0)
    paged = dict(query=packed(q, specs), key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                 cu_seqlens_q=cu_seqlens_q,
                 context_lens=torch.tensor([c for c, _ in specs], device=dev, dtype=torch.int32))
    return (q, k, v), paged


def packed(padded: torch.Tensor, specs) -> torch.Tensor:
    """The real rows of a ``[B, L, H, D]`` query or SDPA output, packed as the paged kernel's query is."""
    return torch.cat([padded[i, :q_len] for i, (_, q_len) in enumerate(specs)])


def sdpa_fn(q, k, v, num_heads, num_kv_heads):
    """Flash SDPA on [B, H, L, D] with expanded KV heads; bottom-right causal alignment for a chunk."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    group = num_heads // num_kv_heads
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
    q_len, context_len = qh.shape[2], kh.shape[2]
    mask = None if q_len == context_len else causal_lower_right(q_len, context_len)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if mask is None:
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)

    return fn


def graph_ms(fn, warmup: int, reps: int):
    """Time of ``fn`` replayed from a CUDA graph: the kernel without the host-side launch cost."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, warmup, reps)
    except Exception as e:  # a capture failure is reported, not fatal
        print(f"graph capture failed: {e!r}", flush=True)
        return None


DEFAULT = (None, None)


def parse_variant(text: str):
    """"W:R" -> (warps or None for the automatic choice, max_registers or None), e.g. "8:128"."""
    w, r = (text.split(":") + ["0"])[:2]
    return int(w) or None, int(r) or None


def run(dtypes=("float16", "bfloat16"), shapes=None, workloads=None, variants=(DEFAULT,), warmup=5, reps=30,
        verbose=True):
    """Benchmark rows: one per (shape, workload, dtype, kernel variant) with both timings, TFLOP/s and ratio.

    A variant is (warps per block or None, max_registers or None); the default one is timed through the public
    function, the others through ``launch_prefill``.

    ``paged_ms`` times the public function as the engine calls it (validation and launch included, with
    max_q_len given so nothing is read back); ``paged_graph_ms`` replays the same call from a CUDA graph."""
    rows = []
    for shape_name, (num_heads, num_kv_heads, head_dim) in SHAPES.items():
        if shapes and shape_name not in shapes:
            continue
        for work_name, specs in WORKLOADS.items():
            if workloads and work_name not in workloads:
                continue
            batch, context_len, q_len = len(specs), max(c for c, _ in specs), max(q for _, q in specs)
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                torch.manual_seed(0)
                (q, k, v), paged = make_inputs(specs, num_heads, num_kv_heads, head_dim, dtype)
                ref_fn = sdpa_fn(q, k, v, num_heads, num_kv_heads)
                ref = packed(ref_fn().transpose(1, 2), specs)
                sdpa_ms = time_ms(ref_fn, warmup, reps)
                flops = sum(causal_flops(1, c, n, num_heads, head_dim) for c, n in specs)
                scale = head_dim ** -0.5
                for w, regs in variants:
                    out = torch.full_like(paged["query"], float("nan"))
                    if (w, regs) == DEFAULT:
                        ours = lambda: paged_prefill_attention(**paged, out=out, max_q_len=q_len)  # noqa: E731
                    else:
                        ours = lambda: launch_prefill(**paged, out=out, scale=scale, max_q_len=q_len,  # noqa: E731
                                                      warps=w, max_registers=regs)
                    try:
                        ours()
                    except Exception as e:  # a variant that fails to build or run is reported, not fatal
                        print(f"variant {(w, regs)} failed: {e!r}", flush=True)
                        continue
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = time_ms(ours, warmup, reps)
                    g_ms = graph_ms(ours, warmup, reps)
                    row = dict(shape=shape_name, workload=work_name, dtype=dtype_name,
                               warps=w or choose_warps(q_len, batch, num_heads), max_registers=regs,
                               default=(w, regs) == DEFAULT, batch=batch, tokens=paged["query"].shape[0],
                               context_len=context_len, q_len=q_len, paged_ms=round(ms, 4),
                               paged_graph_ms=None if g_ms is None else round(g_ms, 4), sdpa_ms=round(sdpa_ms, 4),
                               paged_tflops=round(flops / ms / 1e9, 2),
                               paged_graph_tflops=None if g_ms is None else round(flops / g_ms / 1e9, 2),
                               sdpa_tflops=round(flops / sdpa_ms / 1e9, 2), ratio=round(sdpa_ms / ms, 3),
                               rel_err_vs_sdpa=float(f"{err:.2e}"))
                    rows.append(row)
                    if verbose:
                        print(json.dumps(row), flush=True)
    return rows


def print_table(rows):
    header = ("shape", "workload", "dtype", "w", "reg", "paged ms", "graph ms", "sdpa ms", "paged TF/s",
              "graph TF/s", "sdpa TF/s", "ratio", "rel err")
    widths = (28, 25, 8, 2, 3, 8, 8, 7, 10, 10, 9, 5, 7)
    print(" ".join(f"{h:>{w}s}" if i > 2 else f"{h:{w}s}" for i, (h, w) in enumerate(zip(header, widths))))
    nan = float("nan")
    for r in rows:
        graph_ms, graph_tf = r["paged_graph_ms"] or nan, r["paged_graph_tflops"] or nan
        print(f"{r['shape']:28s} {r['workload']:25s} {r['dtype']:8s} {r['warps']:2d} "
              f"{r['max_registers'] or 0:3d} {r['paged_ms']:8.3f} {graph_ms:8.3f} {r['sdpa_ms']:7.3f} "
              f"{r['paged_tflops']:10.1f} {graph_tf:10.1f} {r['sdpa_tflops']:9.1f} {r['ratio']:5.2f} "
              f"{r['rel_err_vs_sdpa']:7.1e}")


def save(rows, out_dir: Path):
    card = torch.cuda.get_device_name()
    slug = card.lower().replace("nvidia", "").strip().replace(" ", "_")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(card=card, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command="python " + " ".join(sys.argv),
                torch=torch.__version__, rows=rows)
    (out_dir / f"prefill_{slug}.json").write_text(json.dumps(data, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in rows if r["default"]]
    labels = [f"{r['shape'].split(' (')[0]}\n{r['workload']}\n{r['dtype']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["paged_tflops"] for r in rows], 0.4, label="paged prefill (Numba)")
    ax.bar([i + 0.2 for i in x], [r["sdpa_tflops"] for r in rows], 0.4, label="torch SDPA flash (contiguous)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("causal TFLOP/s")
    ax.set_title(f"Paged prefill attention, {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"prefill_{slug}.png", dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=["0:0"],
                        help="kernel variants WARPS:MAX_REGISTERS (0 = automatic / no cap); 0:0 is the public "
                             "function")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill.py needs a CUDA GPU (torch sees none)")
    rows = run(dtypes=args.dtypes, variants=[parse_variant(v) for v in args.variants], reps=args.reps)
    save(rows, args.out_dir)
    print_table(rows)


if __name__ == "__main__":
    main()
