"""SamplingParams: every rule of its validation, its normalisation, and that it cannot change afterwards."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pagedattention.engine.sampling_params import SamplingParams
from pagedattention.engine.sequence import Sequence

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs", [
    dict(temperature="1"), dict(temperature=None), dict(temperature=True),
    dict(top_p="0.5"), dict(top_k=1.5), dict(top_k=True), dict(max_tokens=True), dict(max_tokens=2.0),
    dict(min_tokens=1.0), dict(stop_token_ids=[1, "a"]), dict(stop_token_ids=3), dict(stop_token_ids=[True]),
    dict(ignore_eos=1), dict(seed=1.0), dict(seed=True), dict(n=2.0),
    dict(stop=5), dict(stop=["a", 1]), dict(stop=[b"a"]), dict(stop={"a"}),
    dict(logprobs=1.0), dict(logprobs=True), dict(logprobs="5"),
    dict(presence_penalty="0"), dict(presence_penalty=None), dict(presence_penalty=False),
    dict(frequency_penalty="0"), dict(frequency_penalty=[0.5]),
])
def test_wrong_types_raise_type_error_naming_the_argument(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=NAN), dict(temperature=INF), dict(temperature=-INF),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=NAN), dict(top_p=INF),
    dict(top_k=-2), dict(max_tokens=0), dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4),
    dict(stop_token_ids=[-1]), dict(n=0),
    dict(seed=2 ** 64), dict(seed=-(2 ** 63) - 1), dict(seed=2 ** 64 - 2, n=3),
    dict(stop=""), dict(stop=["a", ""]),
    dict(logprobs=-1), dict(logprobs=21),
    dict(presence_penalty=2.01), dict(presence_penalty=-2.5), dict(presence_penalty=NAN), dict(presence_penalty=INF),
    dict(frequency_penalty=3), dict(frequency_penalty=-2.01), dict(frequency_penalty=NAN),
    dict(frequency_penalty=-INF),
])
def test_out_of_range_values_raise_value_error_naming_the_argument(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(logprobs=0), dict(logprobs=20), dict(logprobs=None),
    dict(presence_penalty=-2), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0), dict(frequency_penalty=2),
    dict(seed=0), dict(seed=2 ** 64 - 1), dict(seed=-(2 ** 63)), dict(seed=2 ** 64 - 3, n=3),
    dict(temperature=1e6), dict(top_p=1e-9),
])
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def manual_seed_accepts(seed: int) -> bool:
    try:
        torch.Generator().manual_seed(seed)
        return True
    except (RuntimeError, ValueError, OverflowError):
        return False


@settings(max_examples=200, deadline=None)
@given(seed=st.one_of(st.integers(), st.integers(-(2 ** 63) - 8, -(2 ** 63) + 8),
                      st.integers(2 ** 64 - 16, 2 ** 64 + 8)),
       n=st.integers(1, 8))
def test_a_seed_is_accepted_exactly_when_every_completion_can_seed_its_generator(seed, n):
    """Completion i of a request seeds torch.Generator with seed + i; torch itself is the reference."""
    fits = all(manual_seed_accepts(seed + i) for i in range(n))
    if not fits:
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed, n=n)
        return
    params = SamplingParams(seed=seed, n=n)
    seq = Sequence([1, 2], params)
    children = [seq.fork(i) for i in range(1, n)]  # what parallel sampling does after the prefill
    assert all(child.generator is not None for child in children)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(0, 1e-3), st.floats(0, 10), st.sampled_from([0.0, 1e-38, 5e-324, 1e-5])))
def test_temperatures_below_1e_5_are_greedy_the_rest_kept(temperature):
    """A temperature that small would overflow logits / temperature to inf, and softmax turns inf into NaN."""
    params = SamplingParams(temperature=temperature)
    if temperature < 1e-5:
        assert params.greedy and params.temperature == 0.0
    else:
        assert not params.greedy and params.temperature == temperature


def test_fields_cannot_change_after_validation():
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = -1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 0
    assert params.temperature == 0.5 and params.max_tokens == 16


def test_replace_derives_a_variant_and_validates_it_again():
    params = SamplingParams(temperature=0.5, stop=["x"], max_tokens=8)
    variant = dataclasses.replace(params, max_tokens=4)
    assert (variant.max_tokens, variant.temperature, variant.stop) == (4, 0.5, ("x",))
    assert params.max_tokens == 8
    with pytest.raises(ValueError, match="max_tokens"):
        dataclasses.replace(params, max_tokens=0)


def test_stop_strings_and_stop_token_ids_are_normalised_to_tuples():
    assert SamplingParams().stop == () and SamplingParams().stop_token_ids == ()
    assert SamplingParams(stop="###").stop == ("###",)
    stops = ["a", "bc"]
    params = SamplingParams(stop=stops, stop_token_ids=[7, 3])
    assert params.stop == ("a", "bc") and params.stop_token_ids == (7, 3)
    stops.append("d")  # the caller's list stays the caller's
    assert params.stop == ("a", "bc")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    hash(params)  # immutable all the way down


def test_numbers_are_stored_as_floats():
    params = SamplingParams(temperature=1, top_p=1, presence_penalty=1, frequency_penalty=-2)
    values = (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty)
    assert all(type(v) is float for v in values) and values == (1.0, 1.0, 1.0, -2.0)


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_tokens, p.ignore_eos, p.seed, p.n) == \
        (1.0, 1.0, -1, 16, 0, False, None, 1)
    assert (p.logprobs, p.presence_penalty, p.frequency_penalty) == (None, 0.0, 0.0)
    assert SamplingParams(temperature=0).greedy and not p.greedy
    assert not p.has_penalties and SamplingParams(frequency_penalty=0.1).has_penalties
    assert math.isclose(SamplingParams(temperature=1).temperature, 1.0)
