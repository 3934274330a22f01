"""The decode kernels, write_kv and copy_blocks against their definitions.

The definition of decode attention is ``scaled_dot_product_attention`` of the query over the sequence's tokens
gathered from the paged cache, computed here in float64 from the same (rounded) inputs. Tolerances allow for
the kernels' fp32 arithmetic and the rounding of the output to its dtype (relative steps 2^-11 for fp16,
2^-8 for bf16); fp32 outputs differ only by fp32 accumulation over at most a few thousand terms.

Under Numba's CUDA simulator (no GPU) sizes are tiny and examples few (each launch is simulated by Python
threads); on a GPU the same tests run at full sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattention.kernels import copy_blocks, paged_attention, reference_copy_blocks, reference_write_kv, write_kv
from pagedattention.kernels.decode import MIN_PARTITION, decode_v2, split_plan, tc_config
from pagedattention.kernels.reference import gather_kv
from pagedattention.kernels.runtime import simulator_enabled

SIM = simulator_enabled()
DEVICE = "cpu" if SIM else "cuda"
HEAD_DIMS = (16, 32) if SIM else (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOLERANCE = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float32: (2e-5, 2e-5)}
MAX_CONTEXT = 70 if SIM else 3000
EXAMPLES = 20 if SIM else 60  # simulated launches take seconds each


def make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key = torch.randn(shape, generator=gen).to(dtype)
    value = torch.randn(shape, generator=gen).to(dtype)
    return key.to(DEVICE), value.to(DEVICE)


def make_batch(context_lens, block_size, num_kv_heads, head_dim, dtype, gen, *, share=True):
    """Caches and block tables for the given context lengths.

    Blocks are scattered at random over a cache larger than needed; with ``share`` some sequences reuse blocks
    of others (prefix sharing). Table padding holds an out-of-range id and every cache slot that no sequence
    uses holds NaN, so reading past a context or through padding cannot go unnoticed.
    """
    blocks_needed = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(blocks_needed) + 3
    key, value = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_needed) + int(torch.randint(0, 3, (1,), generator=gen))
    tables = torch.full((len(context_lens), width), num_blocks + 10_000, dtype=torch.int32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    taken = 0
    for i, n in enumerate(blocks_needed):
        for j in range(n):
            if share and i > 0 and j < blocks_needed[i - 1] and torch.rand(1, generator=gen).item() < 0.3:
                tables[i, j] = tables[i - 1, j]  # shared block (same physical block as the previous sequence)
            else:
                tables[i, j] = perm[taken]
                taken += 1
        for t in range(context_lens[i]):
            used[tables[i, t // block_size], t % block_size] = True
    key[~used.to(DEVICE)] = float("nan")
    value[~used.to(DEVICE)] = float("nan")
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return key, value, tables.to(DEVICE), lens.to(DEVICE)


def reference(query, key, value, tables, lens, scale):
    """float64 SDPA over the gathered tokens, GQA by repeating KV heads."""
    out = []
    group = query.shape[1] // key.shape[2]
    for i, n in enumerate(lens.tolist()):
        k, v = gather_kv(key, value, tables[i], n)
        q = query[i].double().unsqueeze(1)                       # [H, 1, D]
        k = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, n, D]
        v = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0])
    return torch.stack(out)


def check_close(out, expected):
    assert not torch.isnan(out).any(), "output has NaN (unwritten element or a read past the context)"
    rtol, atol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


def poisoned_like(query):
    return torch.full_like(query, float("nan"))


@st.composite
def decode_problem(draw, version):
    dtype = draw(st.sampled_from(DTYPES))
    block_size = draw(st.sampled_from((8, 16, 32)))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    group = draw(st.sampled_from((1, 2, 4, 7, 8)))
    if SIM:  # at most 8 thread blocks per simulated launch
        num_kv_heads = 1 if group > 2 else draw(st.integers(1, 2))
        per_seq = num_kv_heads * group if version == "v1" else num_kv_heads
        num_seqs = draw(st.integers(1, max(1, 8 // per_seq)))
    else:
        num_kv_heads = draw(st.sampled_from((1, 2, 8)))
        num_seqs = draw(st.integers(1, 24))
    special = st.sampled_from((1, block_size, block_size + 1, 2 * block_size, MAX_CONTEXT))
    lens = draw(st.lists(st.one_of(special, st.integers(1, MAX_CONTEXT)), min_size=num_seqs, max_size=num_seqs))
    scale = draw(st.sampled_from((None, 0.3)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, block_size, head_dim, group, num_kv_heads, lens, scale, seed


def run_decode_case(version, problem, **kwargs):
    dtype, block_size, head_dim, group, num_kv_heads, lens, scale, seed = problem
    gen = torch.Generator().manual_seed(seed)
    key, value, tables, ctx = make_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen)
    query = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = poisoned_like(query)
    result = paged_attention(query, key, value, tables, ctx, scale=scale, version=version, out=out, **kwargs)
    assert result is out
    check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                     head_dim ** -0.5 if scale is None else scale))


@settings(max_examples=EXAMPLES)
@given(problem=decode_problem("v1"))
def test_v1_matches_sdpa(problem):
    run_decode_case("v1", problem)


@settings(max_examples=EXAMPLES)
@given(problem=decode_problem("v2"))
def test_v2_matches_sdpa(problem):
    run_decode_case("v2", problem)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 1), (7, 1), (4, 2), (3, 3)])
def test_v2_layouts_for_each_group_size(num_heads, num_kv_heads):
    """Group 8 is split over two blocks per KV head, 7 is served whole, 2 and 1 take 8 tokens per lane."""
    gen = torch.Generator().manual_seed(num_heads)
    lens = [37, 8] if num_kv_heads < 3 else [19]
    key, value, tables, ctx = make_batch(lens, 8, num_kv_heads, HEAD_DIMS[0], torch.float16, gen)
    query = torch.randn(len(lens), num_heads, HEAD_DIMS[0], generator=gen).half().to(DEVICE)
    out = paged_attention(query, key, value, tables, ctx, out=poisoned_like(query))
    check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                     HEAD_DIMS[0] ** -0.5))


TC_CASES = [  # (group, num_kv_heads, context lens, dtype, block size, partition size, head_dim, (chunks, cap))
    (7, 1, [37], torch.float16, 16, None, 64, (1, 128)),
    (7, 1, [150, 37], torch.bfloat16, 8, 64, 64, (2, None)),
    (4, 2, [5, 129], torch.float16, 32, None, 64, (1, None)),
    (1, 1, [20], torch.bfloat16, 16, None, 128, (1, None)),
    (8, 1, [70, 1], torch.float16, 16, 32, 64 if SIM else 128, (2, None)),
]


@pytest.mark.parametrize("group,num_kv_heads,lens,dtype,block_size,partition_size,head_dim,layout", TC_CASES)
def test_v2_tensor_cores_match_sdpa(group, num_kv_heads, lens, dtype, block_size, partition_size, head_dim,
                                    layout):
    """The tensor-core kernel (forced, whatever the automatic choice) at every group size it serves, in the
    layouts the dispatch picks, with and without a split; contexts shorter than one tile and ending mid-chunk."""
    gen = torch.Generator().manual_seed(group * 7 + len(lens))
    if not SIM:  # full sizes on a GPU
        lens = [n * 20 + 3 for n in lens]
        partition_size = partition_size and partition_size * 8
    key, value, tables, ctx = make_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen)
    query = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = decode_v2(query, key, value, tables, ctx, out=poisoned_like(query), tensor_cores=layout,
                    partition_size=partition_size, max_context_len=tables.shape[1] * block_size)
    check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                     head_dim ** -0.5))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_max_context_len_above_the_actual_lengths(version):
    """The CUDA-graph case: the grid is sized for a bound far above every context."""
    gen = torch.Generator().manual_seed(7)
    lens = [1, 16, 33]
    key, value, tables, ctx = make_batch(lens, 16, 2, HEAD_DIMS[0], torch.float16, gen)
    tables = torch.cat([tables, torch.zeros(3, 6, dtype=torch.int32, device=DEVICE)], 1)  # room for 160 tokens
    query = torch.randn(3, 2, HEAD_DIMS[0], generator=gen).half().to(DEVICE)
    out = paged_attention(query, key, value, tables, ctx, version=version, out=poisoned_like(query),
                          max_context_len=tables.shape[1] * 16)
    check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                     HEAD_DIMS[0] ** -0.5))


@pytest.mark.parametrize("partition_size,lens", [(16, [16, 32, 47]), (8, [1, 9, 24]), (24, [48, 49, 5])])
def test_v2_split_kv_partitions_merge(partition_size, lens):
    """Contexts ending exactly on, just past, and well before partition boundaries; more partitions in the grid
    (from max_context_len) than any sequence uses."""
    gen = torch.Generator().manual_seed(partition_size)
    key, value, tables, ctx = make_batch(lens, 8, 1, HEAD_DIMS[0], torch.float32, gen)
    query = torch.randn(len(lens), 2, HEAD_DIMS[0], generator=gen).to(DEVICE)
    out = decode_v2(query, key, value, tables, ctx, out=poisoned_like(query), partition_size=partition_size,
                    max_context_len=tables.shape[1] * 8)
    check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                     HEAD_DIMS[0] ** -0.5))


def test_split_launches_reset_their_arrival_counters():
    """The last partition block of each (sequence, head block) to finish merges and sets its arrival counter back
    to 0: after each split launch every counter is 0 again, so the next launch (a graph replay), with new
    inputs, merges right too."""
    from pagedattention.kernels import decode
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        lens = [40 + seed, 33]
        key, value, tables, ctx = make_batch(lens, 8, 1, HEAD_DIMS[0], torch.float32, gen)
        query = torch.randn(len(lens), 2, HEAD_DIMS[0], generator=gen).to(DEVICE)
        out = decode_v2(query, key, value, tables, ctx, out=poisoned_like(query), partition_size=16,
                        max_context_len=tables.shape[1] * 8)
        check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                         HEAD_DIMS[0] ** -0.5))
        counters = decode._arrivals[query.device]
        assert counters.numel() >= decode.MIN_ARRIVALS and not counters.any()


def test_split_plan():
    """No split when the (sequence, KV head) blocks fill the GPU; more partitions the fewer blocks there are,
    as many as one wave holds, each at least MIN_PARTITION tokens."""
    assert split_plan(2048, 128, 132) == (128, 1)                # B=256 x 8 KV heads, short contexts
    assert split_plan(512, 4096, 132) == (4096, 1)               # B=64 x 8 KV heads: already a wave of blocks
    assert split_plan(32, 32768, 132) == (MIN_PARTITION, 16)     # B=4 x 8 KV heads: 16 x 32 blocks fill a wave
    assert split_plan(32, 300, 132) == (MIN_PARTITION, 3)        # short: no partition under MIN_PARTITION
    assert split_plan(4, MIN_PARTITION, 132) == (MIN_PARTITION, 1)


def test_split_by_each_context_under_a_larger_bound():
    """A launch sized for a bound far above the contexts (a CUDA graph's) splits each sequence by its own
    length: the long one over several partitions and the merge, the short one in one partition written
    directly. Both match the reference."""
    gen = torch.Generator().manual_seed(11)
    lens = [2 * MIN_PARTITION + 37, 45]
    key, value, tables, ctx = make_batch(lens, 16, 1, HEAD_DIMS[0], torch.float32, gen)
    query = torch.randn(len(lens), 2, HEAD_DIMS[0], generator=gen).to(DEVICE)
    bound = 4 * MIN_PARTITION
    padded = torch.full((len(lens), bound // 16), key.shape[0] + 10_000, dtype=torch.int32, device=tables.device)
    padded[:, :tables.shape[1]] = tables
    assert split_plan(len(lens), bound, 132)[1] == 4             # 4 partitions x 2 sequences: 8 blocks
    out = decode_v2(query, key, value, padded, ctx, out=poisoned_like(query), max_context_len=bound)
    check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                     HEAD_DIMS[0] ** -0.5))


def test_tensor_core_dispatch():
    """Tensor cores for 16-bit caches with head_dim 64 or 128: always for groups of 5-8 and for a group of 4 at
    head_dim 64; at head_dim 128 for a group of 4 when the launch is split over the context or the contexts
    reach 2,048; never for fp32, other head sizes or groups of 1-3. head_dim 64 runs under a 128-register cap,
    head_dim 128 uncapped."""
    sms = 132
    assert tc_config("bfloat16", 64, 7, 64 * 2, 2048, sms) is not None          # Qwen2.5-0.5B: 14/2 heads
    assert tc_config("float16", 128, 8, 64 * 8, 2048, sms) is not None          # 64/8 heads, no split
    assert tc_config("float16", 128, 4, 4 * 8, 32768, sms) is not None          # 32/8 heads, B=4, split
    assert tc_config("float16", 128, 4, 64 * 8, 4096, sms) == (1, None)         # 32/8 heads, B=64: uncapped
    assert tc_config("float16", 128, 4, 4 * 8, 32768, sms) == (1, None)         # split: uncapped
    assert tc_config("bfloat16", 64, 7, 256 * 2, 1024, sms) == (1, 128)         # d64: capped
    assert tc_config("float16", 128, 4, 256 * 8, 128, sms) is None              # B=256, short contexts
    assert tc_config("bfloat16", 64, 4, 64 * 8, 4096, sms) == (1, 128)         # d64, a group of 4 (Llama-3.2-1B)
    assert tc_config("bfloat16", 64, 4, 256 * 8, 128, sms) == (1, 128)          # even at short contexts
    for args in (("float32", 128, 8), ("float16", 256, 8), ("bfloat16", 32, 7), ("float16", 128, 2),
                 ("float16", 128, 1)):
        assert tc_config(*args, 4 * 8, 32768, sms) is None, args


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_round_trip(dtype):
    gen = torch.Generator().manual_seed(1)
    key_cache, value_cache = make_cache(6, 8, 2, HEAD_DIMS[0], dtype, gen)
    fused = torch.randn(5, 3, 2, HEAD_DIMS[0], generator=gen).to(dtype).to(DEVICE)  # a fused qkv-like tensor
    key, value = fused[:, 1], fused[:, 2]  # strided token rows, as sliced from a projection
    slots = torch.tensor([3, -1, 17, 40, 47], dtype=torch.int64, device=DEVICE)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    reference_write_kv(key, value, expected_k, expected_v, slots)
    write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_round_trip(dtype):
    gen = torch.Generator().manual_seed(2)
    layers = [make_cache(7, 16, 2, HEAD_DIMS[0], dtype, gen) for _ in range(3)]
    key_caches, value_caches = [k for k, _ in layers], [v for _, v in layers]
    expected_k, expected_v = [k.clone() for k in key_caches], [v.clone() for v in value_caches]
    src_to_dst = torch.tensor([[0, 4], [6, 1], [2, 3]], dtype=torch.int64)
    reference_copy_blocks(expected_k, expected_v, src_to_dst)
    copy_blocks(key_caches, value_caches, src_to_dst)
    for got, want in zip(key_caches + value_caches, expected_k + expected_v):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Invalid arguments: each raises, names the argument, and writes nothing.
# ---------------------------------------------------------------------------------------------------------------


def _valid_decode_args():
    gen = torch.Generator().manual_seed(3)
    key, value, tables, ctx = make_batch([5, 9], 8, 2, 16, torch.float16, gen)
    query = torch.randn(2, 4, 16, generator=gen).half().to(DEVICE)
    return dict(query=query, key_cache=key, value_cache=value, block_tables=tables, context_lens=ctx)


BAD_DECODE = [
    ("query", lambda a: a["query"].float(), TypeError),
    ("query", lambda a: a["query"][:, :3], ValueError),                       # 3 heads, not a multiple of 2
    ("query", lambda a: a["query"].transpose(0, 1).contiguous().transpose(0, 1), ValueError),  # not contiguous
    ("query", lambda a: a["query"][..., :8].contiguous(), ValueError),        # head_dim mismatch
    ("key_cache", lambda a: a["key_cache"][:, :, :, :8].contiguous(), ValueError),
    ("value_cache", lambda a: a["value_cache"][:3], ValueError),
    ("key_cache", lambda a: a["key_cache"][:, :6].contiguous(), ValueError),  # block_size 6 unsupported
    ("block_tables", lambda a: a["block_tables"].long(), TypeError),
    ("block_tables", lambda a: a["block_tables"][:1], ValueError),
    ("context_lens", lambda a: a["context_lens"].long(), TypeError),
    ("context_lens", lambda a: a["context_lens"] * 0, ValueError),             # length 0
    ("context_lens", lambda a: a["context_lens"] + 1000, ValueError),          # past the table
    ("key_cache", lambda a: [1, 2], TypeError),
]


@pytest.mark.parametrize("name,corrupt,error", BAD_DECODE)
def test_paged_attention_rejects_bad_arguments(name, corrupt, error):
    args = _valid_decode_args()
    args[name] = corrupt(args)
    out = poisoned_like(_valid_decode_args()["query"])
    with pytest.raises(error, match=name):
        paged_attention(**args, out=out if out.shape == args["query"].shape else None)
    assert torch.isnan(out).all()


def test_paged_attention_rejects_misaligned_query():
    args = _valid_decode_args()
    flat = torch.empty(args["query"].numel() + 1, dtype=torch.float16, device=DEVICE)
    args["query"] = flat[1:].view(args["query"].shape)  # contiguous, but 2 bytes off a 16-byte boundary
    with pytest.raises(ValueError, match="query"):
        paged_attention(**args)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(version="v3"), ValueError, "version"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(max_context_len=0), ValueError, "max_context_len"),
    (dict(max_context_len=10_000), ValueError, "max_context_len"),
    (dict(max_context_len=5.0), TypeError, "max_context_len"),
    (dict(out=torch.empty(2, 4, 8, dtype=torch.float16)), ValueError, "out"),
])
def test_paged_attention_rejects_bad_options(kwargs, error, name):
    with pytest.raises(error, match=name):
        paged_attention(**_valid_decode_args(), **kwargs)


def test_v2_rejects_more_partitions_than_the_grid_holds():
    args = _valid_decode_args()
    tables = args["block_tables"]
    wide = torch.full((tables.shape[0], 9000), 10_000, dtype=tables.dtype, device=tables.device)
    wide[:, :tables.shape[1]] = tables                 # 9,000 blocks of 8 tokens: 72,000 one-token partitions
    args["block_tables"] = wide
    out = poisoned_like(args["query"])
    with pytest.raises(ValueError, match="partition_size"):
        decode_v2(**args, out=out, partition_size=1, max_context_len=72_000)
    assert torch.isnan(out).all()


@pytest.mark.skipif(SIM, reason="device mismatch needs a GPU")
def test_paged_attention_rejects_cpu_tensors():
    args = _valid_decode_args()
    args["block_tables"] = args["block_tables"].cpu()
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(**args)


def test_write_kv_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(4)
    key_cache, value_cache = make_cache(4, 8, 2, 16, torch.float16, gen)
    key = torch.randn(3, 2, 16, generator=gen).half().to(DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    before = key_cache.clone()
    cases = [
        (dict(key=key.float()), TypeError, "key"),
        (dict(key=key[:, :1]), ValueError, "key"),
        (dict(value=key[:2]), ValueError, "value"),
        (dict(slot_mapping=slots.int()), TypeError, "slot_mapping"),
        (dict(slot_mapping=slots[:2]), ValueError, "slot_mapping"),
        (dict(key=key.transpose(1, 2)), ValueError, "key"),
    ]
    for change, error, name in cases:
        args = dict(key=key, value=key, key_cache=key_cache, value_cache=value_cache, slot_mapping=slots)
        args.update(change)
        with pytest.raises(error, match=name):
            write_kv(**args)
    assert torch.equal(key_cache, before)


def test_copy_blocks_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(5)
    k, v = make_cache(4, 8, 2, 16, torch.float16, gen)
    k2, v2 = make_cache(5, 8, 2, 16, torch.float16, gen)
    pairs = torch.tensor([[0, 1]])
    cases = [
        (([k], [v], pairs.int()), TypeError, "src_to_dst"),
        (([k], [v], torch.tensor([0, 1])), ValueError, "src_to_dst"),
        (([k], [v], torch.tensor([[0, 4]])), ValueError, "src_to_dst"),
        (([k], [v], torch.tensor([[-1, 2]])), ValueError, "src_to_dst"),
        (([k, k2], [v, v2], pairs), ValueError, "layer 1"),
        (([k], [v, v], pairs), ValueError, "value_caches"),
        ((k, [v], pairs), TypeError, "key_caches"),
    ]
    before = k.clone()
    for args, error, name in cases:
        with pytest.raises(error, match=name):
            copy_blocks(*args)
    assert torch.equal(k, before)


@pytest.mark.skipif(SIM, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cuda_graph_replay_follows_changed_inputs(version):
    """Captured once with max_context_len, replayed after context_lens/block_tables/query change in place."""
    gen = torch.Generator().manual_seed(11)
    key, value, tables, ctx = make_batch([300, 2000, 17, 900], 16, 2, 128, torch.float16, gen, share=False)
    key = torch.nan_to_num(key)
    value = torch.nan_to_num(value)
    query = torch.randn(4, 8, 128, generator=gen).half().cuda()
    out = torch.empty_like(query)
    bound = tables.shape[1] * 16
    paged_attention(query, key, value, tables, ctx, version=version, out=out, max_context_len=bound)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(query, key, value, tables, ctx, version=version, out=out, max_context_len=bound)
    for step in range(3):
        new_lens = torch.randint(1, bound + 1, (4,), generator=gen, dtype=torch.int32)
        ctx.copy_(new_lens)
        tables.copy_(torch.randint(0, key.shape[0], tables.shape, generator=gen, dtype=torch.int32))
        query.copy_(torch.randn(4, 8, 128, generator=gen).half())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_close(out.cpu(), reference(query.cpu(), key.cpu(), value.cpu(), tables.cpu(), ctx.cpu(),
                                         128 ** -0.5))
