"""The fused per-layer kernels (RoPE + KV-cache write, residual add + RMSNorm, SwiGLU) against their definitions.

Each definition is written out here in float64 from the same (rounded) inputs, independent of the library's
torch references; the references are the CPU backend, so they are held to the same definitions too. The kernels
compute in float32 and round once, so the tolerances are about half a step of the output dtype (relative
2^-11 for fp16, 2^-8 for bf16) and a few float32 roundings for fp32.

Outputs and caches are poisoned with NaN before each call, so an element the kernel fails to write (or writes
where it should not) cannot go unnoticed. Under Numba's CUDA simulator (no GPU) every simulated thread is a
Python thread: launches stay at a few blocks and tensors are small.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedattention.kernels.layer_ops import add_rms_norm_, rope_item_words, rope_write_kv, silu_and_mul
from pagedattention.kernels.reference import (reference_add_rms_norm_, reference_rope_write_kv,
                                              reference_silu_and_mul)
from pagedattention.kernels.runtime import simulator_enabled

SIM = simulator_enabled()
DEVICE = "cpu" if SIM else "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (rtol, atol): one rounding to the output dtype (half a step: 2^-11 fp16, 2^-8 bf16), with a 2x margin; for
# fp32 a few float32 roundings (and, for RMSNorm, a sum of squares over the row).
TOLERANCE = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3), torch.float32: (2e-6, 2e-6)}
ROPE_THETA = 10000.0


def check_close(got, expected):
    assert not torch.isnan(got).any(), "NaN in the output: an element was not written"
    rtol, atol = TOLERANCE[got.dtype]
    torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)


def bits(t):
    """The tensor's raw bits, for bit-exact comparisons (-0.0 != 0.0, NaN == NaN)."""
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------------------------
# rope_write_kv
# ---------------------------------------------------------------------------------------------------------------


