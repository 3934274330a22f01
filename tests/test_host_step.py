"""benchmarks/host_step.py: the engine's host time per decode step, with the model and the sampling kernel
replaced, keeps every sequence running through the timed steps and leaves the sampling kernel in place."""
import benchmarks.host_step as host_step
from pagedattention.kernels import sampling


def test_host_step_times_decode_steps_at_the_asked_batch():
    real = sampling.sample_tokens
    walls, cpus = host_step.host_ms_per_step(batch=3, steps=5, repeats=2)
    assert len(walls) == len(cpus) == 2 and all(t > 0 for t in walls + cpus)
    assert sampling.sample_tokens is real
