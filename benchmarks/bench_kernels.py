"""Decode-attention kernels on the GPU: V1, V2, torch gather+SDPA, torch SDPA on contiguous KV, and a copy.

    python benchmarks/bench_kernels.py --out benchmarks/results
    python benchmarks/bench_kernels.py --tune     # V2 variants (CUDA cores, tensor cores) x partition sizes at
                                                  # the key shapes, then exit

Each call is captured once in a CUDA graph and timed by replaying it (as the engine's decode steps run), with
CUDA events around every replay, the L2 cache flushed before each, and the median of many replays reported.
Bandwidth counts the bytes a decode step must move once: K and V of every context token of every KV head, the
query and the output. The roofline is a large device-to-device copy (bytes read + written per second).
Writes ``kernels_<card>.json`` and ``kernels_<card>.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedattention.kernels import paged_attention  # noqa: E402
from pagedattention.kernels.decode import decode_v2, tc_config  # noqa: E402

# Peers measured on an H200 (2026-12-02, page 16; ../shared workloads notes): vLLM 0.33's Triton paged decode
# kernel (best split count) and FlashInfer 0.7.4's best decode variant (L2 flushed, median), in ms.
# Key: (batch, ctx, num_heads, num_kv_heads, head_dim, dtype).
PEERS_H200 = {
    (64, 4096, 32, 8, 128, "float16"): {"vllm_triton": 0.358, "flashinfer": 0.248},
    (4, 32768, 32, 8, 128, "float16"): {"vllm_triton": 0.259, "flashinfer": 0.132},
    (256, 128, 32, 8, 128, "float16"): {"vllm_triton": 0.156, "flashinfer": 0.048},
    (64, 2048, 14, 2, 64, "bfloat16"): {"vllm_triton": 0.155, "flashinfer": 0.0294},
}
HEADLINE = [(64, 4096), (4, 32768), (256, 128)]
GRID_B = (1, 4, 16, 64, 256)
GRID_CTX = (128, 512, 2048, 8192, 32768)
MAX_KV_BYTES = 3 << 30
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Timer:
    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def graph_ms(self, fn) -> float:
        """Median ms of replays of ``fn`` captured in a CUDA graph, L2 flushed before each replay."""
        fn()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on the side stream, as torch recommends before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        # Bring the clocks up after the host-side pauses (compiles, data generation) before timing.
        # Synchronise after each replay: replays queued faster than the GPU runs them (a 20 ms V1 call at 32k
        # tokens) would keep it busy for ~1000 queued replays, 20 s, after the host's 100 ms had passed.
        spin_until = time.perf_counter() + 0.1
        while time.perf_counter() < spin_until:
            graph.replay()
            torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            # Evict L2 by reading 256 MB (a read leaves no dirty lines to write back inside the timed region,
            # which zeroing a buffer would; that once cost a 1 GiB copy 20% here).
            self.flush.sum(dtype=torch.int32)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def copy_bandwidth_graphed(timer: Timer) -> float:
    """A 1 GiB copy captured in a graph: it becomes a memcpy node served by the copy engines, which reach only
    ~2.44 TB/s on the H100; printed for reference, not the roofline."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = timer.graph_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def copy_bandwidth(reps=20) -> float:
    """The roofline: bytes read + written per second by back-to-back 1 GiB device-to-device copies (torch's
    copy kernel on the SMs)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 4 * reps / (start.elapsed_time(end) * 1e-3)


def make_problem(batch, ctx, num_heads, num_kv_heads, head_dim, block_size, dtype, gen):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    value = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    return query, key, value, tables, lens


def torch_gather_sdpa(query, key, value, tables, ctx):
    """The paged baseline in plain torch: gather every sequence's blocks, then batched SDPA (all contexts equal)."""
    batch, num_heads, head_dim = query.shape
    k = key[tables.long()].view(batch, -1, key.shape[2], head_dim)[:, :ctx].transpose(1, 2)
    v = value[tables.long()].view(batch, -1, key.shape[2], head_dim)[:, :ctx].transpose(1, 2)
    return F.scaled_dot_product_attention(query.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def run_shape(timer, copy_bw, batch, ctx, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
              dtype=torch.float16, sweep=False):
    gen = torch.Generator(device="cuda").manual_seed(batch * 100003 + ctx)
    query, key, value, tables, lens = make_problem(batch, ctx, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                                   gen)
    itemsize = key.element_size()
    nbytes = 2 * batch * ctx * num_kv_heads * head_dim * itemsize + 2 * query.numel() * itemsize
    out = torch.empty_like(query)

    # Correctness at full size, against SDPA in fp32 on the gathered KV.
    expected = torch_gather_sdpa(query.float(), key.float(), value.float(), tables, ctx)
    errors = {}
    for version in ("v1", "v2"):
        got = paged_attention(query, key, value, tables, lens, version=version, out=torch.full_like(query, math.nan),
                              max_context_len=ctx)
        errors[version] = (got.float() - expected).abs().max().item()

    dtype_name = str(dtype).replace("torch.", "")
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    tc = tc_config(dtype_name, head_dim, num_heads // num_kv_heads, batch * num_kv_heads, ctx, sms)
    row = dict(batch=batch, ctx=ctx, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
               block_size=block_size, dtype=dtype_name, bytes=nbytes, max_abs_err=errors,
               v2_kernel=f"tensor cores {tc}" if tc else "cuda cores")
    kc = key[tables.long()].view(batch, -1, num_kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
    vc = value[tables.long()].view(batch, -1, num_kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
    methods = {
        "v2": lambda: paged_attention(query, key, value, tables, lens, out=out, max_context_len=ctx),
        "v1": lambda: paged_attention(query, key, value, tables, lens, version="v1", out=out, max_context_len=ctx),
        "torch_gather_sdpa": lambda: torch_gather_sdpa(query, key, value, tables, ctx),
        "torch_sdpa_contiguous": lambda: F.scaled_dot_product_attention(query.unsqueeze(2), kc, vc,
                                                                         enable_gqa=True),
    }
    for name, fn in methods.items():
        ms = timer.graph_ms(fn)
        row[name] = dict(ms=ms, tbps=nbytes / (ms * 1e-3) / 1e12, pct_copy=100 * nbytes / (ms * 1e-3) / copy_bw)
    if sweep:  # split-KV partition sizes, to check the automatic choice
        row["v2_partitions"] = {}
        for size in (ctx, 4096, 2048, 1024, 512, 256):
            if size > ctx:
                continue
            ms = timer.graph_ms(lambda: decode_v2(query, key, value, tables, lens, out=out, max_context_len=ctx,
                                                  partition_size=size))
            row["v2_partitions"][size] = ms
    del kc, vc, key, value
    torch.cuda.empty_cache()
    return row


TUNE_SHAPES = [  # (batch, ctx, num_heads, num_kv_heads, head_dim, dtype): the engine's shape first
    (256, 1024, 14, 2, 64, torch.bfloat16), (64, 2048, 14, 2, 64, torch.bfloat16),
    (256, 512, 14, 2, 64, torch.bfloat16), (4, 32768, 32, 8, 128, torch.float16),
    (64, 4096, 32, 8, 128, torch.float16), (64, 2048, 64, 8, 128, torch.float16),
]
TUNE_VARIANTS = [  # decode_v2 knobs: the CUDA-core layouts, then tensor cores as (chunks, register cap)
    dict(tensor_cores=False),
    dict(tensor_cores=False, max_heads_per_block=4, tokens_per_group=3),
    dict(tensor_cores=(1, None)), dict(tensor_cores=(1, 128)), dict(tensor_cores=(2, None)),
    dict(tensor_cores=(2, 128)),
]


def tune(timer, copy_bw, path):
    """Time V2 variants and split sizes, print them, and save them to ``path`` after every shape."""
    results = []
    for batch, ctx, num_heads, num_kv_heads, head_dim, dtype in TUNE_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(batch + ctx)
        query, key, value, tables, lens = make_problem(batch, ctx, num_heads, num_kv_heads, head_dim, 16, dtype, gen)
        nbytes = 2 * batch * ctx * num_kv_heads * head_dim * 2 + 4 * query.numel()
        out = torch.empty_like(query)
        expected = torch_gather_sdpa(query.float(), key.float(), value.float(), tables, ctx)
        timings = []
        for variant in TUNE_VARIANTS:
            for size in (None, 2048, 1024, 512, 256):
                if size is not None and (size >= ctx or ctx // size > 16):
                    continue
                kw = dict(out=out, max_context_len=ctx, partition_size=size, **variant)
                err = (decode_v2(query, key, value, tables, lens, **kw).float() - expected).abs().max().item()
                ms = timer.graph_ms(lambda: decode_v2(query, key, value, tables, lens, **kw))
                timings.append(dict(variant=str(variant), partition=size or "auto", ms=ms,
                                    pct_copy=100 * nbytes / (ms * 1e-3) / copy_bw, err=err))
        name = f"B{batch} ctx{ctx} {num_heads}/{num_kv_heads} d{head_dim} {str(dtype)[6:]}"
        print(name, flush=True)
        for t in timings:
            print(f"    {t['variant']:58s} p{t['partition']!s:5s} {t['ms']:.4f} ms {t['pct_copy']:5.1f}% "
                  f"err {t['err']:.1e}", flush=True)
        results.append(dict(shape=name, timings=timings))
        with open(path, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), copy_tbps=copy_bw / 1e12, shapes=results), f, indent=1)
        del key, value
        torch.cuda.empty_cache()


def host_overhead_us(reps=200) -> float:
    """Eager per-call host time of V2 at a tiny shape (what an un-graphed call costs the CPU)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    query, key, value, tables, lens = make_problem(4, 64, 32, 8, 128, 16, torch.float16, gen)
    out = torch.empty_like(query)
    for _ in range(10):
        paged_attention(query, key, value, tables, lens, out=out, max_context_len=64)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        paged_attention(query, key, value, tables, lens, out=out, max_context_len=64)
    host = (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    return host * 1e6


def print_table(rows, copy_bw, card: str):
    print(f"\ncopy roofline {copy_bw / 1e12:.3f} TB/s (read+write)")
    print(f"{'shape':34s} {'V2 ms':>8s} {'TB/s':>6s} {'%copy':>6s} {'V1 ms':>8s} {'gath ms':>8s} {'sdpa ms':>8s} "
          f"{'V2/V1':>6s} {'vs gath':>7s} {'vs sdpa':>7s} {'vs vLLM':>7s} {'vs FI':>7s} {'err':>8s}")
    for r in rows:
        shape = (f"B{r['batch']} ctx{r['ctx']} {r['num_heads']}/{r['num_kv_heads']} d{r['head_dim']} "
                 f"bs{r['block_size']} {r['dtype'][5:] if r['dtype'].startswith('float') else r['dtype']}")
        v2, v1 = r["v2"]["ms"], r["v1"]["ms"]
        peers = peer_times(r, card)
        print(f"{shape:34s} {v2:8.3f} {r['v2']['tbps']:6.2f} {r['v2']['pct_copy']:6.1f} {v1:8.3f} "
              f"{r['torch_gather_sdpa']['ms']:8.3f} {r['torch_sdpa_contiguous']['ms']:8.3f} {v1 / v2:6.2f} "
              f"{r['torch_gather_sdpa']['ms'] / v2:7.2f} {r['torch_sdpa_contiguous']['ms'] / v2:7.2f} "
              f"{peers.get('vllm_triton', math.nan) / v2:7.2f} {peers.get('flashinfer', math.nan) / v2:7.2f} "
              f"{max(r['max_abs_err'].values()):8.1e}")
        if "v2_partitions" in r:
            print("    partition sweep (tokens: ms): " + ", ".join(f"{k}: {v:.3f}" for k, v in r["v2_partitions"].items()))


def peer_times(row, card: str) -> dict:
    """The H200 peers' ms at this row's shape (on an H200 only; empty elsewhere or at other shapes)."""
    key = (row["batch"], row["ctx"], row["num_heads"], row["num_kv_heads"], row["head_dim"], row["dtype"])
    return PEERS_H200.get(key, {}) if "H200" in card and row["block_size"] == 16 else {}


def print_peers(rows, card: str):
    """V2 against FlashInfer at the peer shapes: time ratio, and both as ratios to torch SDPA on contiguous KV."""
    print(f"\n{'peer shape':34s} {'V2 ms':>8s} {'FI ms':>8s} {'FI/V2':>6s} {'sdpa/V2':>8s} {'sdpa/FI':>8s}")
    for r in rows:
        fi = peer_times(r, card).get("flashinfer")
        if fi is None:
            continue
        v2, sdpa = r["v2"]["ms"], r["torch_sdpa_contiguous"]["ms"]
        shape = f"B{r['batch']} ctx{r['ctx']} {r['num_heads']}/{r['num_kv_heads']} d{r['head_dim']} {r['dtype']}"
        print(f"{shape:34s} {v2:8.4f} {fi:8.4f} {fi / v2:6.2f} {sdpa / v2:8.2f} {sdpa / fi:8.2f}")


def plot(rows, path, card):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if (r["num_heads"], r["num_kv_heads"], r["head_dim"], r["block_size"]) == (32, 8, 128, 16)]
    fig, axes = plt.subplots(1, len(GRID_B), figsize=(4 * len(GRID_B), 3.5), sharey=True)
    for ax, batch in zip(axes, GRID_B):
        rs = sorted((r for r in grid if r["batch"] == batch), key=lambda r: r["ctx"])
        for name in ("v2", "v1", "torch_gather_sdpa", "torch_sdpa_contiguous"):
            ax.plot([r["ctx"] for r in rs], [r[name]["pct_copy"] for r in rs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"B={batch}")
        ax.set_xlabel("context")
    axes[0].set_ylabel("% of copy bandwidth")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"decode attention, 32q/8kv heads, d128, fp16, block 16 — {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(path, copy_tbps=None):
    """Re-derive the percentages of a saved run against another roofline, then print and plot it again."""
    with open(path) as f:
        result = json.load(f)
    copy_bw = (copy_tbps or result["copy_tbps"]) * 1e12
    for r in result["rows"]:
        for name in ("v2", "v1", "torch_gather_sdpa", "torch_sdpa_contiguous"):
            r[name]["pct_copy"] = 100 * r["bytes"] / (r[name]["ms"] * 1e-3) / copy_bw
    result["copy_tbps"] = copy_bw / 1e12
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result["rows"], path.replace(".json", ".png"), result["card"])
    print(result["card"])
    print_table(result["rows"], copy_bw, result["card"])
    print_peers(result["rows"], result["card"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=RESULTS, help="directory of the JSON and PNG (default: benchmarks/results)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="headline shapes (and the Qwen2.5-0.5B shape) only")
    parser.add_argument("--tune", action="store_true", help="sweep V2 variants and split sizes, then exit")
    parser.add_argument("--replot", metavar="JSON", help="re-print the table and plot of a saved run (no GPU)")
    parser.add_argument("--copy-tbps", type=float, help="with --replot: the roofline to use")
    args = parser.parse_args()
    if args.replot:
        replot(args.replot, args.copy_tbps)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (torch sees none); --replot JSON reprints a saved run")
    card = torch.cuda.get_device_name()
    timer = Timer(args.reps)
    copy_bw = copy_bandwidth()
    slug = card.replace(" ", "_").replace("/", "_")
    os.makedirs(args.out, exist_ok=True)
    if args.tune:
        print(f"{card}: copy {copy_bw / 1e12:.3f} TB/s (back to back), "
              f"{copy_bandwidth_graphed(timer) / 1e12:.3f} TB/s (graphed: copy engines)")
        tune(timer, copy_bw, os.path.join(args.out, f"kernels_tune_{slug}.json"))
        return
    shapes = [dict(batch=b, ctx=c, sweep=True) for b, c in HEADLINE]
    shapes.append(dict(batch=64, ctx=2048, num_heads=14, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, sweep=True))
    if not args.quick:
        for b in GRID_B:
            for c in GRID_CTX:
                if (b, c) not in HEADLINE and 2 * b * c * 8 * 128 * 2 <= MAX_KV_BYTES:
                    shapes.append(dict(batch=b, ctx=c))
        shapes += [  # GQA ratios, head sizes, block sizes, dtypes
            dict(batch=64, ctx=2048, num_heads=32, num_kv_heads=32),
            dict(batch=64, ctx=2048, num_heads=32, num_kv_heads=8, block_size=8),
            dict(batch=64, ctx=2048, num_heads=32, num_kv_heads=8, block_size=32),
            dict(batch=64, ctx=2048, num_heads=64, num_kv_heads=8),
            dict(batch=64, ctx=2048, num_heads=28, num_kv_heads=4),
            dict(batch=256, ctx=512, num_heads=14, num_kv_heads=2, head_dim=64),
            dict(batch=64, ctx=2048, dtype=torch.bfloat16),
            dict(batch=64, ctx=2048, dtype=torch.float32),
        ]
    rows = []
    started = time.time()
    for shape in shapes:
        rows.append(run_shape(timer, copy_bw, **shape))
        r = rows[-1]
        print(f"B{r['batch']} ctx{r['ctx']} {r['num_heads']}/{r['num_kv_heads']} d{r['head_dim']} "
              f"bs{r['block_size']} {r['dtype']}: v2 {r['v2']['ms']:.3f} ms ({r['v2']['pct_copy']:.1f}%), "
              f"v1 {r['v1']['ms']:.3f} ms, err {r['max_abs_err']}, v2 on {r['v2_kernel']}  [{time.time() - started:.0f}s]",
              flush=True)
    overhead = host_overhead_us()
    result = dict(card=card, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command="python " + " ".join(sys.argv),
                  copy_tbps=copy_bw / 1e12, host_overhead_us_v2_eager=overhead, torch=torch.__version__, rows=rows)
    with open(os.path.join(args.out, f"kernels_{slug}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if not args.quick:
        plot(rows, os.path.join(args.out, f"kernels_{slug}.png"), card)
    print(f"\n{card}; V2 eager host time per call {overhead:.0f} us")
    print_table(rows, copy_bw, card)
    print_peers(rows, card)


if __name__ == "__main__":
    main()
