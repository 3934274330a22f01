"""The sampler: greedy, temperature / top-k / top-p, per-request seeds, min_tokens, presence and frequency
penalties, reported logprobs (chosen and top-N), non-finite logits, beam candidates."""
import math

import pytest
import torch

from pagedattention.engine.sampler import Sampler, SamplerOutput, SamplingError
from pagedattention.engine.sampling_params import SamplingParams
from pagedattention.engine.sequence import Sequence

VOCAB = 50


def seqs_for(*params):
    return [Sequence([1, 2, 3], p) for p in params]


def random_logits(n, seed=0):
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_and_report_its_logprob():
    logits = random_logits(4)
    out = Sampler("cpu")(logits.clone(), seqs_for(*[SamplingParams(temperature=0)] * 4), set())
    tokens, logprobs = out.token_ids, out.logprobs
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = random_logits(6, seed=1)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 3
    tokens = Sampler("cpu", seed=3)(logits.clone(), seqs_for(*params), set()).token_ids
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature():
    logits = random_logits(8, seed=2)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4 + [SamplingParams(temperature=2.0, top_p=1e-6)] * 4
    tokens = Sampler("cpu")(logits.clone(), seqs_for(*params), set()).token_ids
    assert tokens == logits.argmax(-1).tolist()


def draw_many(logits_row, params, n=4000, seed=0):
    sampler = Sampler("cpu", seed=seed)
    logits = logits_row.expand(n, VOCAB).clone()
    tokens = sampler(logits, seqs_for(*[params] * n), set()).token_ids
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
            tokens = sampler(logits, seqs, set()).token_ids
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
    tokens = Sampler("cpu")(logits.clone(), seqs, eos_token_ids={3}).token_ids
    assert tokens == [5, 3]


def test_min_tokens_does_not_mask_eos_when_eos_is_ignored():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 3] = 10.0
    seqs = seqs_for(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True))
    tokens = Sampler("cpu")(logits.clone(), seqs, eos_token_ids={3}).token_ids
    assert tokens == [3]


def with_outputs(params, outputs, request_id=None):
    """A sequence of prompt [1, 2, 3] that has generated ``outputs`` so far."""
    seq = Sequence([1, 2, 3], params, request_id=request_id)
    seq.token_ids += outputs
    return seq


def penalised(row, outputs, presence, frequency):
    """OpenAI's definition, token by token: logit -= presence * (count > 0) + frequency * count."""
    row = row.clone()
    for token in set(outputs):
        row[token] -= presence + frequency * outputs.count(token)
    return row


@pytest.mark.parametrize("every_row", [True, False])
def test_penalties_shift_the_logits_of_the_rows_that_set_them(every_row):
    gen = torch.Generator().manual_seed(21)
    logits = random_logits(9, seed=21)
    seqs, expected, changed = [], [], 0
    for row in range(9):
        favourite = int(logits[row].argmax())
        # generated so far: the row's favourite token one to three times, then random tokens
        outputs = [favourite] * int(torch.randint(1, 4, (1,), generator=gen)) + \
            torch.randint(0, VOCAB, (6,), generator=gen).tolist()
        if not every_row and row % 3 == 2:
            params, want = SamplingParams(temperature=0), favourite
        else:
            presence, frequency = (torch.rand(2, generator=gen) * 4 - 2).tolist()
            params = SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
            want = int(penalised(logits[row], outputs, presence, frequency).argmax())
        changed += want != favourite
        seqs.append(with_outputs(params, outputs))
        expected.append(want)
    assert changed, "no penalty changed a choice: the test would not notice penalties being ignored"
    out = Sampler("cpu")(logits.clone(), seqs, set())
    assert out.token_ids == expected
    # the reported logprob is the model's, before penalties
    model = torch.log_softmax(logits.double(), -1)
    assert out.logprobs == pytest.approx([model[r, t].item() for r, t in enumerate(expected)], abs=1e-5)


def test_penalties_leave_the_callers_logits_as_they_were():
    """A caller that samples the same logits again (say, without a failed row) must not penalise twice."""
    logits = random_logits(3, seed=30)
    params = SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=2.0)
    seqs = [with_outputs(params, logits[row].topk(2).indices.tolist() * 2) for row in range(3)]
    given = logits.clone()
    first = Sampler("cpu")(given, seqs, set())
    assert torch.equal(given, logits)
    assert Sampler("cpu")(given, seqs, set()) == first


