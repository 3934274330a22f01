"""Decode attention at the engine's and the peers' shapes, one line per shape: the automatic dispatch and two
forced tensor-core variants (one chunk per warp, capped at 128 registers or uncapped), graph-replayed with L2
flushed. For an A/B of two builds, run it in each checkout with a label:

    python benchmarks/decode_ab.py NEW;  (cd ../old && python benchmarks/decode_ab.py OLD)
"""
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.bench_kernels import Timer, copy_bandwidth, make_problem  # noqa: E402
from pagedattention.kernels.decode import decode_v2  # noqa: E402

SHAPES = [  # (batch, context, query heads, KV heads, head_dim, dtype): the Qwen2.5-0.5B shape at the engine's
    (1, 928, 14, 2, 64, torch.bfloat16), (16, 928, 14, 2, 64, torch.bfloat16),  # batches, then the peers'
    (64, 928, 14, 2, 64, torch.bfloat16), (140, 928, 14, 2, 64, torch.bfloat16),
    (256, 928, 14, 2, 64, torch.bfloat16), (256, 1024, 14, 2, 64, torch.bfloat16),
    (64, 2048, 14, 2, 64, torch.bfloat16), (64, 4096, 32, 8, 128, torch.float16),
    (4, 32768, 32, 8, 128, torch.float16), (256, 128, 32, 8, 128, torch.float16),
    (64, 2048, 16, 8, 128, torch.bfloat16), (64, 2048, 32, 8, 64, torch.bfloat16)]
VARIANTS = [None, (1, 128), (1, None)]  # decode_v2's tensor_cores argument: None = the automatic dispatch


def main(label: str) -> None:
    timer, bandwidth = Timer(30), copy_bandwidth()
    for batch, ctx, num_heads, num_kv_heads, head_dim, dtype in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(batch + ctx)
        query, key, value, tables, lens = make_problem(batch, ctx, num_heads, num_kv_heads, head_dim, 16, dtype, gen)
        nbytes = 2 * batch * ctx * num_kv_heads * head_dim * 2 + 4 * query.numel()
        out = torch.empty_like(query)
        expected = decode_v2(query, key, value, tables, lens, max_context_len=ctx, tensor_cores=False).float()
        cells = []
        for variant in VARIANTS:
            kw = dict(out=out, max_context_len=ctx, tensor_cores=variant)
            err = (decode_v2(query, key, value, tables, lens, **kw).float() - expected).abs().max().item()
            ms = timer.graph_ms(lambda: decode_v2(query, key, value, tables, lens, **kw))
            cells.append(f"{str(variant):10s} {ms * 1e3:7.1f}us {100 * nbytes / (ms * 1e-3) / bandwidth:5.1f}% "
                         f"err {err:.0e}")
        print(f"{label} B{batch} ctx{ctx} {num_heads}/{num_kv_heads} d{head_dim} {str(dtype)[6:]}: "
              + " | ".join(cells), flush=True)
        del key, value
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
