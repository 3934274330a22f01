"""Mixed steps: requests admitted while others decode ride the decode step (decode tokens first, then prompts),
one pass of the model, overlapped with the step before. Whatever arrives when, each request gets the tokens it
gets alone."""
from __future__ import annotations

import pytest
import torch

from pagedattention import LLM, SamplingParams
from pagedattention.engine.cuda_graphs import CudaGraphs
from pagedattention.engine.sampler import Sampler
from pagedattention.engine.scheduler import MIN_MIXED_ADMISSION
from test_engine import PROMPTS, assert_idle, llm, one_thread  # noqa: F401  (the prompts, and fixtures)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def alone(llm, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def run_arrivals(engine, arrivals, params):
    """``arrivals``: {step number: prompt indices added before that step}; steps until all are done. Returns
    each request's tokens (by prompt index) and the kind of every step."""
    ids, done, kinds, step = {}, {}, [], 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for i in arrivals.get(step, ()):
            ids[engine.add_request(PROMPTS[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.outputs[0].token_ids
        kinds.append(engine.last_step.kind)
        step += 1
    return done, kinds


def test_requests_arriving_while_others_decode_join_in_mixed_steps_and_get_their_tokens(llm):
    done, kinds = run_arrivals(llm, {0: [0, 1], 3: [2], 4: [3, 4]}, GREEDY)
    assert kinds[0] == "prefill" and kinds[3] == "mixed" and kinds[4] == "mixed"
    assert kinds.count("prefill") == 1  # nobody waited for a step of its own
    for i, tokens in done.items():
        assert tokens == alone(llm, PROMPTS[i], GREEDY)
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert_idle(llm)


def test_a_mixed_step_reports_its_decode_and_prompt_parts(llm):
    llm.add_request(PROMPTS[0], GREEDY)
    llm.step()
    llm.step()
    llm.add_request(PROMPTS[1], GREEDY)
    llm.step()
    info = llm.last_step
    prompt_len = len(llm.tokenizer.encode(PROMPTS[1]))
    assert (info.kind, info.num_seqs, info.num_decode_seqs, info.num_tokens) == ("mixed", 2, 1, 1 + prompt_len)
    while llm.has_unfinished_requests():
        llm.step()
    assert_idle(llm)


def test_seeded_and_parallel_sampling_in_mixed_steps_match_running_alone(llm):
    seeded = SamplingParams(temperature=0.9, seed=11, max_tokens=8, ignore_eos=True)
    done, kinds = run_arrivals(llm, {0: [1], 2: [3]}, seeded)
    assert "mixed" in kinds
    assert done[1] == alone(llm, PROMPTS[1], seeded) and done[3] == alone(llm, PROMPTS[3], seeded)
    forked = SamplingParams(temperature=0, n=3, max_tokens=6, ignore_eos=True)
    llm.add_request(PROMPTS[0], GREEDY)
    llm.step()
    llm.step()
    request_id = llm.add_request(PROMPTS[2], forked)
    outputs = {}
    while llm.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in llm.step() if o.finished)
    expected = alone(llm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [c.token_ids for c in outputs[request_id].outputs] == [expected] * 3
    assert_idle(llm)


def test_a_prompt_that_needs_chunks_waits_for_a_step_of_its_own():
    engine = LLM(device="cpu", max_num_batched_tokens=8, block_size=4)
    long_prompt = len(engine.tokenizer.encode(PROMPTS[1]))
    assert long_prompt > 8 - 1  # cannot ride beside one decoding sequence whole
    done, kinds = run_arrivals(engine, {0: [2], 2: [1]}, GREEDY)
    assert "mixed" not in kinds and kinds.count("prefill") >= 2
    assert done[1] == alone(engine, PROMPTS[1], GREEDY) and done[2] == alone(engine, PROMPTS[2], GREEDY)
    assert_idle(engine)


def test_a_mixed_step_takes_no_more_prompt_than_its_largest_graph_holds():
    engine = LLM(device="cpu")
    engine.scheduler.mixed_prompt_limit = (16, 1)  # as the runner says when its graphs hold (16 tokens, 1 prompt)
    lengths = [len(engine.tokenizer.encode(p)) for p in PROMPTS]
    assert lengths[2] <= 15 and lengths[0] <= 15 and lengths[1] > 16
    done, kinds = run_arrivals(engine, {0: [3], 2: [2, 0, 1]}, GREEDY)
    prompt_parts = [k for k in kinds[2:] if k != "decode"]
    assert prompt_parts[:2] == ["mixed", "mixed"]  # one prompt each
    assert "prefill" in prompt_parts  # the long prompt gets a step of its own
    for i in (0, 1, 2, 3):
        assert done[i] == alone(engine, PROMPTS[i], GREEDY)
    assert_idle(engine)


def test_a_full_batch_admits_prompts_a_few_at_a_time():
    """Seats free up one by one; a mixed step waits until MIN_MIXED_ADMISSION requests (or all that wait) can
    join, so prompts are not padded up to a bucket one at a time."""
    engine = LLM(device="cpu", max_num_seqs=32)
    lengths = [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True) for i in range(32)]
    for i in range(32):
        engine.add_request([5 + i, 6, 7], lengths[i])  # one seat frees per step from the third on
    late = [engine.add_request(PROMPTS[i % 5], GREEDY) for i in range(10)]
    admitted, outputs = [], {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
        info = engine.last_step
        if info.kind == "mixed":
            admitted.append(info.num_seqs - info.num_decode_seqs)
    assert sum(admitted) == 10 and all(n >= MIN_MIXED_ADMISSION for n in admitted[:-1])
    for i, request_id in enumerate(late):
        assert outputs[request_id].outputs[0].token_ids == alone(engine, PROMPTS[i % 5], GREEDY)
    assert_idle(engine)


def test_requests_that_need_their_tokens_on_the_host_are_not_mixed_in(llm):
    penalised = SamplingParams(temperature=0, max_tokens=6, presence_penalty=0.5, ignore_eos=True)
    llm.add_request(PROMPTS[0], GREEDY)
    llm.step()
    llm.step()
    request_id = llm.add_request(PROMPTS[1], penalised)  # admitted in a mixed step, but not overlapped after it
    outputs, kinds = {}, []
    while llm.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in llm.step() if o.finished)
        kinds.append(llm.last_step.kind)
    assert kinds[0] == "mixed"
    assert outputs[request_id].outputs[0].token_ids == alone(llm, PROMPTS[1], penalised)
    assert_idle(llm)


def test_staged_mixed_inputs_padded_to_a_bucket_compute_what_eager_mixed_computes():
    """What a captured mixed graph runs, run eagerly: decode rows padded to the bucket's decode rows, then the
    prompt rows and their padding, change nothing for the real rows."""
    engine = LLM(device="cpu", max_num_seqs=8, max_model_len=512, max_num_batched_tokens=512)
    runner, scheduler = engine.runner, engine.scheduler
    graphs = CudaGraphs(engine.model, engine.config)
    assert (4 + 256, 4 + 8, True, 4) in graphs.mixed_buckets
    assert (8 + 256, 8 + 8, True, 8) in graphs.mixed_buckets  # a full batch still takes in prompts
    for prompt in PROMPTS[:3]:
        engine.add_request(prompt, GREEDY)
    engine.step()
    engine.stepper.flush()
    for new in (PROMPTS[3:4], PROMPTS[4:] + PROMPTS[:1]):
        for prompt in new:
            engine.add_request(prompt, GREEDY)
        # nothing is in flight, so each decoding sequence's input is its last token on the host
        batch = scheduler.schedule_next()
        assert batch.is_prefill and batch.num_decode == len(batch.seqs) - len(new) > 0
        x = runner.prepare(batch)
        bucket = graphs.bucket(x)
        assert bucket.num_decode >= x.num_decode and bucket.num_tokens - bucket.num_decode >= 256
        graphs.output.fill_(float("nan"))
        graphs.host_words.view(torch.int32).fill_(-7777777)  # other buckets' words: every one is rewritten
        poison = {torch.int32: -7777777, torch.int64: graphs.host_words[0].item()}
        with torch.inference_mode():
            graphs.stage(bucket, x)
            assert all((v != poison[v.dtype]).all() for v in graphs.inputs[bucket].values())
            graphs.body(bucket)()
            staged = engine.model.compute_logits(graphs.output[torch.as_tensor(graphs.output_rows(bucket, x,
                                                                                                  x.logit_rows))])
        eager = runner.execute(x, eager=True)
        torch.testing.assert_close(staged, eager, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(staged).all() and staged.shape[0] == len(batch.seqs)
        out = engine.sampler(eager, batch.sample_seqs, engine.eos_token_ids)
        scheduler.postprocess(batch, out.token_ids, out.logprobs)
    engine._abort_all()
    assert_idle(engine)


def test_mixed_steps_run_the_numba_kernels_under_the_simulator():
    from pagedattention.kernels.runtime import kernels_available
    if not kernels_available("cpu"):
        pytest.skip("the Numba CUDA simulator is not enabled (a GPU machine runs the CUDA tests instead)")
    engine = LLM(device="cpu", attention_backend="numba")
    params = [SamplingParams(temperature=0.8, seed=5, max_tokens=n, ignore_eos=True) for n in (4, 2)]  # one-pass
    prompts = ["a", "Hi"]  # the simulator runs ~3,000 threads/s: short prompts
    first = engine.add_request(prompts[0], params[0])
    engine.step()
    engine.step()  # the first one's prefill, then its first decode step
    second = engine.add_request(prompts[1], params[1])  # beside its next decode step
    done, kinds = {}, []
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        kinds.append(engine.last_step.kind)
    assert kinds[0] == "mixed"
    # the tokens each gets alone (seeded), with torch's attention and the same one-pass sampler
    reference = LLM(device="cpu")
    reference.sampler = reference.stepper.sampler = Sampler("cpu", use_kernel=True)
    together = reference.generate(prompts, params, use_tqdm=False)
    assert [done[first], done[second]] == [o.outputs[0].token_ids for o in together]
    assert_idle(engine)
