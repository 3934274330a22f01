"""A decode step's RoPE + new-token cache write + attention at the Qwen2.5-0.5B shape (14/2 heads, d64, bf16,
contexts 800-1,000, graph bound 2,048): two launches (``rope_write_kv``, then the tensor-core decode kernel)
against the fused ``rope_paged_attention``. Each way is captured 24 times in one CUDA graph (a step's layers);
the table gives µs per layer, the median of 30 replays, and the JSON goes to results/rope_decode_<card>.json.

    python benchmarks/bench_rope_decode.py [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
from pagedattention.kernels import decode, layer_ops  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, BOUND, LAYERS = 14, 2, 64, 16, 2048, 24
BATCHES = (1, 16, 64, 140, 256)


def problem(batch: int, gen: torch.Generator):
    """Un-rotated q/k/v rows of one qkv projection, cos/sin, caches, block tables, lengths and slots."""
    lens = torch.randint(800, 1001, (batch,), generator=gen)
    per_seq = BOUND // BLOCK
    key_cache = torch.randn(batch * per_seq, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(batch * per_seq, generator=gen).int().view(batch, per_seq).cuda()
    last = lens - 1
    slots = (tables.cpu()[torch.arange(batch), last // BLOCK].long() * BLOCK + last % BLOCK).cuda()
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    angles = last.float()[:, None] / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)[None]
    return (q.view(batch, HEADS, HEAD_DIM), k.view(batch, KV_HEADS, HEAD_DIM), v.view(batch, KV_HEADS, HEAD_DIM),
            angles.cos().cuda(), angles.sin().cuda(), key_cache, value_cache, slots, tables, lens.int().cuda())


def two_launches(q, k, v, cos, sin, key_cache, value_cache, slots, tables, lens, out):
    rotated = layer_ops.rope_write_kv(q, k, v, cos, sin, key_cache, value_cache, slots)
    return decode.decode_v2(rotated, key_cache, value_cache, tables, lens, out=out, max_context_len=BOUND)


def fused(q, k, v, cos, sin, key_cache, value_cache, slots, tables, lens, out):
    return decode.rope_paged_attention(q, k, v, cos, sin, key_cache, value_cache, slots, tables, lens, out=out,
                                       max_context_len=BOUND)


def us_per_layer(fn, args, out, reps: int = 30) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn(*args, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn(*args, out)
    return common.percentile(common.time_ms(graph.replay, torch.device("cuda"), reps=reps), 50) * 1000 / LAYERS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    info = common.run_info(torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'batch':>5} {'two launches µs':>16} {'fused µs':>9} {'saved':>6}   ({info['card']}, per layer)")
    for batch in BATCHES:
        args_ = problem(batch, gen)
        out = torch.empty(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        expected = two_launches(*args_, torch.empty_like(out)).clone()
        separate, together = us_per_layer(two_launches, args_, out), us_per_layer(fused, args_, out)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)  # the fused call computed the same
        rows.append({"batch": batch, "two_launches_us": separate, "fused_us": together,
                     "saved_fraction": 1 - together / separate})
        print(f"{batch:>5} {separate:>16.2f} {together:>9.2f} {100 * rows[-1]['saved_fraction']:>5.1f}%", flush=True)
    path = common.write_json(args.out / f"rope_decode_{common.result_tag(info['card'], False)}.json",
                             {**info, "shape": f"{HEADS}/{KV_HEADS} heads, d{HEAD_DIM}, bf16, contexts 800-1000, "
                                                f"bound {BOUND}", "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
