"""The LLM engine end to end on the embedded tiny model (CPU, fp32, torch reference attention).

Greedy decoding is deterministic, so a request's tokens must not depend on how it was scheduled: alone,
batched, chunked, preempted and recomputed, statically or continuously batched.
"""
import gc
from types import SimpleNamespace

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from pagedattention import LLM, CompletionOutput, RequestOutput, SamplingParams
from pagedattention.engine.cuda_graphs import CudaGraphs
from pagedattention.engine.sequence import Sequence
from pagedattention.models import ModelConfig
from pagedattention.models.tiny import TINY_CONFIG

PROMPTS = ["Hello, world", "The quick brown fox jumps over the lazy dog", "a", "PagedAttention " * 3,
           "0123456789" * 2]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: thread start-up costs more than the math, and the test machine's cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


@pytest.fixture(scope="module")
def reference(llm):
    """Each prompt's greedy tokens when it runs alone."""
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_idle(llm):
    """Nothing queued and every KV block back in the free list."""
    assert not llm.scheduler.has_unfinished()
    assert llm.manager.num_free_blocks == llm.manager.num_blocks
    assert len(llm.manager) == 0


def test_generate_returns_one_output_per_prompt_in_order(llm, reference):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == PROMPTS
    assert len({o.request_id for o in outputs}) == len(PROMPTS)
    for o, p in zip(outputs, PROMPTS):
        assert isinstance(o, RequestOutput) and o.finished
        assert o.prompt_token_ids == llm.tokenizer.encode(p)
        (c,) = o.outputs
        assert isinstance(c, CompletionOutput) and c.index == 0
        assert c.finish_reason == "length" and len(c.token_ids) == GREEDY.max_tokens
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.cumulative_logprob < 0 and c.error is None
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
        assert m.time_to_first_token == pytest.approx(m.first_token_time - m.arrival_time)
        assert m.time_per_output_token == pytest.approx((m.finish_time - m.first_token_time) / (GREEDY.max_tokens - 1))
    assert token_ids(outputs) == reference
    assert_idle(llm)


def test_greedy_tokens_are_the_same_alone_and_in_a_mixed_batch(llm, reference):
    mixed = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), SamplingParams(temperature=1.0, seed=3),
             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), SamplingParams(temperature=0.5, top_k=5),
             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    outputs = llm.generate(PROMPTS, mixed, use_tqdm=False)
    for i in (0, 2, 4):
        assert outputs[i].outputs[0].token_ids == reference[i]
    assert_idle(llm)


def test_greedy_tokens_survive_chunked_prefill(reference):
    chunked = LLM(device="cpu", max_num_batched_tokens=5, block_size=4)
    outputs = chunked.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == reference
    assert_idle(chunked)


def test_greedy_tokens_survive_preemption_and_recompute(reference):
    # 16 blocks of 4 tokens: each request fits alone (the longest needs 14), all five together do not
    tight = LLM(device="cpu", num_kv_blocks=16, block_size=4, max_num_batched_tokens=16, max_model_len=64)
    assert max(len(tight.tokenizer.encode(p)) for p in PROMPTS) + GREEDY.max_tokens <= 16 * 4
    outputs = tight.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert token_ids(outputs) == reference
    assert_idle(tight)


def test_static_and_continuous_batching_give_the_same_greedy_tokens():
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5, 12, 1)]
    outputs = {}
    for scheduling in ("continuous", "static"):
        engine = LLM(device="cpu", scheduling=scheduling, max_num_seqs=2)
        outputs[scheduling] = token_ids(engine.generate(PROMPTS, params, use_tqdm=False))
        assert_idle(engine)
    assert outputs["static"] == outputs["continuous"]
    assert [len(t) for t in outputs["static"]] == [3, 9, 5, 12, 1]


