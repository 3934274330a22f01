"""The scheduling policy, driven with a fake model: no forward pass, only the scheduler and the block manager.

A fake step "samples" token 7 for every sequence that samples, so each test can follow exactly which
sequences run, how many tokens each is given, and who is preempted.
"""
import torch

from pagedattention.engine.sampling_params import SamplingParams
from pagedattention.engine.config import EngineConfig
from pagedattention.engine.scheduler import Scheduler
from pagedattention.engine.sequence import Sequence, SequenceStatus
from pagedattention.memory import PagedAttentionManager

BLOCK = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024,
                   scheduling="continuous"):
    manager = PagedAttentionManager(num_blocks, BLOCK, num_layers=1, num_kv_heads=1, head_dim=2,
                                    dtype=torch.float32, device="cpu")
    config = EngineConfig(device="cpu", block_size=BLOCK, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                          scheduling=scheduling)
    return Scheduler(config, manager, eos_token_ids={0})


def seq(prompt_len, max_tokens=100, **params):
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=max_tokens, **params))


def fake_step(scheduler, token=7):
    """Schedule and finish one step as if the model sampled ``token`` for every sampling sequence."""
    batch = scheduler.schedule()
    n = len(batch.sample_seqs)
    plan = [(s, s.num_scheduled_tokens) for s in batch.seqs]
    scheduler.postprocess(batch, [token] * n, [0.0] * n)
    return batch.is_prefill, plan


def run_to_end(scheduler, max_steps=10_000):
    steps = []
    while scheduler.has_unfinished():
        steps.append(fake_step(scheduler))
        assert len(steps) < max_steps, "scheduler did not finish"
    return steps


def blocks_held(scheduler):
    return scheduler.manager.num_blocks - scheduler.manager.num_free_blocks


def test_admission_stops_at_the_token_budget_and_keeps_later_prompts_whole():
    """Prompts are admitted whole while they fit; the next waits for a step of its own (prompts go before
    decoding), so a step leaves no prompt part-way and the engine can plan the next one while it runs."""
    s = make_scheduler(max_num_batched_tokens=12)
    a, b, c = seq(5), seq(5), seq(5)
    for x in (a, b, c):
        s.add(x)
    is_prefill, plan = fake_step(s)
    assert is_prefill and plan == [(a, 5), (b, 5)]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0
    assert a.output_token_ids == [7] and b.output_token_ids == [7]
    is_prefill, plan = fake_step(s)
    assert is_prefill and plan == [(c, 5)]
    is_prefill, plan = fake_step(s)
    assert not is_prefill and [x for x, _ in plan] == [a, b, c] and all(n == 1 for _, n in plan)


def test_only_a_steps_first_prompt_is_cut_to_the_budget():
    """A prompt first in its step takes what the budget allows and continues first in the next step, where
    later prompts join it only whole; its whole prompt is reserved at admission."""
    s = make_scheduler(max_num_batched_tokens=12)
    x, y, z = seq(15), seq(5), seq(5)
    for q in (x, y, z):
        s.add(q)
    is_prefill, plan = fake_step(s)
    assert is_prefill and plan == [(x, 12)]
    assert s.manager.context_len(x.seq_id) == 15 and x.num_computed_tokens == 12 and x.output_token_ids == []
    is_prefill, plan = fake_step(s)
    assert is_prefill and plan == [(x, 3), (y, 5)]  # z (5 more) would pass the budget: it waits
    assert x.output_token_ids == [7] and y.output_token_ids == [7] and z.status is SequenceStatus.WAITING
    is_prefill, plan = fake_step(s)
    assert is_prefill and plan == [(z, 5)]
    is_prefill, plan = fake_step(s)
    assert not is_prefill and [q for q, _ in plan] == [x, y, z]


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_and_samples_once():
    s = make_scheduler(max_num_batched_tokens=8)
    x = seq(21, max_tokens=2)
    s.add(x)
    steps = run_to_end(s)
    assert steps == [(True, [(x, 8)]), (True, [(x, 8)]), (True, [(x, 5)]), (False, [(x, 1)])]
    assert x.output_token_ids == [7, 7] and x.finish_reason == "length"
    assert blocks_held(s) == 0


def test_admission_respects_max_num_seqs():
    s = make_scheduler(max_num_seqs=2)
    seqs = [seq(3, max_tokens=2) for _ in range(5)]
    for x in seqs:
        s.add(x)
    _, plan = fake_step(s)
    assert [x for x, _ in plan] == seqs[:2]
    assert len(s.running) == 2 and list(s.waiting) == seqs[2:]
    run_to_end(s)
    assert all(x.finish_reason == "length" for x in seqs)


def test_admission_waits_for_blocks_in_arrival_order():
    s = make_scheduler(num_blocks=4)     # 16 slots
    big, small = seq(12, max_tokens=2), seq(3, max_tokens=2)
    first = seq(8, max_tokens=2)
    for x in (first, big, small):
        s.add(x)
    _, plan = fake_step(s)
    # `first` takes 2 blocks; `big` needs 3 of the 2 left, so it waits, and `small` does not jump it
    assert [x for x, _ in plan] == [first]
    assert list(s.waiting) == [big, small]
    run_to_end(s)
    assert [x.finish_reason for x in (first, big, small)] == ["length"] * 3
    assert blocks_held(s) == 0


def test_finished_sequences_leave_at_once_and_free_their_blocks():
    s = make_scheduler()
    short, long = seq(4, max_tokens=1), seq(4, max_tokens=5)
    s.add(short)
    s.add(long)
    fake_step(s)  # the prefill samples short's only token
    assert short.is_finished and short.finish_reason == "length"
    assert not s.manager.has_sequence(short.seq_id)
    assert list(s.running) == [long]
    assert s.finished == [short]