def rope_angles(positions, head_dim):
    """float32 cos/sin ``[n, D/2]`` of ``position * inv_freq`` (computed in float64, rounded once); the kernel and
    the oracle both use these float32 values."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.as_tensor(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def rope_oracle(x, cos, sin):
    """RoPE in float64, "rotate-half" layout: dim i of each head pairs with dim i + D/2, at angle i."""
    x = x.double().cpu()
    c, s = cos.double().cpu()[:, None, :], sin.double().cpu()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def make_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen, layout):
    """query/key/value ``[n, heads, D]``: views of one fused qkv projection (as the model splits it: rows
    strided by the whole qkv width), three separate contiguous tensors, or ("strided") slices of three wider
    tensors, so that each of q, k, v has a row stride of its own, or ("offset") slices starting 2 elements into
    rows of their own (off the 16-byte boundaries: the kernel then moves 32-bit words)."""
    if layout == "offset":
        views = []
        for heads in (num_heads, num_kv_heads, num_kv_heads):
            wide = randn((num_tokens, heads * head_dim + 2), dtype, gen)
            views.append(wide[:, 2:].view(num_tokens, heads, head_dim))
        return tuple(views)
    if layout == "strided":
        views = []
        for extra, heads in enumerate((num_heads, num_kv_heads, num_kv_heads), start=1):
            wide = randn((num_tokens, (heads + extra) * head_dim), dtype, gen)
            views.append(wide[:, extra * head_dim:].view(num_tokens, heads, head_dim))
        return tuple(views)
    if layout == "fused":
        qkv = randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), dtype, gen)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q = q.view(num_tokens, num_heads, head_dim)
        k = k.view(num_tokens, num_kv_heads, head_dim)
        v = v.view(num_tokens, num_kv_heads, head_dim)
        assert not q.is_contiguous() or num_tokens == 1
        return q, k, v
    return (randn((num_tokens, num_heads, head_dim), dtype, gen),
            randn((num_tokens, num_kv_heads, head_dim), dtype, gen),
            randn((num_tokens, num_kv_heads, head_dim), dtype, gen))


def poisoned_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.full(shape, float("nan"), dtype=dtype, device=DEVICE),
            torch.full(shape, float("nan"), dtype=dtype, device=DEVICE))


def check_rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slots, rotated_q):
    """``rotated_q`` is RoPE(query); the rotated key and the value (bit for bit) are at each slot >= 0 and every
    other cache row is still NaN."""
    check_close(rotated_q, rope_oracle(query, cos, sin))
    expected_k = rope_oracle(key, cos, sin)
    k_rows = key_cache.view(-1, *key_cache.shape[2:])
    v_rows = value_cache.view(-1, *value_cache.shape[2:])
    written = torch.zeros(k_rows.shape[0], dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written[slot] = True
        check_close(k_rows[slot], expected_k[t])
        assert torch.equal(bits(v_rows[slot]), bits(value[t])), f"value of token {t} not copied exactly"
    assert torch.isnan(k_rows[~written.to(k_rows.device)]).all(), "a key cache row outside slot_mapping was written"
    assert torch.isnan(v_rows[~written.to(v_rows.device)]).all(), "a value cache row outside slot_mapping was written"


def run_rope_case(dtype, num_heads, num_kv_heads, head_dim, block_size, num_blocks, slots, positions, layout,
                  use_out, seed):
    gen = torch.Generator().manual_seed(seed)
    n = len(slots)
    query, key, value = make_qkv(n, num_heads, num_kv_heads, head_dim, dtype, gen, layout)
    before = [t.clone() for t in (query, key, value)]
    cos, sin = rope_angles(positions, head_dim)
    key_cache, value_cache = poisoned_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    out = torch.full((n, num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE) if use_out else None
    result = rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping, out=out)
    if use_out:
        assert result is out
    assert result.shape == (n, num_heads, head_dim) and result.dtype == dtype and result.is_contiguous()
    for t, b in zip((query, key, value), before):
        assert torch.equal(bits(t), bits(b)), "an input was modified"
    check_rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping, result)
    return query, key, value, cos, sin, key_cache, value_cache, slot_mapping, result


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (6, 1, 32), (2, 2, 64)])
@pytest.mark.parametrize("layout", ["fused", "separate", "strided", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_rotates_and_stores_at_the_slots(dtype, layout, num_heads, num_kv_heads, head_dim):
    """GQA groups of 2, 6 and 1; q/k/v as slices of a fused qkv row, as their own tensors, with row strides
    of their own or off 16-byte boundaries; one token with no slot (-1); positions from 0 (no rotation) to far
    out; the result in a given ``out`` or a fresh tensor."""
    run_rope_case(dtype, num_heads, num_kv_heads, head_dim, block_size=8, num_blocks=3, slots=[13, -1, 0],
                  positions=[0, 7, 4093], layout=layout, use_out=layout != "separate", seed=head_dim + num_heads)


@st.composite
def rope_problem(draw):
    dtype = draw(st.sampled_from(DTYPES))
    num_heads, num_kv_heads = draw(st.sampled_from([(1, 1), (2, 2), (4, 2), (6, 1), (4, 1), (8, 2)]))
    head_dim = draw(st.sampled_from((16, 32, 64)))
    block_size = draw(st.sampled_from((8, 16)))
    num_blocks = draw(st.integers(1, 3))
    num_tokens = draw(st.integers(1, 5))  # one simulated block per token
    slots = draw(st.lists(st.integers(0, num_blocks * block_size - 1), min_size=num_tokens, max_size=num_tokens,
                          unique=True))
    skipped = draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens))
    slots = [-1 if skip else slot for slot, skip in zip(slots, skipped)]
    positions = draw(st.lists(st.integers(0, 32767), min_size=num_tokens, max_size=num_tokens))
    layout = draw(st.sampled_from(("fused", "separate", "strided", "offset")))
    use_out = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, num_heads, num_kv_heads, head_dim, block_size, num_blocks, slots, positions, layout, use_out, seed


@settings(deadline=None)
@given(problem=rope_problem())
def test_rope_write_kv_matches_definition(problem):
    run_rope_case(*problem)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_kernel_agrees_with_the_torch_reference(dtype):
    """The torch reference (the CPU backend) computes the same definition, and the kernel agrees with it."""
    query, key, value, cos, sin, key_cache, value_cache, slot_mapping, rotated = run_rope_case(
        dtype, 4, 2, 32, block_size=8, num_blocks=2, slots=[3, -1, 15, 8], positions=[1, 2, 300, 9000],
        layout="fused", use_out=False, seed=17)
    ref_k, ref_v = poisoned_cache(2, 8, 2, 32, dtype)
    ref_q = reference_rope_write_kv(query, key, value, cos, sin, ref_k, ref_v, slot_mapping)
    assert ref_q.dtype == dtype
    check_rope_write_kv(query, key, value, cos, sin, ref_k, ref_v, slot_mapping, ref_q)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(rotated, ref_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(key_cache, ref_k, rtol=rtol, atol=atol, equal_nan=True)
    assert torch.equal(bits(value_cache), bits(ref_v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (6, 1, 64)])
def test_reference_rope_write_kv_matches_definition(dtype, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    query, key, value = make_qkv(5, num_heads, num_kv_heads, head_dim, dtype, gen, "fused")
    cos, sin = rope_angles([0, 1, 100, 5000, 32767], head_dim)
    key_cache, value_cache = poisoned_cache(2, 16, num_kv_heads, head_dim, dtype)
    slots = torch.tensor([31, 0, -1, 17, 2], device=DEVICE)
    rotated = reference_rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slots)
    check_rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slots, rotated)


@pytest.mark.parametrize("layout,head_dim,words", [("fused", 64, 4), ("strided", 16, 4), ("separate", 32, 4),
                                                   ("offset", 64, 1), ("offset", 16, 1)])
def test_rope_moves_16_byte_items_only_where_every_row_allows_them(layout, head_dim, words):
    """The cases above cover both of the kernel's item sizes: 16-byte items where every row and half head
    starts on a 16-byte boundary (the model's qkv slices), 32-bit words elsewhere."""
    gen = torch.Generator().manual_seed(1)
    query, key, value = make_qkv(3, 4, 2, head_dim, torch.bfloat16, gen, layout)
    cos, sin = rope_angles([1, 2, 3], head_dim)
    key_cache, value_cache = poisoned_cache(2, 8, 2, head_dim, torch.bfloat16)
    out = torch.empty(3, 4, head_dim, dtype=torch.bfloat16, device=DEVICE)
    assert rope_item_words(query, key, value, cos, sin, key_cache, value_cache, out) == words


def test_rope_write_kv_skips_slots_past_the_cache():
    """A slot beyond the cache (like -1) stores nothing: the memory right after the cache is untouched."""
    gen = torch.Generator().manual_seed(5)
    num_kv_heads, head_dim, block_size = 2, 16, 8
    backing_k, backing_v = poisoned_cache(3, block_size, num_kv_heads, head_dim, torch.float16)
    key_cache, value_cache = backing_k[:2], backing_v[:2]  # the cache is 2 blocks; a third lies right after it
    query, key, value = make_qkv(3, 2, num_kv_heads, head_dim, torch.float16, gen, "separate")
    cos, sin = rope_angles([4, 5, 6], head_dim)
    slots = torch.tensor([2 * block_size, -7, 5], device=DEVICE)  # one past the end, another negative, a real one
    rotated = rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slots)
    assert torch.isnan(backing_k[2]).all() and torch.isnan(backing_v[2]).all()
    check_rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, torch.tensor([-1, -1, 5]), rotated)


