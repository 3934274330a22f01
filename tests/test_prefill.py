"""Paged prefill attention: packed new tokens attend causally over the paged KV cache.

The definition is the reference: for each sequence, gather its K/V through the block table and run
``scaled_dot_product_attention`` in float64 with the mask "query position p sees cache positions <= p",
where the q_len new tokens sit at positions context_len - q_len .. context_len - 1.

Every case draws fresh random data, scatters each sequence's blocks over the cache, fills every slot that must
not be read (block 0, which padding entries of the tables point at, and the tails of last blocks) with NaN,
and poisons the output with NaN first. Under the CUDA simulator the sizes are tiny; on a GPU they are real.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattention.kernels.paged_prefill import keys_per_tile, paged_prefill_attention
from pagedattention.kernels.reference import reference_paged_attention, reference_paged_prefill_attention
from pagedattention.kernels.runtime import simulator_enabled

SIM = simulator_enabled()
DEVICE = "cpu" if SIM else "cuda"
# ||out - ref|| / ||ref|| bounds: one rounding of the output plus P rounded to 16 bits before P @ V
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def make_case(specs, num_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.float16, seed=0):
    """``specs``: [(context_len, q_len)] per sequence. Returns the kernel's arguments as a dict."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx, _ in specs]
    num_blocks = 1 + sum(blocks_per_seq) + 2               # block 0 stays unused, plus spare blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    value_cache = torch.full(shape, float("nan"), dtype=torch.float32)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(blocks_per_seq, default=1) + 1        # a padding column (entry 0) on every row
    block_tables = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    for i, (ctx, _) in enumerate(specs):
        for b in range(blocks_per_seq[i]):
            block = order.pop()
            block_tables[i, b] = block
            n = min(block_size, ctx - b * block_size)
            key_cache[block, :n] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
            value_cache[block, :n] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    q_lens = [q for _, q in specs]
    cu = torch.tensor([0] + q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen)
    return dict(query=query.to(dtype).to(DEVICE), key_cache=key_cache.to(dtype).to(DEVICE),
                value_cache=value_cache.to(dtype).to(DEVICE), block_tables=block_tables.to(DEVICE),
                cu_seqlens_q=cu.to(DEVICE), context_lens=torch.tensor([c for c, _ in specs], dtype=torch.int32,
                                                                      device=DEVICE))


def reference(case, scale=None):
    """float64 SDPA with the causal-with-offset mask on gathered K/V."""
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
    return reference_paged_prefill_attention(d["query"], d["key_cache"], d["value_cache"], d["block_tables"],
                                             d["cu_seqlens_q"], d["context_lens"], scale=scale)


def run_kernel(case, **kwargs):
    out = torch.full_like(case["query"], float("nan"))
    result = paged_prefill_attention(**case, out=out, **kwargs)
    assert result is out
    return out


def assert_close(out, ref, dtype):
    assert not torch.isnan(out).any(), "some outputs were not written (or NaN leaked in)"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < REL_TOL[dtype], f"relative error {err:.2e}"


def check(specs, num_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.float16, seed=0, **kwargs):
    case = make_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    out = run_kernel(case, **kwargs)
    assert out.dtype == dtype and out.shape == case["query"].shape
    assert_close(out, reference(case, kwargs.get("scale")), dtype)
    return case, out


# ----------------------------------------------------------------------------------------------------------- shapes
def test_plain_prefill_crosses_query_and_key_tiles():
    """q_len = context_len: ordinary causal prefill, spanning two query tiles and two key tiles."""
    n = 64 + 6 if SIM else 2000
    check([(n, n)], num_heads=2, num_kv_heads=1, head_dim=32)


def test_prefix_hit_attends_to_cached_prefix():
    """q_len < context_len: a prefix-cache hit or a later chunk sees every earlier cached token."""
    specs = [(2 * keys_per_tile(32) + 21, 20)] if SIM else [(4096 + 512, 512), (3000, 777)]
    check(specs, num_heads=2, num_kv_heads=1, head_dim=32)


