"""Nothing a user does corrupts a run: concurrent callers, extreme sampling values, non-finite logits, stop
strings, impossible cache sizes, the request-level API (add_request / step / abort_request)."""
import threading

import pytest
import torch

from pagedattention import LLM, SamplingParams

PROMPTS = ["Hello, world", "The quick brown fox", "a", "PagedAttention " * 3, "0123456789" * 2, "xyz"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


@pytest.fixture(scope="module")
def reference(llm):
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def assert_idle(llm):
    assert not llm.has_unfinished_requests() and llm.num_unfinished_requests == 0
    assert llm.manager.num_free_blocks == llm.manager.num_blocks


def test_concurrent_generate_calls_each_get_their_own_tokens(llm, reference):
    results, errors = {}, []

    def call(i):
        try:
            prompts = PROMPTS[i % 3::3]
            results[i] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 6
    for i, tokens in results.items():
        assert tokens == reference[i % 3::3]
    assert_idle(llm)


def test_seeds_out_of_range_are_rejected_before_anything_runs():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2 ** 64)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2 ** 64 - 1, n=2)  # completion 1 would use seed + 1
    with pytest.raises(ValueError, match="seed"):
        LLM(device="cpu", seed=2 ** 64)


def test_a_tiny_temperature_is_greedy_not_nan(llm, reference):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1e-38, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[0]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("inf"))


def test_params_cannot_change_after_validation():
    params = SamplingParams(max_tokens=4)
    with pytest.raises(AttributeError):
        params.max_tokens = 0


def test_non_finite_logits_end_that_request_only(reference, monkeypatch):
    engine = LLM(device="cpu")
    bad = engine.add_request(PROMPTS[1], GREEDY)
    good = [engine.add_request(p, GREEDY) for p in (PROMPTS[0], PROMPTS[2])]
    execute, steps = engine.runner.execute, []

    def poisoned(x, eager=False):
        logits = execute(x, eager).clone()
        steps.append(1)
        if len(steps) == 3:  # a decode step: the bad request's row (first admitted) turns NaN
            logits[0] = float("nan")
        return logits
    monkeypatch.setattr(engine.runner, "execute", poisoned)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0]
    assert final[bad].finish_reason == "error" and bad in final[bad].error and "non-finite" in final[bad].error
    assert [final[g].token_ids for g in good] == [reference[0], reference[2]]
    assert_idle(engine)


def test_stop_strings_cut_the_text_and_end_the_request(llm, reference):
    # a character that first appears after the start of some prompt's greedy text (not a replacement char)
    cases = [(p, o.outputs[0]) for p, o in zip(PROMPTS, llm.generate(PROMPTS, GREEDY, use_tqdm=False))]
    prompt, full, at = next((p, c, i) for p, c in cases for i in range(1, len(c.text))
                            if c.text.find(c.text[i]) == i and c.text[i] != "\ufffd")
    stop = full.text[at]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=["never", stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == full.text[:at]
    assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < 10
    assert_idle(llm)


def test_an_impossible_cache_size_fails_at_once_naming_the_argument():
    with pytest.raises(ValueError, match="num_kv_blocks=500000000"):
        LLM(device="cpu", num_kv_blocks=5 * 10 ** 8, block_size=1024)


def test_a_cache_that_lowers_max_model_len_says_so():
    with pytest.warns(UserWarning, match="max_model_len is lowered to 64"):
        small = LLM(device="cpu", num_kv_blocks=4, block_size=16)
    assert small.max_model_len == 64


def test_the_tiny_model_runs_on_one_cpu_thread_unless_asked():
    LLM(device="cpu")
    assert torch.get_num_threads() == 1
    LLM(device="cpu", cpu_threads=2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_step_streams_cumulative_outputs_and_abort_frees_blocks(llm, reference):
    kept = llm.add_request(PROMPTS[0], GREEDY, request_id="kept")
    dropped = llm.add_request(PROMPTS[4], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request(PROMPTS[1], GREEDY, request_id="kept")
    seen, lengths, aborted = {}, [], False
    while llm.has_unfinished_requests():
        for out in llm.step():
            seen[out.request_id] = out
            if out.request_id == kept:
                lengths.append(len(out.outputs[0].token_ids))
        if not aborted and dropped in seen and len(seen[dropped].outputs[0].token_ids) == 3:
            assert llm.abort_request(dropped) and not llm.abort_request(dropped)
            aborted = True
    assert lengths == list(range(1, 11)) and seen[kept].finished
    assert seen[kept].outputs[0].token_ids == reference[0]
    assert len(seen[dropped].outputs[0].token_ids) == 3
    assert_idle(llm)


def test_overlapped_decode_steps_change_no_output(reference):
    """Decode step t + 1 launched before step t's tokens reach the host (its inputs are step t's tokens on the
    device) gives what strictly alternating steps give: greedy and seeded tokens, EOS / stop-token / stop-string
    ends seen one step late, preemption in a small cache."""
    eos = 257  # the tiny model's EOS: some requests end on it, in mid-batch
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=0.9, seed=3, max_tokens=33),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, stop=["zz"]),
              SamplingParams(temperature=1.2, seed=9, max_tokens=40, stop_token_ids=[7, 100, 300]),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True), SamplingParams(temperature=0.7, seed=1)]

    def run(overlap: bool):
        engine = LLM(device="cpu", num_kv_blocks=12, block_size=8, max_model_len=96, max_num_seqs=4)
        launches = []
        stepper = engine.stepper
        launch = stepper.launch
        stepper.launch = lambda batch, previous: launches.append(previous is not None) or launch(batch, previous)
        if not overlap:
            stepper.can_overlap = lambda batch: False
        outputs = engine.generate(PROMPTS, params, use_tqdm=False)
        assert_idle(engine)
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].text) for o in outputs], \
            sum(launches), engine.num_preemptions
    overlapped, num_overlapped, preempted = run(True)
    plain, none, _ = run(False)
    assert overlapped == plain
    assert num_overlapped > 10 and none == 0 and preempted > 0
    # some request ended on a token the host learns of one step late (EOS or a stop token)
    assert any(reason == "stop" and tokens[-1] in (eos, 7, 100, 300) for tokens, reason, _ in plain)


