"""Sharing KV blocks: beam search (its step logic, pure, then through the engine against Hugging Face),
parallel sampling (n > 1 by fork and copy-on-write) and automatic prefix caching, with exact block accounting.

Every engine test ends with ``assert_idle``: no sequence left, and once the prefix cache is dropped every
block free with a ref count of 0.
"""
import math
import random
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from pagedattention import LLM, SamplingParams
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
        logprobs = torch.stack([toy_logprobs(b.token_ids + [seed], vocab) for b in beams])
        all_tokens = torch.arange(vocab).expand(len(beams), vocab)
        running = [(c, beams[c.beam].token_ids + [c.token_id]) for c in top_candidates(
            torch.tensor([b.cum_logprob for b in beams]), logprobs, all_tokens, 4 * len(beams))
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


# --- through the engine ----------------------------------------------------------------------------------------

HF_CONFIG = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; the test machine's cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random Llama (weights std 0.2, so that outputs vary) and its saved checkpoint."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():  # a larger EOS row: EOS is sometimes likely, so that hypotheses end at various lengths
        hf.lm_head.weight[HF_CONFIG["eos_token_id"]] *= 3
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path, safe_serialization=True)
    return hf, str(path)


@pytest.fixture(scope="module")
def hf_llm(hf_checkpoint):
    return LLM(hf_checkpoint[1], device="cpu", block_size=4, num_kv_blocks=256)


@pytest.fixture(scope="module")
def tiny():
    """The embedded tiny model (512-token byte vocabulary), prefix caching off."""
    return LLM(device="cpu", block_size=4, num_kv_blocks=256)


def assert_idle(llm):
    """No sequence left; after dropping the prefix cache every block is free with a ref count of 0."""
    assert not llm.scheduler.has_unfinished() and len(llm.manager) == 0
    if llm.prefix_cache is not None:  # with no sequence left, the cache alone holds what it lists
        cached = llm.prefix_cache.cached_block_ids
        assert all(llm.manager.block_manager.ref_count(b) == 1 for b in cached)
        assert sorted(llm.prefix_cache.evictable_block_ids) == sorted(cached)
        assert llm.manager.num_free_blocks == llm.manager.num_blocks - len(cached)
    llm.reset_prefix_cache()
    assert llm.manager.num_free_blocks == llm.manager.num_blocks
    assert all(llm.manager.block_manager.ref_count(b) == 0 for b in range(llm.manager.num_blocks))


def hf_beam_search(hf, prompt, beam_width, max_tokens, length_penalty, ignore_eos):
    """(generated tokens, score) of each sequence HF returns, best first; EOS ends a sequence (kept)."""
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      num_beams=beam_width, num_return_sequences=beam_width, do_sample=False,
                      max_new_tokens=max_tokens, min_new_tokens=0, length_penalty=length_penalty,
                      early_stopping="never", eos_token_id=None if ignore_eos else HF_CONFIG["eos_token_id"],
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    results = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        tokens = seq[len(prompt):]
        if not ignore_eos and HF_CONFIG["eos_token_id"] in tokens:
            tokens = tokens[: tokens.index(HF_CONFIG["eos_token_id"]) + 1]
        results.append((tokens, score))
    return results


@pytest.mark.parametrize("beam_width,length_penalty,ignore_eos", [(2, 1.0, False), (4, 1.0, False),
                                                                  (3, 0.0, False), (4, 2.0, False),
                                                                  (3, 1.0, True)])
def test_beam_search_equals_hugging_face(hf_checkpoint, hf_llm, beam_width, length_penalty, ignore_eos):
    hf, _ = hf_checkpoint
    rng = random.Random(beam_width * 10 + int(length_penalty * 3) + ignore_eos)
    prompts = [[rng.randrange(3, HF_CONFIG["vocab_size"]) for _ in range(rng.randint(1, 11))] for _ in range(4)]
    max_tokens = 10
    outputs = hf_llm.beam_search(prompts, BeamSearchParams(beam_width, max_tokens, length_penalty, ignore_eos))
    finished_early = 0
    for prompt, out in zip(prompts, outputs):
        expected = hf_beam_search(hf, prompt, beam_width, max_tokens, length_penalty, ignore_eos)
        got = [(s.token_ids, length_penalized_score(s.cum_logprob, len(s.token_ids), length_penalty))
               for s in out.sequences]
        assert len(got) == beam_width
        assert got[0][0] == expected[0][0]  # the best sequence
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (tokens, score), (hf_tokens, hf_score) in zip(got, expected):
            assert score == pytest.approx(hf_score, abs=1e-4)
        finished_early += any(len(t) < max_tokens for t, _ in got)
    if not ignore_eos:
        assert finished_early > 0  # EOS did end some hypotheses
    assert_idle(hf_llm)