def test_prompt_forms(llm, reference):
    ids = llm.tokenizer.encode(PROMPTS[1])
    assert token_ids(llm.generate(ids, GREEDY, use_tqdm=False)) == [reference[1]]
    assert token_ids(llm.generate(tuple(np.array(ids)), GREEDY, use_tqdm=False)) == [reference[1]]
    assert token_ids(llm.generate([ids, PROMPTS[0]], GREEDY, use_tqdm=False)) == [reference[1], reference[0]]
    from_ids = llm.generate([ids], GREEDY, use_tqdm=False)[0]
    assert from_ids.prompt is None and from_ids.prompt_token_ids == ids
    assert llm.generate([], GREEDY, use_tqdm=False) == []
    default = llm.generate(PROMPTS[0], use_tqdm=False)[0].outputs[0]  # default SamplingParams: 16 tokens
    assert len(default.token_ids) == 16 or default.finish_reason == "stop"


@pytest.mark.parametrize("prompts,params,error,match", [
    ("", None, ValueError, "empty"),
    ([[]], None, ValueError, "empty"),
    (["fine", ""], None, ValueError, r"prompts\[1\] is empty"),
    ([[1, 2, 512]], None, ValueError, "outside the vocabulary"),
    ([[1, -1]], None, ValueError, "outside the vocabulary"),
    ([[1, 2.0]], None, TypeError, "int token ids"),
    ([[1, True]], None, TypeError, "int token ids"),
    (42, None, TypeError, "prompts must be"),
    ([b"bytes"], None, TypeError, r"prompts\[0\]"),
    ("x" * 5000, None, ValueError, "max_model_len"),
    (["a", "b"], [SamplingParams()], ValueError, "1 entries for 2 prompts"),
    (["a"], {"temperature": 0}, TypeError, "sampling_params"),
    (["a"], ["not params"], TypeError, r"sampling_params\[0\]"),
])
def test_bad_input_raises_before_anything_runs(llm, reference, prompts, params, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert_idle(llm)
    assert token_ids(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == reference[:2]


def test_bad_sampling_params_and_engine_arguments_are_rejected():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    for kwargs, error in [(dict(block_size=0), ValueError), (dict(max_num_seqs=1.5), TypeError),
                          (dict(gpu_memory_utilization=1.5), ValueError), (dict(scheduling="fifo"), ValueError),
                          (dict(attention_backend="triton"), ValueError), (dict(dtype="int8"), ValueError),
                          (dict(device="tpu"), ValueError), (dict(max_model_len=10_000), ValueError),
                          (dict(num_kv_blocks=0), ValueError), (dict(model=3), TypeError)]:
        with pytest.raises(error, match=next(iter(kwargs))):
            LLM(**{"device": "cpu", **kwargs})


def test_a_request_that_cannot_fit_alone_errors_and_the_others_complete(reference):
    # 8 blocks of 4 = 32 tokens; max_model_len is set above that on purpose
    small = LLM(device="cpu", num_kv_blocks=8, block_size=4, max_model_len=256)
    too_long_prompt = "z" * 40
    grows_too_long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    outputs = small.generate([PROMPTS[0], too_long_prompt, PROMPTS[2], PROMPTS[0]],
                             [GREEDY, GREEDY, GREEDY, grows_too_long], use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == reference[0]
    assert outputs[2].outputs[0].token_ids == reference[2]
    for o in (outputs[1], outputs[3]):
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "error" and "cannot fit" in c.error
    assert outputs[1].outputs[0].token_ids == []
    # the growing request kept what it generated before the cache ran out: a prefix of its greedy tokens
    grown = outputs[3].outputs[0].token_ids
    assert 12 < len(grown) < 100 and grown[:12] == reference[0]
    assert len(outputs[3].prompt_token_ids) + len(grown) == 32 + 1  # 32 slots, the last token never written
    assert_idle(small)


def test_an_error_during_a_step_leaves_the_engine_usable(reference, monkeypatch):
    engine = LLM(device="cpu")
    real_execute, calls = engine.runner.execute, []

    def failing_execute(x, eager=False):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_execute(x, eager)

    monkeypatch.setattr(engine.runner, "execute", failing_execute)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_idle(engine)
    assert token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [unseeded, seeded, unseeded], use_tqdm=False)
    other = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=8,
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again == batched[1].outputs[0].token_ids
    assert other != alone


def random_weight_llm(eos_token_id):
    """The tiny shape with another EOS: the engine takes a ModelConfig for random weights (seeded)."""
    config = ModelConfig(**{**TINY_CONFIG, "eos_token_id": eos_token_id})
    return LLM(config, device="cpu", seed=1)


def test_eos_stops_a_request_unless_ignored_and_min_tokens_delays_it():
    ids = [5, 100, 200, 300, 400]
    free_run = random_weight_llm(eos_token_id=None).generate(ids, GREEDY, use_tqdm=False)[0].outputs[0]
    assert free_run.text == ""  # no tokenizer with random weights
    eos = free_run.token_ids[2]
    first = free_run.token_ids.index(eos)
    engine = random_weight_llm(eos_token_id=eos)
    stopped = engine.generate(ids, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free_run.token_ids[:first + 1]
    ignored = engine.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == free_run.token_ids and ignored.finish_reason == "length"
    late = engine.generate(ids, SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2),
                           use_tqdm=False)[0].outputs[0]
    assert eos not in late.token_ids[:first + 2] and len(late.token_ids) >= first + 2
    assert_idle(engine)


def test_stop_token_ids_end_a_request_and_min_tokens_masks_them(llm, reference):
    stop = reference[1][3]
    first = reference[1].index(stop)
    c = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.token_ids == reference[1][:first + 1]
    c = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert stop not in c.token_ids[:first + 2] and len(c.token_ids) >= first + 2


def test_max_model_len_caps_prompt_plus_output():
    engine = LLM(device="cpu", max_model_len=20)
    c = engine.generate([[1] * 15], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 20], GREEDY, use_tqdm=False)


def test_numba_kernels_end_to_end_under_the_simulator(llm):
    try:
        from pagedattention.kernels import paged_attention, paged_prefill_attention, write_kv  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Numba kernels not importable yet: {e}")
    from pagedattention.kernels.runtime import kernels_available
    if not kernels_available("cpu"):
        pytest.skip("the Numba CUDA simulator is not enabled (a GPU machine runs the CUDA tests instead)")
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompts = ["Hi", "a"]  # the simulator runs ~3,000 threads/s: one prefill step and one decode step
    engine = LLM(device="cpu", attention_backend="numba")
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert token_ids(outputs) == token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert_idle(engine)


def greedy_sample_tokens(logits, params, splits=None, out=None):
    """The one-pass sampling kernel for greedy rows (temperature bits 0), in torch: the argmax and its
    log-probability, float32 [2, rows]."""
    assert not params[2].any()
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = logprobs.argmax(dim=-1)
    drawn = torch.stack([ids.float(), logprobs.gather(1, ids[:, None])[:, 0]])
    return drawn if out is None else out.copy_(drawn)


def test_an_engine_replaying_its_graphs_bodies_generates_what_the_plain_engine_generates(monkeypatch):
    """The engine loop through the CUDA graphs' path on the CPU, each graph's replay running its body: buckets,
    staging, padding, overlapped decode steps, mixed steps and the decode steps' sampler graphs give every request
    the plain engine's tokens and log-probabilities (the sampling kernel stood in for by torch, for greedy rows,
    in both engines)."""
    from pagedattention.kernels import sampling

    monkeypatch.setattr(sampling, "sample_tokens", greedy_sample_tokens)
    replays, sampled = [], []

    def run(with_graphs):
        engine = LLM(device="cpu", max_num_seqs=8, max_model_len=256)
        engine.sampler.use_kernel = True
        if with_graphs:  # what capturing would make (it needs a GPU), each replay running its body
            engine.runner.graphs = graphs = CudaGraphs(engine.model, engine.config)
            graphs.graphs = {b: SimpleNamespace(replay=lambda run=graphs.body(b), b=b: replays.append(b) or run())
                             for b in graphs.buckets}
            graphs.sampler_graphs = {b: SimpleNamespace(replay=lambda run=graphs.sampler_body(b): sampled.append(1)
                                                        or run()) for b in graphs.decode_buckets}
            engine.sampler.sample_in_graph = graphs.sample
            engine.scheduler.mixed_prompt_limit = engine.runner.mixed_prompt_limit
        ids, done, kinds, step = {}, {}, [], 0
        while step < 3 or engine.has_unfinished_requests():
            for p in {0: PROMPTS[:2], 2: PROMPTS[2:4], 3: PROMPTS[4:]}.get(step, []):
                ids[engine.add_request(p, GREEDY)] = p
            done.update((ids[o.request_id], (o.outputs[0].token_ids, o.outputs[0].cumulative_logprob))
                        for o in engine.step() if o.finished)
            kinds += [engine.last_step.kind] if engine.last_step.num_seqs else []  # (the last call only drains)
            step += 1
        assert_idle(engine)
        return done, kinds

    (plain, _), (graphed, kinds) = run(False), run(True)
    assert {p: tokens for p, (tokens, _) in graphed.items()} == {p: tokens for p, (tokens, _) in plain.items()}
    assert len(plain) == len(PROMPTS)  # and log-probabilities within float32 rounding (padded rows in the GEMMs):
    assert all(graphed[p][1] == pytest.approx(plain[p][1], rel=1e-5) for p in plain)
    assert {"decode", "mixed"} <= set(kinds)
    assert {b.is_prefill and b.num_decode > 0 for b in replays} == {True, False}  # mixed and other graphs ran
    assert len(sampled) == kinds.count("decode")  # every decode step sampled in its sampler graph


def test_each_bucket_stages_its_inputs_in_words_of_its_own():
    """One copy stages a step: a bucket's inputs lie side by side in the staging words, aligned, disjoint and
    within the words it copies; the words hold every bucket."""
    from pagedattention.engine.cuda_graphs import graph_buckets, input_layout, views

    for bucket in graph_buckets(256, 8192):
        layout, num_words = input_layout(bucket)
        words = torch.arange(num_words, dtype=torch.int64)
        inputs = views(words, layout)
        t, s, _, d = bucket
        assert [v.numel() for v in inputs.values()] == [t, t, t, s, s - d + 1]
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in inputs.values())
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # disjoint
        assert all(start % 16 == 0 for start, _ in spans) and spans[-1][1] <= words.data_ptr() + 8 * num_words
        assert spans[0][0] == words.data_ptr() and spans[-1][1] > words.data_ptr() + 8 * (num_words - 2)