def test_back_to_back_prefill_steps_overlap_and_change_no_output():
    """A burst of requests larger than one step's token budget, whose prompts do not fit beside the running
    sequences in a mixed step (as where a GPU engine's mixed-step graphs hold few prompt tokens): each prefill
    step after the first is launched while the one before it still runs (its prompts admitted whole, the
    running sequences waiting to decode), and every request gets the tokens strictly alternating steps give."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 250, (int(n),), generator=gen).tolist() for n in torch.randint(4, 15, (12,))]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=5, ignore_eos=True)] * 6

    def run(overlap: bool):
        engine = LLM(device="cpu", max_num_batched_tokens=32, block_size=4, max_num_seqs=16)
        engine.scheduler.mixed_prompt_limit = (3, 1)
        behind_a_prefill = []
        stepper = engine.stepper
        launch = stepper.launch

        def counting(batch, previous):
            behind_a_prefill.append(batch.num_decode == 0 and previous is not None and previous.batch.is_prefill)
            return launch(batch, previous)
        stepper.launch = counting
        if not overlap:
            stepper.can_overlap = lambda batch: False
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert_idle(engine)
        return [o.outputs[0].token_ids for o in outputs], sum(behind_a_prefill)
    overlapped, num_overlapped = run(True)
    plain, none = run(False)
    assert overlapped == plain and all(len(tokens) in (5, 6) for tokens in plain)
    assert num_overlapped >= 2 and none == 0


def test_output_kinds_report_everything_deltas_or_only_the_end(llm, reference):
    kinds = {"cumulative": [], "delta": [], "final_only": []}
    ids = {llm.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                      output_kind=kind)): kind for kind in kinds}
    while llm.has_unfinished_requests():
        for out in llm.step():
            kinds[ids[out.request_id]].append(out)
    cumulative, delta, final = kinds["cumulative"], kinds["delta"], kinds["final_only"]
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 11))
    assert [t for o in delta for t in o.outputs[0].token_ids] == reference[0]
    assert "".join(o.outputs[0].text for o in delta) == cumulative[-1].outputs[0].text
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == reference[0]
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="streaming")
    assert_idle(llm)


def test_generated_request_ids_never_take_a_callers_id_and_generate_loses_no_step_output(reference):
    engine = LLM(device="cpu")
    mine = [engine.add_request(PROMPTS[0], GREEDY, request_id=str(i)) for i in range(3)]
    auto = engine.add_request(PROMPTS[1], GREEDY)
    assert auto not in mine
    # generate steps the queued requests too (one batch); step() still reports them afterwards
    assert engine.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reference[2]
    finished = {}
    while engine.has_unfinished_requests() or not finished:
        finished.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert finished == dict(zip([*mine, auto], [reference[0]] * 3 + [reference[1]]))
    assert engine.num_unfinished_requests == 0