def test_stop_tokens_and_min_tokens():
    s = make_scheduler()
    eos, stop = seq(3, max_tokens=9), seq(3, max_tokens=9, stop_token_ids=[7])
    ignore = seq(3, max_tokens=4, ignore_eos=True)
    late = seq(3, max_tokens=9, min_tokens=3)
    for x in (eos, stop, ignore, late):
        s.add(x)
    while s.has_unfinished():
        batch = s.schedule()
        tokens = [0 if x is not stop else 7 for x in batch.sample_seqs]  # 0 is EOS
        s.postprocess(batch, tokens, [0.0] * len(tokens))
    assert eos.output_token_ids == [0] and eos.finish_reason == "stop"
    assert stop.output_token_ids == [7] and stop.finish_reason == "stop"
    assert ignore.output_token_ids == [0] * 4 and ignore.finish_reason == "length"
    assert late.output_token_ids == [0] * 3 and late.finish_reason == "stop"


def test_max_model_len_ends_a_request():
    s = make_scheduler(max_model_len=10)
    x = seq(6, max_tokens=100)
    s.add(x)
    run_to_end(s)
    assert len(x) == 10 and x.finish_reason == "length"


def test_decode_preempts_the_most_recently_admitted_sequence():
    # 4 blocks of 4 slots; four 4-token prompts fill one block each, so every first decode (position 4)
    # needs a fresh block and none is free
    s = make_scheduler(num_blocks=4)
    a, b, c, d = (seq(4, max_tokens=6) for _ in range(4))
    for x in (a, b, c, d):
        s.add(x)
    fake_step(s)  # prefill all four
    assert s.manager.num_free_blocks == 0
    is_prefill, plan = fake_step(s)
    assert not is_prefill
    # a's block comes from d (the newest), b's from c; the older ones decode
    assert [x for x, _ in plan] == [a, b]
    assert c.status is d.status is SequenceStatus.WAITING
    # preempted sequences wait at the front, still in admission order, holding no blocks
    assert list(s.waiting) == [c, d]
    assert s.num_preemptions == 2 and c.num_preemptions == d.num_preemptions == 1
    assert not s.manager.has_sequence(c.seq_id) and not s.manager.has_sequence(d.seq_id)
    assert c.num_computed_tokens == 0 and c.output_token_ids == [7]


def test_preempted_sequence_is_recomputed_from_prompt_and_generated_tokens():
    s = make_scheduler(num_blocks=6)
    a, b = seq(7, max_tokens=10), seq(7, max_tokens=10)
    s.add(a)
    s.add(b)
    while b.num_preemptions == 0:
        fake_step(s)
    assert b.status is SequenceStatus.WAITING
    generated = b.num_output_tokens
    assert generated >= 1
    # b comes back when a has finished and its recompute prefill covers prompt + generated tokens
    steps = run_to_end(s)
    recompute = [plan for is_prefill, plan in steps if is_prefill and plan and plan[0][0] is b]
    assert recompute and sum(n for _, n in [p[0] for p in recompute]) == 7 + generated
    assert a.finish_reason == b.finish_reason == "length"
    assert b.num_output_tokens == 10
    assert blocks_held(s) == 0


def test_a_sequence_that_outgrows_the_whole_cache_errors_instead_of_preempting_itself_forever():
    s = make_scheduler(num_blocks=3)  # 12 slots
    x = seq(5, max_tokens=50)
    s.add(x)
    steps = run_to_end(s, max_steps=100)
    assert x.finish_reason == "error" and "cannot fit" in x.error
    assert x.output_token_ids == [7] * 8  # it ran as far as the cache allowed: 12 tokens, the last unwritten
    assert x.num_preemptions == 0 and len(steps) < 20
    assert blocks_held(s) == 0


def test_a_prompt_larger_than_the_cache_errors_and_the_others_run():
    s = make_scheduler(num_blocks=3)
    ok1, huge, ok2 = seq(3, max_tokens=2), seq(13), seq(4, max_tokens=2)
    for x in (ok1, huge, ok2):
        s.add(x)
    run_to_end(s)
    assert huge.finish_reason == "error" and "13 tokens" in huge.error and huge.output_token_ids == []
    assert ok1.finish_reason == ok2.finish_reason == "length"
    assert blocks_held(s) == 0


def test_static_batching_admits_nothing_until_the_batch_has_finished():
    s = make_scheduler(max_num_seqs=2, scheduling="static")
    a, b, c = seq(3, max_tokens=1), seq(3, max_tokens=4), seq(3, max_tokens=1)
    for x in (a, b, c):
        s.add(x)
    _, plan = fake_step(s)
    assert [x for x, _ in plan] == [a, b]
    assert a.is_finished
    # a's slot is free, but c must wait for b (the batch's longest request)
    while not b.is_finished:
        _, plan = fake_step(s)
        assert c not in [x for x, _ in plan]
    _, plan = fake_step(s)
    assert [x for x, _ in plan] == [c]
    run_to_end(s)
    # the next batch is a full one again
    d, e, f = seq(3, max_tokens=2), seq(3, max_tokens=2), seq(3, max_tokens=2)
    for x in (d, e, f):
        s.add(x)
    _, plan = fake_step(s)
    assert [x for x, _ in plan] == [d, e]


def test_continuous_batching_admits_into_a_free_slot_at_once():
    s = make_scheduler(max_num_seqs=2)
    a, b, c = seq(3, max_tokens=1), seq(3, max_tokens=4), seq(3, max_tokens=1)
    for x in (a, b, c):
        s.add(x)
    fake_step(s)
    assert a.is_finished
    _, plan = fake_step(s)
    assert [x for x, _ in plan] == [c]