def test_rope_write_kv_no_tokens():
    key_cache, value_cache = poisoned_cache(1, 8, 1, 16, torch.float16)
    empty = torch.empty(0, 1, 16, dtype=torch.float16, device=DEVICE)
    cos = torch.empty(0, 8, device=DEVICE)
    out = rope_write_kv(empty, empty, empty, cos, cos, key_cache, value_cache,
                        torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert out.shape == (0, 1, 16)
    assert torch.isnan(key_cache).all() and torch.isnan(value_cache).all()


def _valid_rope_args():
    gen = torch.Generator().manual_seed(9)
    query, key, value = make_qkv(3, 4, 2, 16, torch.float16, gen, "fused")
    cos, sin = rope_angles([1, 2, 3], 16)
    key_cache, value_cache = poisoned_cache(2, 8, 2, 16, torch.float16)
    slots = torch.tensor([0, 5, 9], device=DEVICE)
    return dict(query=query, key=key, value=value, cos=cos, sin=sin, key_cache=key_cache, value_cache=value_cache,
                slot_mapping=slots)


BAD_ROPE = [  # (argument, corruption, error, message pattern)
    ("query", lambda a: a["query"].float(), TypeError, "^query"),                     # dtype unlike the caches
    ("key", lambda a: a["key"].bfloat16(), TypeError, "^key must have dtype"),
    ("value", lambda a: a["value"].float(), TypeError, "^value must have dtype"),
    ("query", lambda a: a["query"][:, :3], ValueError, "^query num_heads"),           # not whole GQA groups
    ("query", lambda a: a["query"][:2], ValueError, "^key must be"),                  # token counts disagree
    ("query", lambda a: a["query"][..., :8], ValueError, "^query must be"),           # head_dim unlike the cache
    ("query", lambda a: a["query"].reshape(3, 64), ValueError, "^query must be 3-D"),
    ("key", lambda a: a["key"][:, :1], ValueError, "^key must be"),                   # num_kv_heads unlike the cache
    ("value", lambda a: a["value"][:2], ValueError, "^value must be"),
    ("key", lambda a: a["key"].transpose(1, 2).contiguous().transpose(1, 2), ValueError,
     "^key must have dense"),                                                         # dims not adjacent
    ("value", lambda a: torch.cat([a["value"]] * 2, -1)[..., :16], ValueError,
     "^value must have dense"),                                                       # heads not adjacent
    ("query", lambda a: [1, 2, 3], TypeError, "^query must be a torch.Tensor"),
    ("cos", lambda a: a["cos"][:, :4].contiguous(), ValueError, "^cos must be"),
    ("cos", lambda a: a["cos"].double(), TypeError, "^cos must have dtype"),
    ("sin", lambda a: a["sin"].half(), TypeError, "^sin must have dtype"),
    ("sin", lambda a: a["sin"][:2], ValueError, "^sin must be"),
    ("sin", lambda a: a["sin"].t().contiguous().t(), ValueError, "^sin must be contiguous"),
    ("slot_mapping", lambda a: a["slot_mapping"].int(), TypeError, "^slot_mapping must have dtype"),
    ("slot_mapping", lambda a: a["slot_mapping"][:2], ValueError, "^slot_mapping must have num_tokens"),
    ("slot_mapping", lambda a: a["slot_mapping"][None], ValueError, "^slot_mapping must be 1-D"),
    # head_dim 12 is not a multiple of 4 (the rotation moves pairs with their partners); the cache check, which
    # allows powers of two 16..256 only, rejects it first
    ("key_cache", lambda a: {c: a[c][..., :12].contiguous() for c in ("key_cache", "value_cache")}, ValueError,
     "^key_cache head_dim"),
    ("key_cache", lambda a: {c: a[c][:, :6].contiguous() for c in ("key_cache", "value_cache")}, ValueError,
     "^key_cache block_size"),
    ("key_cache", lambda a: a["key_cache"][..., :8].contiguous(), ValueError, "^value_cache shape"),
    ("value_cache", lambda a: a["value_cache"][:1].contiguous(), ValueError, "^value_cache shape"),
    ("value_cache", lambda a: a["value_cache"].float(), TypeError, "^value_cache dtype"),
]


@pytest.mark.parametrize("name,corrupt,error,pattern", BAD_ROPE)
def test_rope_write_kv_rejects_bad_arguments(name, corrupt, error, pattern):
    """Each bad argument raises an error naming it, and nothing is written: the caches and ``out`` stay NaN, the
    inputs unchanged."""
    args = _valid_rope_args()
    original = dict(args)
    inputs = {k: args[k].clone() for k in ("query", "key", "value")}
    change = corrupt(args)
    args.update(change if isinstance(change, dict) else {name: change})
    out = torch.full((3, 4, 16), float("nan"), dtype=torch.float16, device=DEVICE)
    with pytest.raises(error, match=pattern):
        rope_write_kv(**args, out=out)
    for k in ("key_cache", "value_cache"):
        assert torch.isnan(original[k]).all(), f"{k} written despite the error"
    for k, t in inputs.items():
        assert torch.equal(bits(original[k]), bits(t)), f"{k} changed despite the error"
    assert torch.isnan(out).all()


@pytest.mark.parametrize("out,error,pattern", [
    (torch.empty(3, 4, 8, dtype=torch.float16), ValueError, "^out must be"),
    (torch.empty(3, 4, 16, dtype=torch.float32), TypeError, "^out must have dtype"),
    (torch.empty(3, 16, 4, dtype=torch.float16).transpose(1, 2), ValueError, "^out must be contiguous"),
])
def test_rope_write_kv_rejects_bad_out(out, error, pattern):
    args = _valid_rope_args()
    with pytest.raises(error, match=pattern):
        rope_write_kv(**args, out=out.to(DEVICE))
    assert torch.isnan(args["key_cache"]).all() and torch.isnan(args["value_cache"]).all()


# ---------------------------------------------------------------------------------------------------------------
# add_rms_norm_
# ---------------------------------------------------------------------------------------------------------------


def add_rms_norm_oracle(x, residual, weight, eps):
    """``(rms_norm(s) * weight, s)`` for ``s = x + residual`` rounded to the dtype (the stored residual); the norm
    in float64 from that rounded sum."""
    s = (x.double() + residual.double()).to(x.dtype).double().cpu()
    normed = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double().cpu()
    return normed, s


def run_norm_case(dtype, num_tokens, hidden, eps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (randn((num_tokens, hidden), torch.float32, gen) * scale).to(dtype)
    residual = (randn((num_tokens, hidden), torch.float32, gen) * scale).to(dtype)
    weight = randn((hidden,), dtype, gen)
    expected_x, expected_residual = add_rms_norm_oracle(x, residual, weight, eps)
    x_ptr, r_ptr, w_before = x.data_ptr(), residual.data_ptr(), weight.clone()
    got_x, got_residual = add_rms_norm_(x, residual, weight, eps)
    assert got_x is x and got_residual is residual
    assert x.data_ptr() == x_ptr and residual.data_ptr() == r_ptr          # in place
    assert torch.equal(bits(weight), bits(w_before))
    check_close(residual, expected_residual)
    check_close(x, expected_x)
    return x, residual, expected_x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 2), (2, 64), (1, 96), (1, 256), (3, 1000), (2, 1100)])