def test_beam_search_shares_blocks_and_gives_the_same_beams_with_prefix_caching(hf_checkpoint):
    _, path = hf_checkpoint
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 10, 12, 13, 14]]
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    plain = LLM(path, device="cpu", block_size=4, num_kv_blocks=64)
    cached = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, enable_prefix_caching=True)
    expected = plain.beam_search(prompts, params)
    for _ in range(2):  # the second time the prompts are cache hits
        got = cached.beam_search(prompts, params)
        assert [[(s.token_ids, s.cum_logprob) for s in o.sequences] for o in got] == \
               [[(s.token_ids, pytest.approx(s.cum_logprob, abs=1e-5)) for s in o.sequences] for o in expected]
    assert cached.stats().prefix_cache_hit_tokens > 0
    stats = plain.stats()
    assert stats.peak_blocks_held < stats.peak_blocks_unshared  # beams held their common blocks once
    assert_idle(plain)
    assert_idle(cached)


def test_beam_search_shares_batches_with_generate_requests_in_a_small_cache(hf_checkpoint):
    """Beams and sampled requests go through one scheduler: they run in the same steps, and when the cache runs
    short the sampled requests are preempted, never a beam; everyone's output is what it is alone."""
    _, path = hf_checkpoint
    prompts = [[5, 6, 7, 8, 9, 10, 11], [9, 8, 7, 6, 5]]
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sampled_prompts = [[3, 4, 5] * 10, [7] * 28]  # 8 + 7 of the 20 blocks
    alone = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, max_model_len=64)
    expected_beams = alone.beam_search(prompts, params)
    expected_greedy = [o.outputs[0].token_ids for o in alone.generate(sampled_prompts, greedy, use_tqdm=False)]
    shared = LLM(path, device="cpu", block_size=4, num_kv_blocks=20, max_model_len=64)
    ids = [shared.add_request(p, greedy) for p in sampled_prompts]
    sizes = []
    step = shared._step

    def recording_step():
        touched = step()
        sizes.append(shared.last_step.num_seqs)
        return touched
    shared._step = recording_step
    got = shared.beam_search(prompts, params)
    assert [[s.token_ids for s in o.sequences] for o in got] == \
           [[s.token_ids for s in o.sequences] for o in expected_beams]
    assert max(sizes) == params.beam_width + 2  # one search's beams and both sampled requests in one step
    assert shared.num_preemptions > 0
    finished = {}
    while shared.has_unfinished_requests():
        finished.update((o.request_id, o.outputs[0].token_ids) for o in shared.step() if o.finished)
    assert [finished[i] for i in ids] == expected_greedy
    assert_idle(shared)


def test_beam_search_rejects_what_cannot_run(hf_llm):
    with pytest.raises(ValueError, match="KV blocks"):
        hf_llm.beam_search([[5] * 200], BeamSearchParams(beam_width=8, max_tokens=50))
    with pytest.raises(ValueError, match="max_num_seqs"):
        hf_llm.beam_search([[5]], BeamSearchParams(beam_width=hf_llm.config.max_num_seqs + 1, max_tokens=4))
    with pytest.raises(TypeError):
        hf_llm.beam_search([[5]], SamplingParams())
    assert_idle(hf_llm)


# parallel sampling (n > 1)

PROMPT = "Parallel sampling shares the prompt's blocks"


def completions(output):
    return [c.token_ids for c in output.outputs]


def test_n_completions_are_indexed_and_seeded_by_seed_plus_index(tiny):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    [out] = tiny.generate(PROMPT, params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(t) for t in completions(out)}) == 3  # independent draws
    # completion i is what a single request seeded with seed + i draws
    alone = [tiny.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=10, seed=7 + i, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids for i in range(3)]
    assert completions(out) == alone
    again = tiny.generate([PROMPT, "something else"], params, use_tqdm=False)[0]
    assert completions(again) == completions(out)  # reproducible, whatever else is in the batch
    assert_idle(tiny)


