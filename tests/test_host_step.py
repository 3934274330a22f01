"""benchmarks/host_step.py: the engine's host time per decode step, with the model and the sampling kernel
replaced, keeps every sequence running through the timed steps and leaves the sampling kernel in place."""
import benchmarks.host_step as host_step
from pagedattention.kernels import sampling


def test_host_step_times_decode_steps_at_the_asked_batch():
    real = sampling.sample_tokens
    walls, cpus = host_step.host_ms_per_step(batch=3, steps=5, repeats=2)
    assert len(walls) == len(cpus) == 2 and all(t > 0 for t in walls + cpus)
    assert sampling.sample_tokens is real


def test_a_workload_runs_the_steps_the_real_model_would():
    """Outputs end by length, so the schedule does not depend on the tokens: with the model and the sampling
    kernel replaced, a request set takes the same prefill, mixed and decode steps as with the tiny model."""
    from benchmarks import workloads

    llm = host_step.workload_engine(cap=16)
    w = workloads.make_workload("W3", tiny=True, vocab_size=llm.model_config.vocab_size)
    kinds = {"prefill": 0, "mixed": 0, "decode": 0}
    for prompt, params in zip(w.prompts, w.sampling_params(0.6)):
        llm.add_request(prompt, params)
    while llm.has_unfinished_requests():
        llm.step()
        if llm.last_step.num_seqs:
            kinds[llm.last_step.kind] += 1
    assert kinds["mixed"] > 0 and kinds["decode"] > 0

    real = sampling.sample_tokens
    replayed = host_step.host_seconds_of_workload("W3", cap=16, tiny=True)
    assert {kind: k["steps"] for kind, k in replayed["kinds"].items()} == kinds
    assert replayed["cpu_s"] > 0 and sampling.sample_tokens is real