def test_penalised_sampling_draws_from_the_penalised_distribution():
    row = random_logits(1, seed=22)[0] / 2
    outputs = [int(t) for t in row.topk(4).indices] * 2 + [int(row.argmin())] * 3
    params = SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=-0.3)
    n = 4000
    sampler = Sampler("cpu", seed=5)
    tokens = sampler(row.expand(n, VOCAB).clone(), [with_outputs(params, outputs) for _ in range(n)],
                     set()).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double() / n
    want = torch.softmax(penalised(row.double(), outputs, 0.5, -0.3) / 0.8, -1)
    sd = torch.sqrt(want * (1 - want) / n)
    assert torch.all((freq - want).abs() <= 4.5 * sd + 1e-3), (freq - want).abs().max()


def test_top_logprobs_are_the_log_softmax_top_n_plus_the_chosen_token():
    logits = random_logits(7, seed=23)
    ks = [None, 0, 1, 5, 20, 3, None]
    params = [SamplingParams(temperature=1.0 if i % 2 else 0, logprobs=k) for i, k in enumerate(ks)]
    out = Sampler("cpu", seed=2)(logits.clone(), seqs_for(*params), set())
    assert isinstance(out, SamplerOutput)
    model = torch.log_softmax(logits.double(), -1)
    for row, k in enumerate(ks):
        top, token = out.top_logprobs[row], out.token_ids[row]
        if k is None:
            assert top is None
            continue
        order = model[row].argsort(descending=True)[:k].tolist()
        assert list(top)[:k] == order  # most likely first
        assert set(top) == set(order) | {token}
        assert top == pytest.approx({t: model[row, t].item() for t in top}, abs=1e-5)
        assert top[token] == out.logprobs[row]


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6])
def test_a_vanishing_temperature_is_greedy_and_never_samples_from_nan(temperature):
    logits = random_logits(8, seed=24) * 10  # divided by a tiny temperature these overflow float32
    params = [SamplingParams(temperature=temperature)] * 3 + [SamplingParams(temperature=temperature, top_k=5)] * 3 \
        + [SamplingParams(temperature=1.0)] * 2
    out = Sampler("cpu")(logits.clone(), seqs_for(*params), set())
    assert out.token_ids[:6] == logits.argmax(-1)[:6].tolist()
    assert all(math.isfinite(lp) for lp in out.logprobs)


def test_the_smallest_sampled_temperature_stays_finite_on_large_logits():
    logits = random_logits(6, seed=25) * 1000
    out = Sampler("cpu")(logits.clone(), seqs_for(*[SamplingParams(temperature=1e-5, top_p=0.9)] * 6), set())
    assert out.token_ids == logits.argmax(-1).tolist()
    assert all(math.isfinite(lp) for lp in out.logprobs)