def test_n_greedy_completions_all_equal_the_greedy_output(tiny):
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    expected = tiny.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0]
    [out] = tiny.generate(PROMPT, SamplingParams(n=5, temperature=0, max_tokens=9, ignore_eos=True), use_tqdm=False)
    for c in out.outputs:
        assert c.token_ids == expected.token_ids
        assert c.cumulative_logprob == pytest.approx(expected.cumulative_logprob, abs=1e-4)
        assert c.finish_reason == "length"
    assert out.finished
    assert_idle(tiny)


@pytest.mark.parametrize("prompt_len", [8, 10])  # block-aligned (no partial block to copy) or not
def test_n_sequences_hold_exactly_the_predicted_blocks(prompt_len):
    """n completions share the prompt's full blocks; n independent requests hold n copies."""
    bs, n, max_tokens = 4, 8, 7
    prompt = list(range(40, 40 + prompt_len))
    kv_tokens = prompt_len + max_tokens - 1  # the last sampled token's K/V is never computed
    own_blocks = -(-kv_tokens // bs) - prompt_len // bs  # beyond the prompt's full blocks
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    forked = LLM(device="cpu", block_size=bs, num_kv_blocks=256)
    forked.generate(prompt, SamplingParams(n=n, temperature=0, max_tokens=max_tokens, ignore_eos=True),
                    use_tqdm=False)
    assert forked.stats().peak_blocks_held == prompt_len // bs + n * own_blocks

    copies = LLM(device="cpu", block_size=bs, num_kv_blocks=256)
    copies.generate([prompt] * n, params, use_tqdm=False)
    assert copies.stats().peak_blocks_held == n * -(-kv_tokens // bs)
    assert forked.stats().peak_blocks_unshared == copies.stats().peak_blocks_held
    assert_idle(forked)
    assert_idle(copies)


def test_a_request_that_cannot_fit_reports_the_error_in_each_of_its_n_outputs():
    llm = LLM(device="cpu", block_size=4, num_kv_blocks=8, max_model_len=64)
    too_long, fine = [9] * 40, [9] * 5
    big, small = llm.generate([too_long, fine], SamplingParams(n=3, temperature=0, max_tokens=4, ignore_eos=True),
                              use_tqdm=False)
    assert [c.finish_reason for c in big.outputs] == ["error"] * 3 and big.finished
    assert [c.index for c in big.outputs] == [0, 1, 2]
    assert "cannot fit" in big.outputs[0].error
    assert [c.finish_reason for c in small.outputs] == ["length"] * 3
    assert_idle(llm)


@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_requests_admitted_together_never_fork_past_max_num_seqs(scheduling):
    """The children a request forks when its prefill ends count against max_num_seqs from its admission, so
    admitting several n > 1 requests in one step cannot overfill the batch."""
    llm = LLM(max_num_seqs=8, num_kv_blocks=256, scheduling=scheduling)
    sizes = []
    execute = llm.runner.execute

    def counting_execute(x, eager=False):
        sizes.append(len(llm.scheduler.running))  # the children are forked when the step is scheduled
        return execute(x, eager)
    llm.runner.execute = counting_execute
    outputs = llm.generate([PROMPT, "abc", "xyz", "hello"], SamplingParams(n=3, temperature=1.0, max_tokens=6,
                                                                         ignore_eos=True), use_tqdm=False)
    assert max(sizes) <= 8 and max(sizes) >= 6  # two requests (six sequences) fit at a time, never three
    assert [len(o.outputs) for o in outputs] == [3] * 4
    assert all(len(c.token_ids) == 6 for o in outputs for c in o.outputs)
    assert_idle(llm)


def test_n_larger_than_max_num_seqs_is_rejected(tiny):
    with pytest.raises(ValueError, match="max_num_seqs"):
        tiny.generate(PROMPT, SamplingParams(n=tiny.config.max_num_seqs + 1))
    with pytest.raises(ValueError):
        SamplingParams(n=0)
    assert_idle(tiny)


# prefix caching

def shared_prefix_requests(rng, num_requests, vocab=500):
    """Requests that share prefixes of random lengths (block-aligned or not) with earlier ones."""
    bases = [[rng.randrange(vocab) for _ in range(rng.randint(5, 30))] for _ in range(3)]
    out = []
    for _ in range(num_requests):
        base = rng.choice(bases + out)
        cut = rng.randint(0, len(base))
        if rng.random() < 0.5:
            cut -= cut % 4  # block-aligned (block_size 4 in these tests)
        prefix = base[:cut]
        out.append(prefix + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))])
    return out