def test_decode_steps_sample_in_their_bucket_graph_as_a_launch_would():
    """A decode bucket's sampler graph, run eagerly under the simulator: the step's params staged through two
    buffers in turn, padding rows greedy, and the step's rows drawn as a launch of the kernel on them draws; a
    Sampler reading the bucket-wide result gives what it gives without the graphs."""
    from pagedattention.engine.sampler import Sampler
    from pagedattention.kernels.runtime import kernels_available
    from pagedattention.kernels.sampling import sample_tokens, temperature_bits

    if not kernels_available("cpu"):
        pytest.skip("the Numba CUDA simulator is not enabled (a GPU machine runs the CUDA tests instead)")
    engine = LLM(device="cpu", max_num_seqs=8, max_model_len=128)
    graphs = CudaGraphs(engine.model, engine.config)  # capturing needs a GPU: each graph replays its body
    graphs.sampler_graphs = {b: SimpleNamespace(replay=graphs.sampler_body(b)) for b in graphs.decode_buckets}
    rng = np.random.default_rng(0)
    for rows, width in ((3, 4), (1, 1), (5, 8), (3, 4)):
        graphs.logits.copy_(torch.randn(graphs.logits.shape) * 3)
        params = np.array([rng.integers(0, 1 << 62, rows), rng.integers(0, 100, rows),
                           temperature_bits(rng.choice([0.0, 0.8], rows))], dtype=np.int64)
        graphs.drawn.fill_(float("nan"))
        drawn, host, event = graphs.sample(graphs.logits[:rows], params)
        assert drawn.shape == (2, width) and event is None  # (on a GPU: the event after the copy back)
        assert torch.equal(host, drawn.flatten())  # its copy on the host
        expected = sample_tokens(graphs.logits[:rows].clone(), torch.from_numpy(params))
        torch.testing.assert_close(drawn[:, :rows], expected, rtol=0, atol=0)
        assert drawn[0, rows:].long().tolist() == graphs.logits[rows:width].argmax(-1).tolist()  # padding: greedy
    assert graphs.sample(graphs.logits[1:3], params[:, :2]) is None  # not the graphs' first rows: a launch
    assert graphs.sample(graphs.logits[:3].clone(), params[:, :3]) is None

    seqs = [Sequence([1, 2, 3], SamplingParams(temperature=t, seed=seed, max_tokens=4))
            for t, seed in ((0.0, None), (0.9, None), (0.7, 11))]
    graphs.logits.copy_(torch.randn(graphs.logits.shape) * 3)
    outputs = []
    for hook in (None, graphs.sample):
        sampler = Sampler("cpu", seed=3, use_kernel=True)
        sampler.sample_in_graph = hook
        outputs.append(sampler(graphs.logits[:3], seqs, set()))  # the bucket of 4 rows: its padding row unread
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("whole_rows", [True, False])
def test_staged_decode_inputs_padded_to_a_bucket_compute_what_eager_decode_computes(whole_rows, monkeypatch):
    """What a captured CUDA graph runs, run eagerly: the graph body over the static buffers, with each
    step's inputs staged into its bucket's words (which hold other buckets' inputs too: every one is rewritten)
    and the bucket's remaining rows padded; the block tables copied as whole rows or packed."""
    from pagedattention.engine import cuda_graphs

    if not whole_rows:
        monkeypatch.setattr(cuda_graphs, "WHOLE_TABLE_ROWS_BYTES", 0)
    engine = LLM(device="cpu", max_num_seqs=8, max_model_len=128)
    runner = engine.runner
    graphs = CudaGraphs(engine.model, engine.config)  # buffers and bodies; capturing needs a GPU
    assert all((copies[2] is not None) == whole_rows for copies in graphs.copies.values())
    graphs.static_tables.fill_(-3)  # stale columns past a step's tables are never read
    for n, bucket in ((5, 8), (3, 4), (1, 1)):  # the buffers are reused by every bucket and every step
        for prompt in PROMPTS[:n]:
            engine.add_request(prompt, GREEDY)
        engine.step()  # prefill
        engine.stepper.flush()  # its tokens, which an overlapped step would leave on the device
        for _ in range(2):
            batch = engine.scheduler.schedule()
            assert not batch.is_prefill and len(batch.seqs) == n
            x = runner.prepare(batch)
            assert graphs.bucket(x) == (bucket, bucket, False, bucket)
            graphs.output.fill_(float("nan"))
            graphs.logits.fill_(float("nan"))
            graphs.host_words.view(torch.int32).fill_(-7777777)
            poison = {torch.int32: -7777777, torch.int64: graphs.host_words[0].item()}
            with torch.inference_mode():
                graphs.stage(graphs.bucket(x), x)
                inputs = graphs.inputs[graphs.bucket(x)]  # (a decode graph reads no cu_seqlens_q)
                assert all((v != poison[v.dtype]).all() for k, v in inputs.items() if k != "cu_seqlens_q")
                graphs.body(graphs.bucket(x))()
                staged = engine.model.compute_logits(graphs.output[:n])
            torch.testing.assert_close(staged, runner.execute(x, eager=True), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(graphs.logits[:n], staged, rtol=1e-5, atol=1e-5)  # the graph's LM head
            out = engine.sampler(staged, batch.sample_seqs, engine.eos_token_ids)
            engine.scheduler.postprocess(batch, out.token_ids, out.logprobs)
        engine._abort_all()
        assert_idle(engine)


def test_staged_prefill_inputs_padded_to_a_bucket_compute_what_eager_prefill_computes():
    """What a captured prefill graph runs, run eagerly: padding tokens that belong to no sequence and padding
    sequences with no tokens change nothing for the real ones; a step too big for every bucket runs eagerly."""
    engine = LLM(device="cpu", max_num_seqs=8, max_model_len=512, max_num_batched_tokens=256)
    runner = engine.runner
    graphs = CudaGraphs(engine.model, engine.config)
    assert graphs.prefill_buckets[0] == (128, 1, True, 0) and graphs.prefill_buckets[-1] == (256, 8, True, 0)
    # (prompts added, expected bucket): one short prompt; three; two of 177 tokens; a 361-token prompt, whose
    # second chunk (105 tokens from position 256) is the step after its first
    steps = (([PROMPTS[0]], (128, 1)), (PROMPTS[1:4:2] + PROMPTS[4:], (128, 4)),
             ([PROMPTS[1] * 4, PROMPTS[2]], (256, 2)), ([PROMPTS[3] * 8], (256, 1)), ([], (128, 1)))
    for prompts, bucket in steps:
        for prompt in prompts:
            engine.add_request(prompt, GREEDY)
        batch = engine.scheduler.schedule()
        assert batch.is_prefill and len(batch.seqs) == max(1, len(prompts))
        x = runner.prepare(batch)
        assert graphs.bucket(x) == (*bucket, True, 0)
        graphs.output.fill_(float("nan"))
        with torch.inference_mode():
            graphs.stage(graphs.bucket(x), x)
            graphs.body(graphs.bucket(x))()
            rows = x.logit_rows.tolist() or [x.num_tokens - 1]  # a mid-prompt chunk samples nothing
            staged = engine.model.compute_logits(graphs.output[rows])
            eager = engine.model.compute_logits(engine.model(*runner._to_device(x))[rows])
        torch.testing.assert_close(staged, eager, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(staged).all()
        out = engine.sampler(staged[:len(x.logit_rows)], batch.sample_seqs, engine.eos_token_ids)
        engine.scheduler.postprocess(batch, out.token_ids, out.logprobs)
        if len(x.logit_rows):  # not a chunk in mid-prompt: on to the next step's fresh prompts
            engine._abort_all()
    too_many_tokens = SimpleNamespace(is_prefill=True, num_tokens=257, num_seqs=1, num_decode=0)
    assert graphs.bucket(too_many_tokens) is None
    assert_idle(engine)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and KV sizing need a GPU")


@cuda
def test_cuda_graph_decode_recomputes_what_eager_decode_computes():
    engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3)
    graphs = engine.runner.graphs
    assert graphs is not None and [b.num_seqs for b in graphs.decode_buckets] == [1, 2, 4, 8]
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    seqs = [Sequence(ids, GREEDY) for ids in prompt_ids]
    for s in seqs:  # prefill each sequence, then stage one decode step by hand
        engine.scheduler.add(s)
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    engine.stepper.flush()  # the step left in flight
    batch = engine.scheduler.schedule()
    assert not batch.is_prefill and len(batch.seqs) == 5  # replays the bucket of 8 with 3 padding rows
    graph = engine.runner.run(batch).clone()
    eager = engine.runner.run(batch, eager=True)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    engine._abort_all()
    outputs = token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False))
    eager_engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3,
                       enforce_eager=True)
    assert outputs == token_ids(eager_engine.generate(PROMPTS, GREEDY, use_tqdm=False))