def test_add_rms_norm_matches_definition(dtype, num_tokens, hidden):
    """A block has the power of two >= the row's items in [32, 1024] threads. 16-bit rows of 64, 96, 256 and
    1,000 values split into 16-byte items (8, 12, 32, 125 of them: whole warps idle, or part of one); rows of 2
    and 1,100 (2,200 bytes) do not and move one word per item (1 and 550 items). fp32 rows of 2 move words too."""
    run_norm_case(dtype, num_tokens, hidden, eps=1e-6, seed=hidden)


@pytest.mark.parametrize("dtype,hidden", [(torch.bfloat16, 1000), (torch.float32, 1100), (torch.float16, 1100)])
def test_add_rms_norm_rows_longer_than_the_block(monkeypatch, dtype, hidden):
    """With 32 threads a block, each thread loops over several items (125 16-byte items, 275 of fp32, 550 words
    of a row that does not split into 16-byte items): only its first stays in registers across the barrier."""
    from pagedattention.kernels import layer_ops
    monkeypatch.setattr(layer_ops, "NORM_THREADS", 32)
    run_norm_case(dtype, 2, hidden, eps=1e-6, seed=hidden + 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_off_16_byte_alignment_move_words(dtype):
    """Tensors 4 bytes past a 16-byte boundary (rows of whole 16-byte items otherwise) take the one-word items:
    16-byte loads there would fault on a GPU."""
    gen = torch.Generator().manual_seed(5)
    elems = 4 // torch.tensor([], dtype=dtype).element_size()  # 4 bytes in

    def shifted(shape):
        n = shape[0] * shape[1]
        return randn((n + elems,), dtype, gen)[elems:].view(shape)
    x, residual = shifted((2, 64)), shifted((2, 64))
    weight = shifted((1, 64))[0]
    assert x.data_ptr() % 16 == 4
    expected_x, expected_residual = add_rms_norm_oracle(x, residual, weight, 1e-6)
    add_rms_norm_(x, residual, weight, 1e-6)
    check_close(residual, expected_residual)
    check_close(x, expected_x)
    gate_up = shifted((3, 32))
    check_close(silu_and_mul(gate_up), silu_and_mul_oracle(gate_up))


def test_add_rms_norm_eps_counts():
    """Inputs of ~1e-4 give a mean square of ~1e-8, far below eps = 1e-2: the row is scaled by ~1/sqrt(eps) = 10,
    not normalised to RMS 1 as it would be without eps."""
    x, residual, expected = run_norm_case(torch.float32, 1, 64, eps=1e-2, seed=3, scale=1e-4)
    torch.testing.assert_close(x.double().cpu(), expected, rtol=1e-5, atol=0)  # tight relative to the tiny values
    assert x.abs().max() < 1e-2
    assert (residual.double().pow(2).mean() / 1e-2) < 1e-4  # eps dominates the denominator


def test_reference_add_rms_norm_matches_definition():
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(7)
        x, residual = randn((3, 200), dtype, gen), randn((3, 200), dtype, gen)
        weight = randn((200,), dtype, gen)
        expected_x, expected_residual = add_rms_norm_oracle(x, residual, weight, 1e-5)
        got_x, got_residual = reference_add_rms_norm_(x, residual, weight, 1e-5)
        assert got_x is x and got_residual is residual
        check_close(residual, expected_residual)
        check_close(x, expected_x)


def test_add_rms_norm_no_tokens():
    x = torch.empty(0, 64, device=DEVICE)
    assert add_rms_norm_(x, x.clone(), torch.ones(64, device=DEVICE), 1e-6)[0] is x


def _valid_norm_args():
    gen = torch.Generator().manual_seed(11)
    return dict(x=randn((2, 64), torch.float16, gen), residual=randn((2, 64), torch.float16, gen),
                weight=randn((64,), torch.float16, gen), eps=1e-6)


BAD_NORM = [
    ("x", lambda a: a["x"].int(), TypeError, "^x must have one of the dtypes"),
    ("x", lambda a: a["x"].reshape(128), ValueError, "^x must be 2-D"),
    ("x", lambda a: a["x"].t().contiguous().t(), ValueError, "^x must be contiguous"),
    ("residual", lambda a: a["residual"].float(), TypeError, "^residual must have dtype"),
    ("residual", lambda a: a["residual"][:1], ValueError, "^residual must be"),
    ("residual", lambda a: torch.cat([a["residual"]] * 2, -1)[:, :64], ValueError, "^residual must be contiguous"),
    ("weight", lambda a: a["weight"].bfloat16(), TypeError, "^weight must have dtype"),
    ("weight", lambda a: a["weight"][:32], ValueError, r"^weight must be \[64\]"),
    ("weight", lambda a: a["weight"][None], ValueError, "^weight must be 1-D"),
    ("eps", lambda a: 0.0, ValueError, "^eps must be positive"),
    ("eps", lambda a: float("nan"), ValueError, "^eps must be positive"),
]


@pytest.mark.parametrize("name,corrupt,error,pattern", BAD_NORM)
def test_add_rms_norm_rejects_bad_arguments(name, corrupt, error, pattern):
    args = _valid_norm_args()
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    original = dict(args)
    args[name] = corrupt(args)
    with pytest.raises(error, match=pattern):
        add_rms_norm_(**args)
    for k, t in before.items():
        assert torch.equal(bits(original[k]), bits(t)), f"{k} changed despite the error"


def test_add_rms_norm_rejects_odd_hidden():
    gen = torch.Generator().manual_seed(12)
    x, residual = randn((2, 63), torch.float32, gen), randn((2, 63), torch.float32, gen)
    weight = randn((63,), torch.float32, gen)
    before = x.clone(), residual.clone()
    with pytest.raises(ValueError, match="hidden size must be even"):
        add_rms_norm_(x, residual, weight, 1e-6)
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])