def test_single_token_queries_equal_decode():
    """q_len = 1 is decode: the result equals the decode reference (full attention over the context)."""
    specs = [(37, 1), (16, 1), (1, 1)] if SIM else [(c, 1) for c in (1, 16, 37, 1000, 4097)]
    case, out = check(specs, num_heads=4, num_kv_heads=2, head_dim=32)
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
    decode = reference_paged_attention(d["query"], d["key_cache"], d["value_cache"], d["block_tables"],
                                       d["context_lens"])
    assert_close(out, decode, torch.float16)


def test_mixed_lengths_in_one_batch():
    """Plain prefill, chunks, single tokens and an empty sequence packed in one launch."""
    specs = [(40, 40), (90, 7), (17, 1), (5, 0), (9, 9)] if SIM else \
        [(300, 300), (4000, 129), (17, 1), (50, 0), (1025, 1025), (64, 64), (65, 2)]
    check(specs, num_heads=2, num_kv_heads=1, head_dim=16)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(1, 1), (2, 1), (7, 1)] if SIM else
                         [(8, 8), (16, 8), (14, 2), (32, 8), (64, 8)])
def test_grouped_query_attention(num_heads, num_kv_heads):
    specs = [(21, 13)] if SIM else [(700, 700), (900, 100)]
    check(specs, num_heads, num_kv_heads, head_dim=16)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_head_dims(head_dim):
    """Each head size uses its own key-tile width (keys_per_tile); cross one key-tile boundary."""
    n = keys_per_tile(head_dim) + 3
    specs = [(n, n)] if SIM else [(1500, 1500), (2000, 300)]
    check(specs, num_heads=1 if SIM else 4, num_kv_heads=1, head_dim=head_dim)


@pytest.mark.parametrize("block_size", [8, 32])
def test_block_sizes(block_size):
    specs = [(45, 30)] if SIM else [(1000, 1000), (999, 33)]
    check(specs, num_heads=2, num_kv_heads=2 if SIM else 1, head_dim=16, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_dtypes(dtype):
    specs = [(19, 5), (6, 6)] if SIM else [(800, 800), (1200, 100)]
    check(specs, num_heads=2, num_kv_heads=1, head_dim=16 if SIM else 64, dtype=dtype)


def test_scale_and_max_q_len():
    """An explicit scale is honoured; passing max_q_len (no read-back) gives the same result."""
    specs = [(30, 12), (12, 12)] if SIM else [(800, 500), (500, 500)]
    case, out = check(specs, num_heads=2, num_kv_heads=1, head_dim=16, scale=0.3)
    again = run_kernel(case, scale=0.3, max_q_len=max(q for _, q in specs))
    assert torch.equal(out, again)


@settings(max_examples=12 if SIM else 25, deadline=None)  # on a GPU most examples compile a new kernel
@given(data=st.data())
def test_random_shapes(data):
    num_seqs = data.draw(st.integers(1, 2 if SIM else 6), label="num_seqs")
    max_ctx = 80 if SIM else 3000
    specs = []
    for _ in range(num_seqs):
        ctx = data.draw(st.integers(1, max_ctx), label="context_len")
        specs.append((ctx, data.draw(st.integers(0, ctx if SIM else min(ctx, 1200)), label="q_len")))
    num_kv_heads = data.draw(st.sampled_from([1] if SIM else [1, 2, 4]), label="num_kv_heads")
    group = data.draw(st.sampled_from([1, 2, 3] if SIM else [1, 2, 4, 7, 8]), label="group")
    head_dim = data.draw(st.sampled_from([16, 32] if SIM else [32, 64, 128]), label="head_dim")
    block_size = data.draw(st.sampled_from([8, 16, 32]), label="block_size")
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]), label="dtype")
    if sum(q for _, q in specs) == 0:
        specs[0] = (specs[0][0], 1)
    check(specs, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype,
          seed=data.draw(st.integers(0, 2**31 - 1), label="seed"))


# ---------------------------------------------------------------------------------------------------- bad input
def small_case():
    case = make_case([(10, 4), (7, 7)], num_heads=4, num_kv_heads=2, head_dim=16)
    case["out"] = torch.full_like(case["query"], 7.0)
    return case


