"""Sharing KV blocks: beam search (its step logic here, pure; through the engine below)."""
import itertools
import math
import random
import zlib

import pytest
import torch

from pagedattention.engine.beam_search import (BeamSearch, BeamSearchParams, length_penalized_score,
                                              top_candidates)

EOS = 0


def toy_logprobs(prefix, vocab, temperature=1.0):
    """A fixed random next-token distribution for each prefix (a deterministic toy language model)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(tuple(prefix)).encode()))
    return torch.log_softmax(torch.randn(vocab, generator=g) / temperature, dim=-1)


def run(search, vocab, temperature=1.0):
    while not search.done:
        logprobs = torch.stack([toy_logprobs(b.token_ids, vocab, temperature) for b in search.beams])
        search.step(logprobs)
    return search.results()


def all_hypotheses(vocab, max_tokens, eos_ids):
    """Every sequence a search can end with: up to the first EOS, or max_tokens long; (score parts)."""
    out = []

    def walk(prefix, cum):
        logprobs = toy_logprobs(prefix, vocab)
        for t in range(vocab):
            seq, c = prefix + [t], cum + logprobs[t].item()
            if t in eos_ids or len(seq) == max_tokens:
                out.append((seq, c))
            else:
                walk(seq, c)

    walk([], 0.0)
    return out


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.5, -1.0])
def test_a_beam_wide_enough_to_hold_everything_ranks_every_hypothesis_by_its_penalised_score(length_penalty):
    vocab, max_tokens = 4, 4
    everything = all_hypotheses(vocab, max_tokens, {EOS})
    search = BeamSearch(beam_width=200, max_tokens=max_tokens, length_penalty=length_penalty,
                        eos_token_ids=frozenset({EOS}))
    results = run(search, vocab)
    assert len(results) == len(everything)
    expected = sorted(everything, key=lambda h: -length_penalized_score(h[1], len(h[0]), length_penalty))
    assert [r.token_ids for r in results] == [h[0] for h in expected]
    for r, (_, cum) in zip(results, expected):
        assert r.cum_logprob == pytest.approx(cum, abs=1e-5)


def test_width_one_with_no_length_penalty_is_greedy_decoding():
    vocab = 6
    for temperature in (0.3, 1.0, 3.0):
        search = BeamSearch(beam_width=1, max_tokens=12, length_penalty=0.0, eos_token_ids=frozenset({EOS}))
        [best] = run(search, vocab, temperature)
        greedy = []
        while len(greedy) < 12 and (not greedy or greedy[-1] != EOS):
            greedy.append(int(toy_logprobs(greedy, vocab, temperature).argmax()))
        assert best.token_ids == greedy


def test_a_step_keeps_the_best_candidates_over_all_beams():
    search = BeamSearch(beam_width=2, max_tokens=10, eos_token_ids=frozenset({EOS}))
    search.step(torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]])))
    assert [b.token_ids for b in search.beams] == [[1], [2]]
    lp = torch.log(torch.tensor([[0.05, 0.05, 0.1, 0.8],    # beam [1]: [1,3] scores .5*.8 = .40
                                 [0.6, 0.3, 0.05, 0.05]]))  # beam [2]: [2,EOS] .18 (finishes), [2,1] .09
    new = search.step(lp)
    assert [(c.beam, c.token_id) for c in new] == [(0, 3), (1, 1)]
    assert [b.token_ids for b in search.beams] == [[1, 3], [2, 1]]
    assert [h.token_ids for h in search.results()] == [[2, EOS]]
    assert search.results()[0].cum_logprob == pytest.approx(math.log(0.3 * 0.6), rel=1e-5)


def test_an_eos_candidate_ranked_below_the_beam_width_does_not_finish():
    search = BeamSearch(beam_width=2, max_tokens=10, eos_token_ids=frozenset({EOS}))
    search.step(torch.log(torch.tensor([[0.15, 0.45, 0.4]])))  # EOS ranks third of the 2*2 kept
    assert search.results() == []
    assert [b.token_ids for b in search.beams] == [[1], [2]]


def test_length_penalty_decides_between_a_short_and_a_long_hypothesis():
    # [EOS] at once (p = .4) or [1, EOS] (p = .6 * .6 = .36): worse in total, better per token
    def results(length_penalty):
        s = BeamSearch(beam_width=2, max_tokens=2, length_penalty=length_penalty, eos_token_ids=frozenset({EOS}))
        s.step(torch.log(torch.tensor([[0.4, 0.6, 1e-9]])))
        s.step(torch.log(torch.tensor([[0.6, 0.2, 0.2], [0.6, 0.2, 0.2]])))
        return [h.token_ids for h in s.results()]

    assert results(0.0) == [[EOS], [1, EOS]]  # by total log-probability
    assert results(1.0) == [[1, EOS], [EOS]]  # by log-probability per token, EOS counted


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, -1.0])
def test_stopping_early_never_loses_a_better_hypothesis(length_penalty):
    """When the search stops before max_tokens, no continuation of a running beam could have beaten the
    worst kept hypothesis (checked by enumerating every continuation)."""
    vocab, max_tokens, stopped_early = 4, 6, 0
    for seed in range(30):
        eos = frozenset({seed % vocab})
        search = BeamSearch(beam_width=2, max_tokens=max_tokens, length_penalty=length_penalty, eos_token_ids=eos)
        while not search.done:
            beams = list(search.beams)
            search.step(torch.stack([toy_logprobs(b.token_ids + [seed], vocab) for b in beams]))
        if search.num_steps == max_tokens:
            continue
        stopped_early += 1
        worst = length_penalized_score(search.results()[-1].cum_logprob, len(search.results()[-1].token_ids),
                                       length_penalty)
        # every continuation of the beams that were running when it stopped
        running = [(c, beams[c.beam].token_ids + [c.token_id]) for c in top_candidates(
            torch.tensor([b.cum_logprob for b in beams]),
            torch.stack([toy_logprobs(b.token_ids + [seed], vocab) for b in beams]), 4 * len(beams))
            if c.token_id not in eos]
        for cand, tokens in running[:2]:
            best = max_completion(tokens, cand.cum_logprob, vocab, max_tokens, eos, seed, length_penalty)
            assert best <= worst + 1e-6
    assert stopped_early > 0


def max_completion(tokens, cum, vocab, max_tokens, eos, seed, length_penalty):
    logprobs = toy_logprobs(tokens + [seed], vocab)
    best = -math.inf
    for t in range(vocab):
        seq, c = tokens + [t], cum + logprobs[t].item()
        if t in eos or len(seq) == max_tokens:
            best = max(best, length_penalized_score(c, len(seq), length_penalty))
        else:
            best = max(best, max_completion(seq, c, vocab, max_tokens, eos, seed, length_penalty))
    return best


def test_beam_search_params_are_checked():
    BeamSearchParams(beam_width=4, max_tokens=8)
    for bad in [dict(beam_width=0, max_tokens=8), dict(beam_width=2, max_tokens=0)]:
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)
    with pytest.raises(TypeError):
        BeamSearchParams(beam_width=2.0, max_tokens=8)
    with pytest.raises(ValueError):
        BeamSearchParams(beam_width=2, max_tokens=8, length_penalty=float("nan"))
    with pytest.raises(TypeError):
        BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=1)


def test_a_step_rejects_logprobs_of_the_wrong_shape():
    search = BeamSearch(beam_width=2, max_tokens=4)
    with pytest.raises(ValueError, match="logprobs"):
        search.step(torch.zeros(2, 5))
    assert search.num_steps == 0 and len(search.beams) == 1
