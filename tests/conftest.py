"""Test set-up: kernels run in Numba's CUDA simulator when no GPU is present.

The environment variable must be set before ``numba.cuda`` is first imported, hence here.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    # The simulator runs a block's threads as Python threads that meet at barriers (syncthreads, the shuffle
    # shims): with the default 5 ms between GIL hand-offs a barrier of 32 threads costs tens of ms.
    sys.setswitchinterval(1e-4)

from hypothesis import HealthCheck, settings  # noqa: E402

import sim_shims  # noqa: E402  (warp shuffles for the simulator; a no-op on a GPU)

sim_shims.install()

# "ci" runs enough examples to matter in a few minutes; "long" is for soak runs:
#   HYPOTHESIS_PROFILE=long pytest
settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(session, config, items):
    """The sm_90 compile check (test_compile.py) goes last, and its compiler starts now in a subprocess, so
    the minutes it takes overlap the rest of the suite instead of adding to it."""
    compile_items = [item for item in items if item.path.name == "test_compile.py"]
    if compile_items:
        items[:] = [item for item in items if item.path.name != "test_compile.py"] + compile_items
        import test_compile

        test_compile.start_compiling()


def pytest_sessionfinish(session, exitstatus):
    test_compile = sys.modules.get("test_compile")
    if test_compile is not None:
        test_compile.stop_compiling()