# ---------------------------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------------------------


def silu_and_mul_oracle(gate_up):
    gate, up = gate_up.double().cpu().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,size,use_out", [(1, 2, False), (3, 130, True), (2, 300, False),
                                                     (1, 1000, True)])
def test_silu_and_mul_matches_definition(dtype, num_tokens, size, use_out):
    """Rows of 2, 130, 300 and 1,000 outputs. 16-bit: 1, 65 and 150 one-word items (rows not made of whole 16-byte
    items), then 125 16-byte items; fp32: 2 and 130 words, then 75 and 250 16-byte items. Fewer than the block's
    128 threads, and more but not a multiple."""
    gen = torch.Generator().manual_seed(size)
    gate_up = randn((num_tokens, 2 * size), torch.float32, gen)
    gate_up[0, :4] = torch.tensor([-30.0, -8.0, 8.0, 30.0])  # saturated gates: silu ~ 0 and silu ~ identity
    gate_up = gate_up.to(dtype)
    before = gate_up.clone()
    out = torch.full((num_tokens, size), float("nan"), dtype=dtype, device=DEVICE) if use_out else None
    result = silu_and_mul(gate_up, out=out)
    if use_out:
        assert result is out
    assert result.shape == (num_tokens, size) and result.dtype == dtype
    assert torch.equal(bits(gate_up), bits(before))
    check_close(result, silu_and_mul_oracle(gate_up))