@cuda
def test_cuda_graph_prefill_recomputes_what_eager_prefill_computes():
    engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3)
    runner = engine.runner
    assert runner.graphs is not None and (128, 1, True, 0) in runner.graphs.graphs
    for prompt in PROMPTS[:3]:
        engine.scheduler.add(Sequence(engine.tokenizer.encode(prompt), GREEDY))
    batch = engine.scheduler.schedule()
    assert batch.is_prefill and len(batch.seqs) == 3  # replays the bucket (128 tokens, 4 sequences)
    graph = runner.run(batch).clone()
    eager = runner.run(batch, eager=True)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    engine._abort_all()


@cuda
def test_cuda_graph_mixed_step_recomputes_what_eager_mixed_step_computes():
    engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3)
    runner = engine.runner
    assert (4 + 256, 4 + 8, True, 4) in runner.graphs.graphs
    seqs = [Sequence(engine.tokenizer.encode(p), GREEDY) for p in PROMPTS[:3]]
    for s in seqs:
        engine.scheduler.add(s)
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    engine.stepper.flush()
    for p in PROMPTS[3:]:
        engine.scheduler.add(Sequence(engine.tokenizer.encode(p), GREEDY))
    batch = engine.scheduler.schedule_next()  # nothing in flight: the decode inputs are on the host
    assert batch.is_prefill and batch.num_decode == 3 and len(batch.seqs) == 5  # bucket: 4 decode rows + prompts
    graph = runner.run(batch).clone()
    eager = runner.run(batch, eager=True)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    engine._abort_all()

    def staggered(llm):
        ids, done, step = {}, {}, 0
        while step < 3 or llm.has_unfinished_requests():
            for p in {0: PROMPTS[:2], 2: PROMPTS[2:4], 3: PROMPTS[4:]}.get(step, []):
                ids[llm.add_request(p, GREEDY)] = p
            done.update((ids[o.request_id], o.outputs[0].token_ids) for o in llm.step() if o.finished)
            step += 1
        return done
    eager_engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3,
                       enforce_eager=True)
    assert staggered(engine) == staggered(eager_engine)


