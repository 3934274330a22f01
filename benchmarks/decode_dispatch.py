"""Decode dispatch check: the automatic choice (``decode.tc_config``) against the tensor-core kernel forced (capped
at 128 registers, uncapped) for groups of 4 and 2, at the Llama-3.2-1B shape (32/8 d64), 32/8 d128 and the
Qwen3-0.6B shape (16/8 d128), with an eager bound (max_context_len = ctx) and a CUDA graph's (4096). Graph-timed,
L2 flushed, bf16, every context equal; the results/decode_group4_h200.log table:

    python benchmarks/decode_dispatch.py | tee benchmarks/results/decode_group4_h200.log
"""
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.bench_kernels import Timer, copy_bandwidth, make_problem  # noqa: E402
from pagedattention.kernels.decode import decode_v2  # noqa: E402

timer, bw = Timer(20), copy_bandwidth()
print(f"copy {bw / 1e12:.2f} TB/s; us per launch (% of copy): auto | tc capped | tc uncapped")
for nh, nkv, hd in ((32, 8, 64), (32, 8, 128), (16, 8, 128)):
    for batch, ctx in ((1, 900), (16, 900), (64, 900), (128, 900), (256, 900), (256, 128), (256, 400), (64, 2048),
                       (16, 4096)):
        for bound in sorted({ctx, 4096}):
            gen = torch.Generator(device="cuda").manual_seed(batch + ctx)
            q, k, v, tables, lens = make_problem(batch, ctx, nh, nkv, hd, 16, torch.bfloat16, gen)
            nbytes = 2 * batch * ctx * nkv * hd * 2
            if bound > ctx:  # a graph's block tables: as wide as the bound, the columns past the context unused
                pad = torch.zeros(batch, bound // 16 - tables.shape[1], dtype=torch.int32, device="cuda")
                tables = torch.cat([tables, pad], dim=1).contiguous()
            out = torch.empty_like(q)
            ref = decode_v2(q, k, v, tables, lens, max_context_len=bound, tensor_cores=False).float()
            cells = []
            for variant in (None, (1, 128), (1, None)):
                kw = dict(out=out, max_context_len=bound, tensor_cores=variant)
                err = (decode_v2(q, k, v, tables, lens, **kw).float() - ref).abs().max().item()
                assert err < 2e-2, err
                us = timer.graph_ms(lambda: decode_v2(q, k, v, tables, lens, **kw)) * 1e3
                cells.append(f"{us:7.1f} ({100 * nbytes / (us * 1e-6) / bw:3.0f}%)")
            print(f"{nh}/{nkv} d{hd} B{batch} ctx{ctx} bound{bound}: " + " | ".join(cells), flush=True)
            del k, v
            torch.cuda.empty_cache()