def test_reference_silu_and_mul_matches_definition():
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(13)
        gate_up = randn((3, 2 * 100), dtype, gen)
        check_close(reference_silu_and_mul(gate_up), silu_and_mul_oracle(gate_up))


def test_silu_and_mul_no_tokens():
    assert silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)


@pytest.mark.parametrize("gate_up,out,error,pattern", [
    (torch.ones(2, 8, dtype=torch.int32), None, TypeError, "^gate_up must have one of the dtypes"),
    (torch.ones(16), None, ValueError, "^gate_up must be 2-D"),
    (torch.ones(2, 6), None, ValueError, "^gate_up's last dim"),                    # size 3: odd
    (torch.ones(2, 7), None, ValueError, "^gate_up's last dim"),                    # width odd
    (torch.ones(8, 2).t(), None, ValueError, "^gate_up must be contiguous"),
    (torch.ones(2, 8), torch.full((2, 8), float("nan")), ValueError, "^out must be"),
    (torch.ones(2, 8), torch.full((2, 4), float("nan"), dtype=torch.float16), TypeError, "^out must have dtype"),
    (torch.ones(2, 8), torch.full((4, 2), float("nan")).t(), ValueError, "^out must be contiguous"),
])
def test_silu_and_mul_rejects_bad_arguments(gate_up, out, error, pattern):
    out = out if out is None else out.to(DEVICE)
    with pytest.raises(error, match=pattern):
        silu_and_mul(gate_up.to(DEVICE), out=out)
    assert out is None or torch.isnan(out).all()


