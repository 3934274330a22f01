"""benchmarks/bench_prefill.py's inputs: the paged layout and the SDPA baseline describe the same attention, for
equal sequences, a chunk on a cached prefix, and whole prompts of different lengths (SDPA padded to the longest)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import benchmarks.bench_prefill as bp  # noqa: E402
from pagedattention.kernels.reference import reference_paged_prefill_attention  # noqa: E402


@pytest.mark.parametrize("specs", [[(40, 40)] * 3, [(70, 20)], [(37, 37), (5, 5), (64, 64), (18, 18)]])
def test_sdpa_on_padded_sequences_is_the_paged_attention(specs):
    torch.manual_seed(0)
    (q, k, v), paged = bp.make_inputs(specs, 4, 2, 16, torch.float32, block_size=8, dev="cpu")
    sdpa = bp.packed(bp.sdpa_fn(q, k, v, 4, 2)().transpose(1, 2), specs)
    want = reference_paged_prefill_attention(**{n: t.double() if t.is_floating_point() else t
                                                for n, t in paged.items()})
    assert sdpa.shape == paged["query"].shape == (sum(n for _, n in specs), 4, 16)
    torch.testing.assert_close(sdpa.double(), want, rtol=1e-5, atol=1e-5)


def test_one_padded_batch_takes_no_chunks_of_different_lengths():
    with pytest.raises(ValueError, match="whole prompts"):
        bp.make_inputs([(40, 40), (70, 20)], 4, 2, 16, torch.float32, dev="cpu")


def test_engine_step_workloads_fill_a_step_with_whole_prompts():
    for name, (low, high) in (("W1-like step", (128, 512)), ("W2-like step", (100, 1024))):
        specs = bp.WORKLOADS[name]
        assert all(c == n and low <= n <= high for c, n in specs)
        assert 8192 - high < sum(n for _, n in specs) <= 8192
