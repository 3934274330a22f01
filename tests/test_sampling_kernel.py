"""The one-pass sampling kernel (kernels/sampling.py) against torch and a numpy model of its noise.

Greedy rows must be torch.argmax exactly (first index on ties) with log_softmax's log-probability; sampled rows
must be the inverse CDF of softmax(x / T) at the documented uniform of (key, counter), which must make the
draws follow softmax(x / T). bfloat16 and float16 logits must give what their float32 conversion gives, and a
row's token must not depend on how many blocks share it.
Every tensor the kernel fills starts as garbage (``poisoned_empty``), so a value the kernel never wrote shows.
"""
import numpy as np
import pytest
import torch

from pagedattention.kernels.runtime import kernels_available, simulator_enabled

if not kernels_available("cpu" if not torch.cuda.is_available() else "cuda"):
    pytest.skip("the Numba kernels cannot run here", allow_module_level=True)

from pagedattention.kernels import sampling  # noqa: E402
from pagedattention.kernels.sampling import sample_tokens, temperature_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M32 = np.uint64(0xFFFFFFFF)
TWO_BYTE = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty fills float tensors with 1e9: an unwritten token id or log-probability is 1e9, and an
    unwritten split's best column (its bits) lies past every vocabulary, which turns the row's log-probability
    into NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(1e9) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(autouse=True)
def aligned_loads(monkeypatch):
    """Under the simulator (CPU memory, where any address reads), a load must be aligned to its size, as on a
    GPU, where a misaligned one faults."""
    if not simulator_enabled():
        return
    for name, size in (("ld_i32_at", 4), ("ld_u16_at", 2), ("ld_v4_at", 16)):
        def checked(address, load=getattr(sampling, name), size=size):
            assert int(address) % size == 0, f"misaligned {8 * size}-bit load at {int(address):#x}"
            return load(address)
        monkeypatch.setattr(sampling, name, checked)


def fmix32(h):
    h = h.astype(np.uint64)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & M32
    return h ^ (h >> np.uint64(16))


def row_uniform(key: int, counter: int) -> float:
    """The kernel's documented uniform of a row: the top 23 bits k of its hash, (k + 1/2) / 2**23."""
    k, c = np.uint64(key), np.uint64(counter)
    h = fmix32(np.array([k & M32]))
    h = fmix32(h ^ (k >> np.uint64(32)))
    h = fmix32(h ^ (c & M32))
    h = fmix32(h ^ (c >> np.uint64(32)))
    return (float(h[0] >> np.uint64(9)) + 0.5) * 2.0 ** -23


def inverse_cdf(x: np.ndarray, temperature: float, u: float) -> tuple[int, float]:
    """float64 model of a draw: the first column whose cumulative softmax(x / T) weight passes u times the
    total; and how far (relative to the total) the nearest boundary of the cumulative weights is from it."""
    w = np.exp((x - x.max()) / temperature)
    cdf = np.cumsum(w)
    target = u * cdf[-1]
    token = int(np.searchsorted(cdf, target, side="right"))
    return token, float(np.min(np.abs(cdf - target)) / cdf[-1])


def assert_drawn(token: int, x: np.ndarray, temperature: float, key: int, counter: int) -> None:
    """``token`` is the model's draw; a neighbour only when the draw falls within float32 rounding of a
    boundary between two columns."""
    expected, margin = inverse_cdf(x, temperature, row_uniform(key, counter))
    assert token == expected or (margin < 1e-5 and abs(token - expected) == 1), (token, expected, margin)


def run(logits, temperatures, keys, counters):
    params = torch.tensor([keys, counters, temperature_bits(temperatures)], dtype=torch.int64, device=DEVICE)
    out = sample_tokens(logits.to(DEVICE), params).cpu()
    assert out.dtype == torch.float32 and out.shape == (2, len(logits))
    return out[0].long(), out[1]


def test_greedy_rows_are_torch_argmax_with_log_softmax_logprobs():
    gen = torch.Generator().manual_seed(np.random.randint(1 << 30))
    logits = torch.randn(6, 517, generator=gen) * 3
    logits[1, [10, 300]] = logits[1].max() + 1  # a tie: the first column wins, as in torch.argmax
    logits[2, :100] = float("-inf")             # masked tokens
    tokens, logprobs = run(logits, [0.0] * 6, [1] * 6, [0] * 6)
    assert tokens.tolist() == logits.argmax(dim=1).tolist() and tokens[1] == 10
    expected = torch.log_softmax(logits.double(), dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=1e-5)


def test_sampled_rows_are_the_inverse_cdf_of_the_documented_uniform():
    rng = np.random.default_rng()
    logits = torch.tensor(rng.normal(size=(5, 301)) * 2, dtype=torch.float32)
    temperatures = [0.7, 1.0, 1.5, 0.3, 2.0]
    keys = rng.integers(0, 1 << 62, size=5).tolist()
    counters = rng.integers(0, 1 << 40, size=5).tolist()
    tokens, logprobs = run(logits, temperatures, keys, counters)
    x = logits.double().numpy()
    for row in range(5):
        assert_drawn(int(tokens[row]), x[row], temperatures[row], keys[row], counters[row])
    expected = torch.log_softmax(logits.double(), dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=1e-5)