# ---------------------------------------------------------------------------------------------------------------
# Alignment: the kernels move 32-bit words, so 16-bit tensors must start on a 4-byte boundary.
# ---------------------------------------------------------------------------------------------------------------


def _misaligned(shape, dtype=torch.float16):
    """A contiguous view starting one 2-byte element past an aligned allocation."""
    numel = 1
    for s in shape:
        numel *= s
    return torch.randn(numel + 1).to(dtype).to(DEVICE)[1:].view(shape)


@pytest.mark.parametrize("kernel", ["add_rms_norm_", "silu_and_mul", "rope_write_kv"])
def test_misaligned_16_bit_views_are_rejected(kernel):
    if kernel == "add_rms_norm_":
        with pytest.raises(ValueError, match="x"):
            add_rms_norm_(_misaligned((1, 64)), torch.ones(1, 64, dtype=torch.float16, device=DEVICE),
                          torch.ones(64, dtype=torch.float16, device=DEVICE), 1e-6)
    elif kernel == "silu_and_mul":
        with pytest.raises(ValueError, match="gate_up"):
            silu_and_mul(_misaligned((1, 8)))
    else:
        args = _valid_rope_args()
        args["query"] = _misaligned((3, 4, 16))
        with pytest.raises(ValueError, match="query"):
            rope_write_kv(**args)
