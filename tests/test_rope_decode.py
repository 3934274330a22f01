"""``rope_paged_attention``: a decode step's RoPE, new-token cache write and attention in one call.

It must equal its definition: RoPE of q and k (float64 oracle of test_layer_ops), the rotated k and v stored at
each sequence's slot, then float64 SDPA over the gathered cache (test_correctness). The new token's cache row is
poisoned with NaN beforehand, so attention that reads it before it is written (or a write to the wrong row) shows;
every other cache row must keep its bits. Where the tensor-core kernel serves the shape the call is one fused
launch; elsewhere it falls back to rope_write_kv + the V2 kernel, which must give the same.
"""
from __future__ import annotations

import pytest
import torch

from pagedattention.kernels import decode
from pagedattention.kernels.decode import rope_paged_attention
from pagedattention.kernels.runtime import simulator_enabled
from test_correctness import check_close, make_batch, reference
from test_layer_ops import bits, make_qkv, rope_angles, rope_oracle
from test_layer_ops import check_close as check_rounded

SIM = simulator_enabled()
DEVICE = "cpu" if SIM else "cuda"

CASES = [  # (group, num_kv_heads, context lens, dtype, block size, partition size, head_dim, qkv layout, fused)
    (7, 1, [37, 150], torch.bfloat16, 16, 64, 64, "fused", True),       # Qwen2.5-0.5B's group, split
    (7, 1, [150, 16], torch.bfloat16, 16, 256, 64, "contiguous", True), # one partition of 3 tiles; a whole block
    (5, 2, [5, 100], torch.float16, 8, 64, 64, "fused", True),          # two KV heads, block size 8
    (8, 1, [200, 1], torch.float16, 16, 256, 128, "strided", True),     # head_dim 128 (pipelined); one token
    (2, 2, [20, 33], torch.bfloat16, 16, None, 64, "fused", False),     # CUDA cores: rope_write_kv first
]


