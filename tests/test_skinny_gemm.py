"""The decode-sized tensor-core GEMM (kernels/skinny_gemm.py) against a float64 matmul of the same inputs."""
import pytest
import torch

from pagedattention.kernels.runtime import kernels_available
from pagedattention.kernels.skinny_gemm import row_groups_per_block, serves, skinny_gemm, tiles_for

pytestmark = pytest.mark.skipif(not kernels_available("cpu"), reason="needs the CUDA simulator")

DTYPES = [torch.bfloat16, torch.float16]


def inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, weight, b


def reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def assert_rounded_from(out: torch.Tensor, ref: torch.Tensor):
    """``out`` is ``ref`` rounded once to out's dtype: within one unit in the last place (float32 accumulation
    may sit on the other side of a rounding boundary), plus float32 summation error near zero."""
    eps = torch.finfo(out.dtype).eps
    err = (out.double() - ref).abs()
    bound = eps * ref.abs() + 1e-4 * ref.abs().max()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst margin {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, row_groups, bias", [
    (1, 16, 32, 1, False),     # one token, one row group, one chunk
    (5, 32, 64, 2, True),      # two row groups in one block, the K split over 4 warps each
    (9, 64, 96, 4, True),      # two n-tiles, four row groups, an odd number of chunks
    (70, 32, 64, 1, False),    # three blocks of 32 tokens, the last with 6
    (3, 64, 288, 4, True),     # 9 chunks over 2 warps: a second round of loads, one chunk in it
    (17, 16, 1280, 1, False),  # 40 chunks over 8 warps: 5 each, three of four n-tiles
])
def test_matches_a_float64_matmul(dtype, m, n, k, row_groups, bias):
    x, weight, b = inputs(m, n, k, dtype, bias, seed=m * 1000 + n + k)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    assert skinny_gemm(x, weight, b, out=out, row_groups=row_groups) is out
    assert_rounded_from(out, reference(x, weight, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_does_not_depend_on_the_other_rows(dtype):
    """Also across kernels compiled for different tile counts (11 rows: two tiles; 3 and 1 rows: one)."""
    x, weight, b = inputs(11, 32, 64, dtype, True, seed=7)
    whole = skinny_gemm(x, weight, b)
    assert torch.equal(skinny_gemm(x[:3].clone(), weight, b), whole[:3])
    assert torch.equal(skinny_gemm(x[5:6].clone(), weight, b), whole[5:6])


@pytest.mark.parametrize("m, tiles", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4), (33, 4), (256, 4)])
def test_a_block_takes_the_fewest_tiles_of_8_tokens_that_hold_the_batch(m, tiles):
    assert tiles_for(m) == tiles


def test_no_rows_give_an_empty_result():
    x, weight, _ = inputs(0, 16, 32, torch.bfloat16, False, seed=1)
    assert skinny_gemm(x, weight).shape == (0, 16)


@pytest.mark.parametrize("n, sms, expected", [
    (9728, 132, 4),   # Qwen2.5-0.5B gate_up: 608 row groups, 152 blocks
    (1152, 132, 1),   # its qkv: 72 row groups, fewer than the SMs already
    (896, 132, 1),
    (128, 1, 8),
    (48, 1, 1),       # 3 row groups: only 1 divides
])
def test_row_groups_per_block_covers_the_sms(n, sms, expected):
    assert row_groups_per_block(n, sms) == expected


@pytest.mark.parametrize("m, n, k, expected", [
    (1, 1152, 896, True), (16, 1152, 896, True),      # Qwen2.5-0.5B qkv: faster than cuBLAS up to 16 rows
    (17, 1152, 896, False), (32, 896, 896, False),    # past 16 rows cuBLAS wins
    (1, 896, 4864, False), (1, 9728, 896, False),     # its down and gate_up: more than 2^22 elements
    (8, 4096, 1024, True), (16, 4096, 1024, False),   # Qwen3-0.6B qkv: 2^22 elements, at most 2^25 / rows
    (16, 1024, 2048, True),                           # its o at 2^21 elements
    (0, 1152, 896, False), (1, 1160, 896, False), (1, 1152, 900, False),  # no rows; N, K the kernel can't take
])
def test_the_engine_uses_the_kernel_where_it_was_measured_faster(m, n, k, expected):
    assert serves(m, n, k) is expected


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {**a, "x": a["x"][:, :16].contiguous(), "weight": a["weight"][:, :16].contiguous()}, ValueError,
     "K .* multiple of 32"),
    (lambda a: {**a, "weight": a["weight"][:8].contiguous()}, ValueError, "N .* multiple of 16"),
    (lambda a: {**a, "weight": a["weight"].half()}, TypeError, "weight must have dtype torch.bfloat16"),
    (lambda a: {**a, "x": a["x"].float(), "weight": a["weight"].float()}, TypeError, "x must have one of"),
    (lambda a: {**a, "weight": a["weight"][:, :32].contiguous()}, ValueError, r"weight must be \[N, 64\]"),
    (lambda a: {**a, "bias": a["bias"][:8]}, ValueError, r"bias must be \[16\]"),
    (lambda a: {**a, "out": torch.empty(3, 8, dtype=torch.bfloat16)}, ValueError, r"out must be \[3, 16\]"),
    (lambda a: {**a, "x": torch.empty(3 * 64 + 1, dtype=torch.bfloat16)[1:].view(3, 64)}, ValueError,
     "x must start on a 16-byte boundary"),
    (lambda a: {**a, "row_groups": 2}, ValueError, "row_groups must be 1, 2, 4 or 8 and divide N / 16 = 1"),
])
def test_bad_arguments_are_refused_and_out_is_untouched(change, error, match):
    x, weight, b = inputs(3, 16, 64, torch.bfloat16, True, seed=3)
    out = torch.full((3, 16), 7.0, dtype=torch.bfloat16)
    args = change({"x": x, "weight": weight, "bias": b, "out": out, "row_groups": None})
    with pytest.raises(error, match=match):
        skinny_gemm(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)
    assert (out == 7.0).all()