def greedy_alone(llm, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


@pytest.mark.parametrize("num_kv_blocks", [256, 24])  # 24: preemption and eviction forced
def test_prefix_caching_changes_no_greedy_output(tiny, num_kv_blocks):
    rng = random.Random(num_kv_blocks)
    prompts = shared_prefix_requests(rng, 16)
    expected = greedy_alone(tiny, prompts, 10)
    llm = LLM(device="cpu", block_size=4, num_kv_blocks=num_kv_blocks, enable_prefix_caching=True,
              max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for _ in range(2):  # the second round finds the first round's blocks
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert not llm.scheduler.has_unfinished() and len(llm.manager) == 0
    stats = llm.stats()
    assert stats.prefix_cache_hit_rate > 0.3
    if num_kv_blocks == 24:
        assert llm.scheduler.num_preemptions > 0
    assert_idle(llm)


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny):
    llm = LLM(device="cpu", block_size=4, num_kv_blocks=64, enable_prefix_caching=True)
    prompt = list(range(100, 112))  # 3 full blocks
    [expected] = greedy_alone(tiny, [prompt], 5)
    first = greedy_alone(llm, [prompt], 5)
    second = greedy_alone(llm, [prompt], 5)  # blocks 0-1 found; block 2 recomputed for the last token's logits
    assert first == second == [expected]
    assert llm.prefix_cache.stats.hit_tokens == 2 * 4  # the first lookup found nothing, the second 2 blocks
    assert_idle(llm)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), num_kv_blocks=st.sampled_from([20, 40, 256]),
       caching=st.booleans(), chunk=st.sampled_from([8, 64]))
def test_request_mixes_match_their_greedy_outputs_alone(tiny, seed, num_kv_blocks, caching, chunk):
    """Random mixes of n > 1 and single requests sharing prefixes, in a cache small enough to preempt."""
    rng = random.Random(seed)
    prompts = shared_prefix_requests(rng, rng.randint(2, 7))
    ns = [rng.choice([1, 1, 2, 3]) for _ in prompts]
    max_tokens = [rng.randint(1, 8) for _ in prompts]
    expected = [greedy_alone(tiny, [p], m)[0] for p, m in zip(prompts, max_tokens)]
    llm = LLM(device="cpu", block_size=4, num_kv_blocks=num_kv_blocks, enable_prefix_caching=caching,
              max_num_batched_tokens=chunk)
    params = [SamplingParams(n=n, temperature=0, max_tokens=m, ignore_eos=True) for n, m in zip(ns, max_tokens)]
    check_step_stats(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out, n, tokens in zip(outputs, ns, expected):
        assert completions(out) == [tokens] * n
    assert_idle(llm)


def check_step_stats(llm):
    """Make every step check that the unshared block count it records in O(1) (the manager's running total
    of block-table lengths) is the sum of the running sequences' table lengths."""
    record = llm._record_step_stats

    def checked():
        running = llm.scheduler.running
        assert llm.manager.num_table_entries == sum(len(llm.manager.block_table(s.seq_id)) for s in running)
        assert len(llm.manager) == len(running)
        record()
    llm._record_step_stats = checked


def test_cached_blocks_nobody_uses_make_room_for_a_growing_sequence(tiny):
    llm = LLM(device="cpu", block_size=4, num_kv_blocks=16, enable_prefix_caching=True)
    fillers = [[i] * 16 for i in range(1, 4)]
    llm.generate(fillers, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert llm.manager.num_free_blocks <= 1  # the pool is (nearly) all cached blocks that nobody uses
    [expected] = greedy_alone(tiny, [[7, 7, 7]], 40)
    [out] = llm.generate([7, 7, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == expected
    assert_idle(llm)
