"""Where Numba kernels run, and how torch tensors reach them.

Two execution modes share every kernel's source:
- the GPU: torch CUDA tensors are wrapped zero-copy (``__cuda_array_interface__``) and kernels launch on
  torch's current stream, so they order correctly with torch ops and are captured by ``torch.cuda.graph``;
- Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before ``numba.cuda`` is first imported): CPU
  tensors are passed as numpy views of the same memory, so the kernel's writes land in the tensor.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings

import numpy as np
import torch


def simulator_enabled() -> bool:
    """True when Numba runs kernels in its CPU simulator (CI and machines without a GPU)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def nvvm_inlined(fn):
    """``fn`` as a device function that NVVM inlines into each kernel calling it, with fast math like the kernels
    (a device function compiled apart from its kernel does not inherit the kernel's). Numba's own inlining,
    ``inline=True``, copies the function's IR into every call site: the sampler, with its hundreds of calls,
    took one to two minutes to compile that way, and seconds this way. The simulator takes neither option."""
    from numba import cuda

    if simulator_enabled():
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True, fastmath=True)(fn)


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Numba kernels can run on tensors of ``device``."""
    device = torch.device(device) if device is not None else None
    if simulator_enabled():
        return device is None or device.type == "cpu"
    return torch.cuda.is_available() and (device is None or device.type == "cuda")


@functools.lru_cache(maxsize=None)
def _external_stream(handle: int):
    from numba import cuda

    return cuda.external_stream(handle)


def current_stream():
    """The stream to launch on: torch's current stream (0 under the simulator)."""
    if simulator_enabled():
        return 0
    handle = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    return _external_stream(handle)


def as_kernel_array(t: torch.Tensor):
    """A zero-copy view of ``t`` that a Numba kernel can read and write.

    bf16 has no numpy dtype, so it travels as int16 bits (the kernels convert).
    """
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if simulator_enabled():
        if t.is_cuda:
            raise ValueError("under the CUDA simulator kernels take CPU tensors")
        return t.detach().numpy()
    from numba import cuda

    return cuda.as_cuda_array(t.detach())


# Launching with little host work. Numba's launch path (argument typing, overload lookup, per-argument conversion,
# a fresh launch configuration and stream wrapper) and the wrapping of each torch tensor as a device array take
# longer on the host than a short kernel runs on the GPU. Kernels whose arguments are all scalars (tensors
# passed as ``data_ptr()`` addresses) are launched through Numba once, which compiles them, and from then on
# directly through cuda.core with cached launch configurations.
_compiled: dict = {}   # (kernel, device index) -> cuda.core kernel handle, or None: launch through Numba


@functools.lru_cache(maxsize=None)
def _core_stream(handle: int):
    from cuda.core import Stream

    return Stream.from_handle(handle)


@functools.lru_cache(maxsize=None)
def _launch_config(grid: tuple, threads: int):
    from cuda.core import LaunchConfig

    return LaunchConfig(grid=grid, block=threads)


def _c_scalar(value):
    """The C type Numba compiled the argument as: Python ints are int64, np.float32 is float."""
    if isinstance(value, np.float32):
        return ctypes.c_float(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return ctypes.c_int64(int(value))
    raise TypeError(f"direct launches take ints and np.float32 only, got {type(value).__name__}")


def launch(kernel, grid: tuple, threads: int, *args) -> None:
    """``kernel[grid, threads, current stream](*args)`` for a kernel of int64 / float32 scalar arguments, on
    torch's current stream (so it is ordered with torch's work and captured by ``torch.cuda.graph``)."""
    if simulator_enabled():
        kernel[grid, threads, current_stream()](*args)
        return
    device = torch.cuda.current_device()
    key = (kernel, device)
    handle = _compiled.get(key)
    if handle is not None:
        try:
            from cuda.core import launch as core_launch

            core_launch(_core_stream(torch._C._cuda_getCurrentRawStream(device)), _launch_config(grid, threads),
                        handle, *[_c_scalar(a) for a in args])
            return
        except Exception as e:  # an incompatible cuda.core: launch through Numba from now on
            warnings.warn(f"direct launch failed ({e!r}); launching through Numba", RuntimeWarning)
            _compiled[key] = None
    kernel[grid, threads, current_stream()](*args)   # compiles on first use
    if key not in _compiled and len(kernel.overloads) == 1:
        (overload,) = kernel.overloads.values()
        try:
            _compiled[key] = overload._codelibrary.get_cufunc().kernel
        except AttributeError:  # another Numba layout: keep launching through Numba
            _compiled[key] = None
