"""The one-pass sampling kernel (kernels/sampling.py) against torch and a numpy model of its noise.

Greedy rows must be torch.argmax exactly (first index on ties) with log_softmax's log-probability; sampled rows
must be argmax(x / T + Gumbel noise) for the documented hash of (key, counter, column), and that noise must
make the draws follow softmax(x / T).
"""
import numpy as np
import pytest
import torch

from pagedattention.kernels.runtime import kernels_available

if not kernels_available("cpu" if not torch.cuda.is_available() else "cuda"):
    pytest.skip("the Numba kernels cannot run here", allow_module_level=True)

from pagedattention.kernels.sampling import sample_tokens, temperature_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M32 = np.uint64(0xFFFFFFFF)


def fmix32(h):
    h = h.astype(np.uint64)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & M32
    return h ^ (h >> np.uint64(16))


def gumbel_noise(key: int, counter: int, vocab: int) -> np.ndarray:
    """float64 Gumbel noise of each column, from the kernel's documented hash."""
    k, c = np.uint64(key), np.uint64(counter)
    h = fmix32(np.array([k & M32]))
    h = fmix32(h ^ (k >> np.uint64(32)))
    h = fmix32(h ^ (c & M32))
    h = fmix32(h ^ (c >> np.uint64(32)))
    bits = fmix32(h ^ fmix32(np.arange(vocab, dtype=np.uint64)))
    u = ((bits >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0 ** -24
    return -np.log(-np.log(u))


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


def test_sampled_rows_are_gumbel_max_of_the_documented_noise():
    rng = np.random.default_rng()
    logits = torch.tensor(rng.normal(size=(5, 301)) * 2, dtype=torch.float32)
    temperatures = [0.7, 1.0, 1.5, 0.3, 2.0]
    keys = rng.integers(0, 1 << 62, size=5).tolist()
    counters = rng.integers(0, 1 << 40, size=5).tolist()
    tokens, logprobs = run(logits, temperatures, keys, counters)
    x = logits.double().numpy()
    for row in range(5):
        expected = np.argmax(x[row] / temperatures[row] + gumbel_noise(keys[row], counters[row], x.shape[1]))
        assert tokens[row] == expected
    expected = torch.log_softmax(logits.double(), dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=1e-5)


def test_the_noise_draws_follow_softmax_over_temperature():
    """Chi-square of 40,000 draws (the numpy model of the kernel's noise, which the test above ties to the
    kernel) against softmax(x / T)."""
    rng = np.random.default_rng(0)
    x, t, n = rng.normal(size=8), 0.8, 40_000
    draws = np.array([np.argmax(x / t + gumbel_noise(7, c, 8)) for c in range(n)])
    expected = np.exp(x / t) / np.exp(x / t).sum() * n
    chi2 = (((np.bincount(draws, minlength=8) - expected) ** 2) / expected).sum()
    assert chi2 < 24.3  # the 0.999 quantile of chi-square with 7 degrees of freedom


def test_a_row_depends_on_its_key_and_counter_only():
    logits = torch.randn(3, 64)
    row = logits[1:2].repeat(3, 1)
    a, _ = run(row, [1.0] * 3, [5, 5, 6], [9, 9, 9])
    b, _ = run(torch.cat([logits[:1], row[:1]]), [1.0, 1.0], [1, 5], [0, 9])
    assert a[0] == a[1] == b[1]


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


def test_bad_arguments_are_rejected():
    logits = torch.randn(2, 8, device=DEVICE)
    ok = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(logits.half(), ok)
    with pytest.raises(ValueError, match="params"):
        sample_tokens(logits, ok[:, :1])