def slot_of(tables, lens, i, block_size):
    """The cache slot of sequence i's last position."""
    last = int(lens[i]) - 1
    return int(tables[i, last // block_size]) * block_size + last % block_size


@pytest.mark.parametrize("group,num_kv_heads,lens,dtype,block_size,partition_size,head_dim,layout,fused", CASES)
def test_rope_decode_matches_rope_then_attention(group, num_kv_heads, lens, dtype, block_size, partition_size,
                                                 head_dim, layout, fused):
    gen = torch.Generator().manual_seed(group * 31 + len(lens) + head_dim)
    if not SIM:  # full sizes on a GPU
        lens = [n * 20 + 3 for n in lens]
        partition_size = partition_size and partition_size * 8
    num_heads = group * num_kv_heads
    key_cache, value_cache, tables, ctx = make_batch(lens, block_size, num_kv_heads, head_dim, dtype, gen,
                                                     share=False)
    query, key, value = make_qkv(len(lens), num_heads, num_kv_heads, head_dim, dtype, gen, layout)
    cos, sin = rope_angles([n - 1 for n in lens], head_dim)
    slots = [slot_of(tables, ctx, i, block_size) for i in range(len(lens))]
    rows_k = key_cache.view(-1, num_kv_heads, head_dim)
    rows_v = value_cache.view(-1, num_kv_heads, head_dim)
    for slot in slots:  # the new tokens' rows: NaN until the call stores them
        rows_k[slot] = float("nan")
        rows_v[slot] = float("nan")
    before_k, before_v = key_cache.clone(), value_cache.clone()
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    max_context_len = tables.shape[1] * block_size
    plan = decode._plan(query.contiguous(), num_kv_heads, max_context_len, partition_size)
    assert (plan.tensor_cores is not None) == fused

    out = torch.full((len(lens), num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    result = rope_paged_attention(query, key, value, cos, sin, key_cache, value_cache, slot_mapping, tables, ctx,
                                  out=out, max_context_len=max_context_len, partition_size=partition_size)
    assert result is out

    expected_k = rope_oracle(key, cos, sin)
    changed = torch.zeros(rows_k.shape[0], dtype=torch.bool)
    for i, slot in enumerate(slots):
        changed[slot] = True
        check_rounded(rows_k[slot], expected_k[i])
        assert torch.equal(bits(rows_v[slot]), bits(value[i])), f"sequence {i}'s value not stored exactly"
    others = ~changed.to(rows_k.device)
    assert torch.equal(bits(rows_k[others]), bits(before_k.view_as(rows_k)[others])), "another key row changed"
    assert torch.equal(bits(rows_v[others]), bits(before_v.view_as(rows_v)[others])), "another value row changed"
    rotated_q = rope_oracle(query, cos, sin).to(dtype)
    check_close(out.cpu(), reference(rotated_q, key_cache.cpu(), value_cache.cpu(), tables.cpu(), ctx.cpu(),
                                     head_dim ** -0.5))


def test_a_token_without_a_slot_is_not_stored():
    """slot -1 (a row that must not be stored): the cache keeps its bits, attention reads what the cache holds."""
    gen = torch.Generator().manual_seed(5)
    lens, block_size, head_dim, dtype = [40, 9], 16, 64, torch.bfloat16
    key_cache, value_cache, tables, ctx = make_batch(lens, block_size, 1, head_dim, dtype, gen, share=False)
    query, key, value = make_qkv(2, 7, 1, head_dim, dtype, gen, "fused")
    cos, sin = rope_angles([n - 1 for n in lens], head_dim)
    slot = slot_of(tables, ctx, 1, block_size)
    key_cache.view(-1, 1, head_dim)[slot] = float("nan")
    value_cache.view(-1, 1, head_dim)[slot] = float("nan")
    before_k, before_v = key_cache.clone(), value_cache.clone()
    slot_mapping = torch.tensor([-1, slot], dtype=torch.int64, device=DEVICE)
    out = rope_paged_attention(query, key, value, cos, sin, key_cache, value_cache, slot_mapping, tables, ctx,
                               max_context_len=tables.shape[1] * block_size)
    rows = key_cache.view(-1, 1, head_dim)
    assert torch.equal(bits(rows[:slot]), bits(before_k.view_as(rows)[:slot]))
    assert torch.equal(bits(rows[slot + 1:]), bits(before_k.view_as(rows)[slot + 1:]))
    assert torch.equal(bits(value_cache.view(-1, 1, head_dim)[slot]), bits(value[1]))
    rotated_q = rope_oracle(query, cos, sin).to(dtype)
    check_close(out.cpu(), reference(rotated_q, key_cache.cpu(), value_cache.cpu(), tables.cpu(), ctx.cpu(),
                                     head_dim ** -0.5))


def test_rope_decode_rejects_bad_arguments_and_writes_nothing():
    gen = torch.Generator().manual_seed(6)
    key_cache, value_cache, tables, ctx = make_batch([20, 30], 16, 1, 64, torch.bfloat16, gen, share=False)
    query, key, value = make_qkv(2, 7, 1, 64, torch.bfloat16, gen, "fused")
    cos, sin = rope_angles([19, 29], 64)
    slots = torch.tensor([0, 1], dtype=torch.int64, device=DEVICE)
    before = key_cache.clone(), value_cache.clone()
    args = [query, key, value, cos, sin, key_cache, value_cache, slots, tables, ctx]
    for index, bad, error, name in ((3, cos[:, :16], ValueError, "cos"), (0, query.float(), TypeError, "query"),
                                    (7, slots.int(), TypeError, "slot_mapping"),
                                    (8, tables[:1], ValueError, "block_tables")):
        broken = list(args)
        broken[index] = bad
        with pytest.raises(error, match=name):
            rope_paged_attention(*broken, max_context_len=64)
    with pytest.raises(ValueError, match="out"):
        rope_paged_attention(*args, out=torch.empty(2, 7, 32, dtype=torch.bfloat16, device=DEVICE))
    assert torch.equal(bits(key_cache), bits(before[0])) and torch.equal(bits(value_cache), bits(before[1]))