def test_no_draw_lands_on_a_masked_column():
    """Whatever the uniform (eight keys), the draw is a column of positive weight: masked columns lie first,
    last and between the live ones, where rounding at the end of the cumulative weights would land."""
    logits = torch.full((8, 64), float("-inf"))
    live = [5, 6, 30, 61]
    logits[:, live] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    tokens, logprobs = run(logits, [1.0] * 8, list(range(100, 108)), [0] * 8)
    assert set(tokens.tolist()) <= set(live) and torch.isfinite(logprobs).all()


def test_the_draws_follow_softmax_over_temperature():
    """Chi-square of 40,000 draws (the numpy model of the kernel's draw, which the test above ties to the
    kernel) against softmax(x / T)."""
    rng = np.random.default_rng(0)
    x, t, n = rng.normal(size=8), 0.8, 40_000
    draws = np.array([inverse_cdf(x, t, row_uniform(7, c))[0] for c in range(n)])
    expected = np.exp(x / t) / np.exp(x / t).sum() * n
    chi2 = (((np.bincount(draws, minlength=8) - expected) ** 2) / expected).sum()
    assert chi2 < 24.3  # the 0.999 quantile of chi-square with 7 degrees of freedom


def test_a_row_depends_on_its_key_and_counter_only():
    logits = torch.randn(3, 64)
    row = logits[1:2].repeat(3, 1)
    a, _ = run(row, [1.0] * 3, [5, 5, 6], [9, 9, 9])
    b, _ = run(torch.cat([logits[:1], row[:1]]), [1.0, 1.0], [1, 5], [0, 9])
    assert a[0] == a[1] == b[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_blocks_that_share_it(dtype):
    """2,100 columns are three segments of 1,024 (the last one short): one, two or three blocks per row give the
    same tokens and log-probabilities, bit for bit."""
    gen = torch.Generator().manual_seed(np.random.randint(1 << 30))
    logits = (torch.randn(2, 2100, generator=gen) * 3).to(dtype).to(DEVICE)
    params = torch.tensor([[3, 4], [1, 2], temperature_bits([0.9, 0.0])], dtype=torch.int64, device=DEVICE)
    outs = [sample_tokens(logits, params, splits=n).cpu() for n in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_drawn(int(outs[0][0, 0]), logits[0].double().cpu().numpy(), 0.9, 3, 1)
    assert outs[0][0, 1] == logits[1].float().argmax()


def test_non_finite_rows_get_nan_logprobs_and_masked_tokens_are_never_drawn():
    logits = torch.randn(4, 40)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    logits[3, 1:] = float("-inf")  # one token left: any temperature draws it
    _, logprobs = run(logits[:3], [1.0, 0.0, 1.0], [1, 2, 3], [0, 0, 0])
    assert torch.isnan(logprobs).all()
    tokens, logprobs = run(logits[3:], [1.3], [4], [0])
    assert tokens.tolist() == [0] and abs(logprobs.item()) < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_logit_shows_at_any_place_of_a_unit(bad):
    """The scan does not test each logit: a NaN or +inf at any of a unit's 8 columns, in a lane's first unit
    (columns 8 lane ..) or a later one (256 + 8 lane ..), must still make the row's log-probability NaN; -inf
    is an ordinary masked logit."""
    logits = torch.randn(8, 300) * 2
    for row in range(8):
        logits[row, row + (256 if row % 2 else 8 * (row % 3))] = bad
        logits[row, (row + 3) % 24] = float("-inf")
    tokens, logprobs = run(logits, [0.0, 0.8] * 4, list(range(8)), [0] * 8)
    assert torch.isnan(logprobs).all() and (tokens == 0).all()
    logits[logits.isnan() | (logits == float("inf"))] = 1.0
    _, logprobs = run(logits, [0.0, 0.8] * 4, list(range(8)), [0] * 8)
    assert torch.isfinite(logprobs).all()


def two_byte_logits(rows: int, vocab: int, dtype, offset: int, gen) -> torch.Tensor:
    """Random [rows, vocab] logits of ``dtype`` starting ``offset`` elements into their storage: with offset 1
    (and 4-byte aligned storage) row 0 starts halfway into a 32-bit word; with an odd vocab every other row does."""
    flat = (torch.randn(rows * vocab + offset, generator=gen) * 3).to(dtype).to(DEVICE)
    logits = flat[offset:].view(rows, vocab)
    assert logits.data_ptr() % 4 == 2 * (offset % 2)
    return logits


@pytest.mark.parametrize("dtype", TWO_BYTE)
@pytest.mark.parametrize("vocab, offset", [(301, 0), (256, 1), (3, 1), (1, 0), (1001, 1), (1200, 0)])
def test_two_byte_logits_give_what_their_float32_conversion_gives(dtype, vocab, offset):
    """Offset 1 (rows not 16-byte aligned) reads column by column, offset 0 with 1,200 (and 256) columns in
    16-byte loads; the float32 conversion is aligned. The order of the sums is the same either way."""
    gen = torch.Generator().manual_seed(np.random.randint(1 << 30))
    rng = np.random.default_rng(np.random.randint(1 << 30))
    logits = two_byte_logits(4, vocab, dtype, offset, gen)
    if vocab > 3:  # a tie across splits and word halves, in a greedy row: the first column wins
        logits[0, [2, vocab - 1]] = logits[0].max() + 1
        logits[2, :vocab // 3] = float("-inf")
    temperatures = [0.0, 0.7, 0.0, 1.5]
    keys = rng.integers(0, 1 << 62, size=4).tolist()
    counters = rng.integers(0, 1 << 40, size=4).tolist()
    tokens, logprobs = run(logits, temperatures, keys, counters)
    tokens32, logprobs32 = run(logits.float(), temperatures, keys, counters)
    assert tokens.tolist() == tokens32.tolist()
    torch.testing.assert_close(logprobs, logprobs32, atol=1e-5, rtol=1e-5)
    x = logits.double().cpu()
    assert tokens[[0, 2]].tolist() == x[[0, 2]].argmax(dim=1).tolist()
    if vocab > 3:
        assert tokens[0] == 2
    for row in (1, 3):
        assert_drawn(int(tokens[row]), x[row].numpy(), temperatures[row], keys[row], counters[row])
    expected = torch.log_softmax(x, dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", TWO_BYTE)
def test_two_byte_non_finite_rows_get_nan_logprobs_as_in_float32(dtype):
    """The bad values sit where a row's first or last word holds one of its columns only (vocab 41: rows 1 and
    3 start halfway into a word, rows 0 and 2 end halfway into one) and in a word of two columns."""
    gen = torch.Generator().manual_seed(np.random.randint(1 << 30))
    logits = two_byte_logits(5, 41, dtype, 0, gen)
    logits[0, 40] = float("nan")
    logits[1, 0] = float("inf")
    logits[2, 16] = float("nan")  # a word's low half; its high half a logit above all the others
    logits[2, 17] = 30.0
    logits[3, :] = float("-inf")
    logits[4, :] = float("-inf")
    logits[4, 40] = 2.5  # one token left, in the row's last word
    temperatures, keys, counters = [1.0, 0.0, 0.0, 1.0, 1.3], [1, 2, 3, 4, 5], [0] * 5
    tokens, logprobs = run(logits, temperatures, keys, counters)
    tokens32, logprobs32 = run(logits.float(), temperatures, keys, counters)
    assert torch.isnan(logprobs[:4]).all() and torch.isnan(logprobs32[:4]).all()
    assert tokens[4] == tokens32[4] == 40 and abs(logprobs[4].item()) < 1e-6


@pytest.mark.parametrize("offset", [0, 1])
def test_a_non_finite_logit_among_the_16_byte_loads(offset):
    gen = torch.Generator().manual_seed(np.random.randint(1 << 30))
    logits = two_byte_logits(3, 1001, torch.bfloat16, offset, gen)
    logits[0, 333] = float("nan")
    logits[1, 700] = float("inf")
    _, logprobs = run(logits, [1.0, 0.0, 0.7], [1, 2, 3], [0, 0, 0])
    assert torch.isnan(logprobs[:2]).all() and torch.isfinite(logprobs[2])


def test_bad_arguments_are_rejected():
    logits = torch.randn(2, 8, device=DEVICE)
    ok = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(TypeError, match="logits.*float32, bfloat16 or float16"):
            sample_tokens(logits.to(dtype), ok)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(logits.bfloat16().t(), ok)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(logits[0].half(), ok)
    with pytest.raises(ValueError, match="params"):
        sample_tokens(logits, ok[:, :1])
    for splits in (0, 2, 1.0):  # 8 columns are one segment
        with pytest.raises(ValueError, match="splits"):
            sample_tokens(logits, ok, splits=splits)
    for out in (torch.empty(2, 3, device=DEVICE), torch.empty(2, 2, dtype=torch.float64, device=DEVICE),
                torch.empty(2, 4, device=DEVICE)[:, :2]):
        with pytest.raises(ValueError, match="out"):
            sample_tokens(logits, ok, out=out)


def test_a_given_out_receives_what_a_fresh_one_would():
    """A captured graph samples into its own output: the same tokens and log-probabilities, in ``out``."""
    logits = torch.randn(3, 700, device=DEVICE) * 3
    params = torch.tensor([[5, 6, 7], [0, 1, 2], temperature_bits([0.0, 0.7, 1.3])], dtype=torch.int64,
                          device=DEVICE)
    out = torch.full((2, 3), float("nan"), device=DEVICE)
    assert sample_tokens(logits, params, out=out) is out
    torch.testing.assert_close(out, sample_tokens(logits, params), rtol=0, atol=0)