BAD_INPUTS = [
    # (what to change, exception, words the message must contain)
    (lambda c: c.update(query=c["query"].float()), TypeError, "query"),
    (lambda c: c.update(query=c["query"][:, :, :8].contiguous()), ValueError, "head_dim"),
    (lambda c: c.update(query=c["query"][:, :3].contiguous()), ValueError, "num_heads"),
    (lambda c: c.update(query=c["query"].transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "contiguous"),
    (lambda c: c.update(key_cache=c["key_cache"][..., :12].contiguous(),
                        value_cache=c["value_cache"][..., :12].contiguous()), ValueError, "head_dim"),
    (lambda c: c.update(value_cache=c["value_cache"][:-1].contiguous()), ValueError, "value_cache"),
    (lambda c: c.update(block_tables=c["block_tables"].long()), TypeError, "block_tables"),
    (lambda c: c.update(block_tables=c["block_tables"][:1]), ValueError, "block_tables"),
    (lambda c: c.update(cu_seqlens_q=c["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q"),
    (lambda c: c.update(cu_seqlens_q=c["cu_seqlens_q"] + 1), ValueError, "cu_seqlens_q"),
    (lambda c: c.update(cu_seqlens_q=torch.tensor([0, 12, 11], dtype=torch.int32, device=DEVICE)), ValueError,
     "non-decreasing"),
    (lambda c: c.update(cu_seqlens_q=torch.tensor([0, 11, 11], dtype=torch.int32, device=DEVICE)), ValueError,
     "q_len"),
    (lambda c: c.update(context_lens=c["context_lens"][:1]), ValueError, "context_lens"),
    (lambda c: c.update(context_lens=c["context_lens"] * 100), ValueError, "context_lens"),
    (lambda c: c.update(context_lens=c["context_lens"] * 0), ValueError, "context_lens"),
    (lambda c: c.update(scale=-1.0), ValueError, "scale"),
    (lambda c: c.update(out=torch.empty(3, 4, 16, dtype=torch.float16, device=DEVICE)), ValueError, "out"),
    (lambda c: c.update(out=torch.empty_like(c["query"], dtype=torch.float32)), TypeError, "out"),
    (lambda c: c.update(max_q_len=4.0), TypeError, "max_q_len"),
    (lambda c: c.update(max_q_len=12), ValueError, "max_q_len"),
    (lambda c: c.update(query=c["query"].to("meta")), ValueError, "device"),
]


@pytest.mark.parametrize("mutate,error,words", BAD_INPUTS)
def test_invalid_input_is_rejected_and_changes_nothing(mutate, error, words):
    case = small_case()
    out = case["out"]
    mutate(case)
    with pytest.raises(error, match=words):
        paged_prefill_attention(**case)
    assert (out == 7.0).all(), "a rejected call wrote to the output"


def test_empty_batch_returns_empty_output():
    case = make_case([], num_heads=2, num_kv_heads=1, head_dim=16)
    case["block_tables"] = torch.zeros(0, 1, dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(**case)
    assert out.shape == (0, 2, 16)


@pytest.mark.parametrize("warps,max_registers", [(8, None), (4, None), (8, 128)])
def test_kernel_variants(warps, max_registers):
    """The variants the benchmark measures (8 warps = 128 query rows per block, 4 warps = 64; a register cap
    that lets two 8-warp blocks share an SM) compute the same function."""
    from pagedattention.kernels.paged_prefill import launch_prefill

    specs = [(150, 140)] if SIM else [(3000, 2000), (700, 5)]
    case = make_case(specs, num_heads=1 if SIM else 4, num_kv_heads=1, head_dim=16 if SIM else 64)
    out = torch.full_like(case["query"], float("nan"))
    launch_prefill(**case, out=out, scale=16 ** -0.5 if SIM else 64 ** -0.5, max_q_len=max(q for _, q in specs),
                   warps=warps, max_registers=max_registers)
    assert_close(out, reference(case), torch.float16)