@pytest.mark.parametrize("poison", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_non_finite_logits_row_raises_naming_its_request(poison, temperature):
    logits = random_logits(5, seed=26)
    bad_rows, good_rows = [1, 3], [0, 2, 4]
    for row in bad_rows:
        if poison == "all -inf":
            logits[row] = float("-inf")
        else:
            logits[row, 7] = float(poison)
    # row 4 is completion 1 of request req-3 (parallel sampling): the request is named once
    request_ids = ["req-0", "req-1", "req-2", "req-3", "req-3"]
    seqs = [with_outputs(SamplingParams(temperature=temperature, logprobs=2), [], request_id=r) for r in request_ids]
    with pytest.raises(SamplingError, match="'req-1', 'req-3'") as info:
        Sampler("cpu")(logits.clone(), seqs, set())
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.request_ids == ["req-1", "req-3"] and err.rows == bad_rows
    out = err.output
    assert [out.token_ids[r] for r in bad_rows] == [-1, -1]
    assert all(math.isnan(out.logprobs[r]) and out.top_logprobs[r] is None for r in bad_rows)
    assert all(0 <= out.token_ids[r] < VOCAB and math.isfinite(out.logprobs[r]) for r in good_rows)
    if temperature == 0.0:
        assert [out.token_ids[r] for r in good_rows] == logits.argmax(-1)[good_rows].tolist()


def test_a_zero_exponential_draw_never_picks_a_filtered_out_token(monkeypatch):
    """argmax(p / E): with E = 0 a filtered token's 0 / 0 is NaN, which argmax would take as the largest."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    logits = random_logits(4, seed=27)
    out = Sampler("cpu")(logits.clone(), seqs_for(*[SamplingParams(temperature=1.0, top_k=3)] * 4), set())
    top3 = logits.topk(3, -1).indices.tolist()
    assert all(token in top3[row] for row, token in enumerate(out.token_ids))


def test_one_device_to_host_copy_per_step(monkeypatch):
    """Everything the host needs (tokens, logprobs, top-N) travels packed in one tensor; reading the result
    touches nothing else on the device."""
    params = [SamplingParams(temperature=0.7, top_p=0.9, logprobs=3, presence_penalty=0.5, seed=1),
              SamplingParams(temperature=0, frequency_penalty=1.0), SamplingParams(logprobs=0)]
    seqs = [with_outputs(p, [4, 4, 9]) for p in params]
    pending = Sampler("cpu").launch(random_logits(3, seed=28), seqs, set())
    assert pending.host.dim() == 1 and pending.host.numel() == 2 * 3 + 2 * 3  # one row asks for its top 3
    for name in ("cpu", "to", "item"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a second device->host copy"))
    out = pending.result()
    assert len(out.token_ids) == 3 and len(out.top_logprobs[0]) >= 3


@pytest.mark.parametrize("k", [1, 4, VOCAB + 5])
def test_beam_candidates_are_each_rows_best_log_probabilities_on_the_host(k):
    logits = random_logits(5, seed=29)
    values, token_ids = Sampler("cpu").beam_candidates(logits.clone(), k)
    width = min(k, VOCAB)
    assert values.dtype == torch.float32 and token_ids.dtype == torch.int64
    assert values.device.type == token_ids.device.type == "cpu" and values.shape == token_ids.shape == (5, width)
    model = torch.log_softmax(logits.double(), -1)
    assert token_ids.tolist() == model.argsort(-1, descending=True)[:, :width].tolist()
    assert torch.allclose(values.double(), model.gather(1, token_ids), atol=1e-5)


def test_bad_shapes_and_k_raise_value_error():
    with pytest.raises(ValueError, match="logits"):
        Sampler("cpu")(random_logits(2), seqs_for(SamplingParams()), set())
    with pytest.raises(ValueError, match="k"):
        Sampler("cpu").beam_candidates(random_logits(2), 0)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_half_precision_logits_sample_what_their_float32_values_sample(use_kernel):
    """The engine hands the sampler the LM head's bfloat16/float16 logits: the one-pass kernel reads them as they
    are, torch converts them; either way the tokens and logprobs are those of the same values in float32."""
    if use_kernel:
        from pagedattention.kernels.runtime import kernels_available
        if not kernels_available("cpu"):
            pytest.skip("the Numba CUDA simulator is not enabled (a GPU machine runs the CUDA tests instead)")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=4),
              SamplingParams(temperature=0, min_tokens=2), SamplingParams(temperature=1.3, seed=9)]
    for dtype in (torch.bfloat16, torch.float16):
        half = random_logits(len(params), seed=5).to(dtype)
        got = Sampler("cpu", use_kernel=use_kernel)(half.clone(), seqs_for(*params), {7})
        want = Sampler("cpu", use_kernel=use_kernel)(half.float(), seqs_for(*params), {7})
        assert got.token_ids == want.token_ids and 7 not in (got.token_ids[2],)
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def test_the_one_pass_kernel_draws_a_seeded_row_from_its_seed_alone():
    """In the kernel's batch a seeded request's noise is keyed by its seed and progress, not by its row or the
    step: alone or beside unseeded rows, from samplers of different seeds, it draws the same tokens."""
    from pagedattention.kernels.runtime import kernels_available
    if not kernels_available("cpu"):
        pytest.skip("the Numba CUDA simulator is not enabled (a GPU machine runs the CUDA tests instead)")
    for seed in range(4):
        logits = random_logits(3, seed=seed) / 3  # flat: draws differ unless their noise is the same
        seeded = SamplingParams(temperature=1.0, seed=100 + seed)
        alone = Sampler("cpu", seed=1, use_kernel=True)(logits[[1]].clone(), seqs_for(seeded), set())
        mixed = Sampler("cpu", seed=2, use_kernel=True)(
            logits.clone(), seqs_for(SamplingParams(temperature=1.0), seeded, SamplingParams(temperature=0.7)), set())
        assert mixed.token_ids[1] == alone.token_ids[0]