@cuda
def test_decode_steps_sample_in_captured_graphs_as_eager_steps_sample():
    """Seeded draws (keyed by seed and token count) and greedy rows: the same tokens whether decode steps sample
    in their buckets' sampler graphs or by launching the kernel."""
    prompts = PROMPTS + PROMPTS[:1]
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=12, ignore_eos=True)
              for seed in range(len(PROMPTS))] + [GREEDY]
    engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3)
    graphs = engine.runner.graphs
    assert set(graphs.sampler_graphs) == set(graphs.decode_buckets)
    in_graph, sample = [], engine.sampler.sample_in_graph
    engine.sampler.sample_in_graph = lambda logits, rows: in_graph.append(sample(logits, rows)) or in_graph[-1]
    outputs = token_ids(engine.generate(prompts, params, use_tqdm=False))
    assert sum(drawn is not None for drawn in in_graph) >= 10  # the decode steps'
    eager_engine = LLM(dtype="float32", max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3,
                       enforce_eager=True)
    assert eager_engine.sampler.sample_in_graph is None
    assert outputs == token_ids(eager_engine.generate(prompts, params, use_tqdm=False))


@cuda
def test_kv_cache_is_sized_from_free_memory():
    """The cache takes gpu_memory_utilization of the memory left after the (tiny) model: about 20% of what was
    free before (freed first: engines of earlier tests may still hold their caches)."""
    gc.collect()
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info()
    engine = LLM(max_num_seqs=8, gpu_memory_utilization=0.2, max_model_len=512)
    cache_bytes = engine.manager.num_blocks * engine.manager.bytes_per_block
    assert 0.15 * free_before < cache_bytes <= 0.21 * free_before
    assert engine.manager.key_caches[0].dtype == torch.bfloat16


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block_size=st.sampled_from([1, 2, 4, 8, 16]), cache_tokens=st.integers(16, 200),
       max_num_batched_tokens=st.integers(1, 64), max_num_seqs=st.integers(1, 6),
       scheduling=st.sampled_from(["continuous", "static"]),
       picks=st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1, max_size=8))
def test_any_schedule_gives_each_request_its_greedy_tokens(reference, block_size, cache_tokens,
                                                           max_num_batched_tokens, max_num_seqs, scheduling, picks):
    """Whatever the cache size, token budget and batch cap: a request that fits alone in the cache gets
    exactly its greedy tokens; one that does not ends with "error" after a prefix of them; no block leaks."""
    num_kv_blocks = max(1, cache_tokens // block_size)
    engine = LLM(device="cpu", block_size=block_size, num_kv_blocks=num_kv_blocks, max_model_len=512,
                 max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, scheduling=scheduling)
    outputs = engine.generate([PROMPTS[i] for i in picks], GREEDY, use_tqdm=False)
    for i, o in zip(picks, outputs):
        c = o.outputs[0]
        slots_needed = len(o.prompt_token_ids) + GREEDY.max_tokens - 1  # the last token is never stored
        if slots_needed <= num_kv_blocks * block_size:
            assert c.finish_reason == "length" and c.token_ids == reference[i]
        else:
            assert c.finish_reason == "error" and c.token_ids == reference[i][:len(c.token_ids)]
    assert_idle(engine)
