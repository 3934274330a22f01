"""The sampler: greedy, temperature / top-k / top-p, per-request seeds, min_tokens, reported logprobs."""
import math

import pytest
import torch

from pagedattention.engine.sampler import Sampler
from pagedattention.engine.sampling_params import SamplingParams
from pagedattention.engine.sequence import Sequence

VOCAB = 50


def seqs_for(*params):
    return [Sequence([1, 2, 3], p) for p in params]


def random_logits(n, seed=0):
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_and_report_its_logprob():
    logits = random_logits(4)
    tokens, logprobs = Sampler("cpu")(logits.clone(), seqs_for(*[SamplingParams(temperature=0)] * 4), set())
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = random_logits(6, seed=1)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 3
    tokens, _ = Sampler("cpu", seed=3)(logits.clone(), seqs_for(*params), set())
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature():
    logits = random_logits(8, seed=2)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4 + [SamplingParams(temperature=2.0, top_p=1e-6)] * 4
    tokens, _ = Sampler("cpu")(logits.clone(), seqs_for(*params), set())
    assert tokens == logits.argmax(-1).tolist()


def draw_many(logits_row, params, n=4000, seed=0):
    sampler = Sampler("cpu", seed=seed)
    logits = logits_row.expand(n, VOCAB).clone()
    tokens, _ = sampler(logits, seqs_for(*[params] * n), set())
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).double() / n


def expected_distribution(logits_row, temperature, top_k=VOCAB, top_p=1.0):
    """vLLM's order: keep the top-k tokens, renormalise, then keep the smallest head reaching top_p."""
    probs = torch.softmax(logits_row.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    head = order[:top_k]
    in_k = probs[head] / probs[head].sum()
    keep, mass = [], 0.0
    for token, p in zip(head, in_k.tolist()):
        if mass >= top_p:
            break
        keep.append(token)
        mass += p
    kept = torch.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.6), (1.0, 8, 0.8)])
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    row = random_logits(1, seed=4)[0] / 2
    freq = draw_many(row, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    want = expected_distribution(row, temperature, top_k if top_k > 0 else VOCAB, top_p)
    assert torch.all(freq[want == 0] == 0), "a token outside the top-k/top-p set was sampled"
    # 4000 draws: each frequency within ~4.5 standard deviations of its probability
    sd = torch.sqrt(want * (1 - want) / 4000)
    assert torch.all((freq - want).abs() <= 4.5 * sd + 1e-3), (freq - want).abs().max()


def test_a_seeded_request_draws_the_same_tokens_whatever_its_batch_mates():
    row = random_logits(1, seed=5)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def draw(batch_params, position, engine_seed):
        """Ten steps of a batch; the seeded request sits at ``position`` and always sees ``row``."""
        seqs = seqs_for(*batch_params)  # fresh Sequences: the seeded stream starts over
        sampler = Sampler("cpu", seed=engine_seed)
        out = []
        for step in range(10):
            logits = random_logits(len(seqs), seed=100 + step)
            logits[position] = row
            tokens, _ = sampler(logits, seqs, set())
            out.append(tokens[position])
        return out

    alone = draw([seeded], 0, engine_seed=0)
    assert draw([seeded], 0, engine_seed=7) == alone
    mates = [SamplingParams(temperature=1.0), seeded, SamplingParams(temperature=0.5, top_k=3)]
    assert draw(mates, 1, engine_seed=99) == alone
    assert len(set(alone)) > 1  # it really samples
    assert draw([SamplingParams(temperature=1.0, seed=4321)], 0, engine_seed=0) != alone


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, 3] = 10.0   # EOS would win
    logits[:, 4] = 9.0    # then the stop token
    logits[:, 5] = 1.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])
    seqs = seqs_for(params, params)
    seqs[1].token_ids += [9, 9]  # the second already has 2 outputs
    tokens, _ = Sampler("cpu")(logits.clone(), seqs, eos_token_ids={3})
    assert tokens == [5, 3]


def test_min_tokens_does_not_mask_eos_when_eos_is_ignored():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 3] = 10.0
    seqs = seqs_for(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True))
    tokens, _ = Sampler("cpu")(logits.clone(), seqs, eos_token_ids={3})
    assert tokens == [3]


@pytest.mark.parametrize("kwargs,error", [
    (dict(temperature=-0.1), ValueError), (dict(temperature=float("nan")), ValueError),
    (dict(temperature="1"), TypeError), (dict(top_p=0.0), ValueError), (dict(top_p=1.5), ValueError),
    (dict(top_k=-2), ValueError), (dict(top_k=1.5), TypeError), (dict(max_tokens=0), ValueError),
    (dict(max_tokens=True), TypeError), (dict(min_tokens=-1), ValueError),
    (dict(min_tokens=5, max_tokens=4), ValueError), (dict(stop_token_ids=[1, "a"]), TypeError),
    (dict(stop_token_ids=[-1]), ValueError), (dict(ignore_eos=1), TypeError), (dict(seed=1.0), TypeError),
    (dict(n=0), ValueError),
])
def test_sampling_params_reject_bad_values_naming_the_argument(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_tokens, p.ignore_eos, p.seed) == \
        (1.0, 1.0, -1, 16, 0, False, None)
    assert SamplingParams(temperature=0).greedy and not p.greedy
    assert math.isclose(SamplingParams(temperature=1).temperature, 1.0)
