"""Where Numba kernels run, and how torch tensors reach them.

Two execution modes share every kernel's source:
- the GPU: torch CUDA tensors are wrapped zero-copy (``__cuda_array_interface__``) and kernels launch on
  torch's current stream, so they order correctly with torch ops and are captured by ``torch.cuda.graph``;
- Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before ``numba.cuda`` is first imported): CPU
  tensors are passed as numpy views of the same memory, so the kernel's writes land in the tensor.
"""
from __future__ import annotations

import functools
import os

import torch


def simulator_enabled() -> bool:
    """True when Numba runs kernels in its CPU simulator (CI and machines without a GPU)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


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
