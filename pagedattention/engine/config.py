"""Every engine knob in one place, checked once; "auto" values are resolved against the machine."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class EngineConfig:
    model: object = None                 # checkpoint directory, a ModelConfig (random weights), or None = tiny
    dtype: str | torch.dtype = "auto"    # auto: bf16 on CUDA (fp16 before sm_80), fp32 on CPU
    device: str | torch.device = "auto"  # auto: cuda if available
    block_size: int = 16
    gpu_memory_utilization: float = 0.9  # share of the memory left after weights + activations given to KV
    num_kv_blocks: int | None = None     # fixed KV cache size in blocks (skips the memory measurement)
    max_num_seqs: int = 256              # sequences in a batch at most
    max_num_batched_tokens: int = 8192   # tokens per prefill step at most (longer prompts go in chunks)
    max_model_len: int | None = None     # prompt + output tokens at most; default: the model's limit
    attention_backend: str = "auto"      # "numba" (CUDA kernels) or "torch" (reference ops); auto by device
    enforce_eager: bool = False          # no CUDA graphs for decode
    seed: int = 0
    scheduling: str = "continuous"       # or "static": fixed batches, no admission until a batch ends
    enable_prefix_caching: bool = False  # reuse the KV blocks of earlier prompts' equal prefixes
    cpu_threads: int | None = None       # torch threads on a CPU; None: 1 for the embedded tiny model, else torch's
    tensor_parallel_size: int = 1        # processes the model is split over (one GPU each), engine/distributed.py

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_int(name, getattr(self, name))
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, minimum=2)
        _check_int("seed", self.seed, minimum=-(2 ** 63))
        if self.seed > 2 ** 64 - 1:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if self.cpu_threads is not None:
            _check_int("cpu_threads", self.cpu_threads)
        _check_int("tensor_parallel_size", self.tensor_parallel_size)
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float)):
            raise TypeError(f"gpu_memory_utilization must be a float, got {type(self.gpu_memory_utilization).__name__}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {self.scheduling!r}")
        if self.attention_backend not in ("auto", "numba", "torch"):
            raise ValueError(f"attention_backend must be 'auto', 'numba' or 'torch', got {self.attention_backend!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be a bool, got {type(self.enable_prefix_caching).__name__}")
        if not isinstance(self.enforce_eager, bool):
            raise TypeError(f"enforce_eager must be a bool, got {type(self.enforce_eager).__name__}")
        self._built_max_num_seqs = self.max_num_seqs
        self.device = self._resolve_device(self.device)
        if self.device.type == "cuda" and self.tensor_parallel_size > 1:
            first, count = self.device.index or 0, torch.cuda.device_count()
            if first + self.tensor_parallel_size > count:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs GPUs cuda:{first} to "
                                 f"cuda:{first + self.tensor_parallel_size - 1}; torch sees {count}")
        self.dtype = self._resolve_dtype(self.dtype)
        if self.attention_backend == "auto":
            self.attention_backend = "numba" if self.device.type == "cuda" else "torch"
        if self.attention_backend == "numba" and self.device.type == "cpu":
            from pagedattention.kernels.runtime import simulator_enabled
            if not simulator_enabled():
                raise ValueError("attention_backend='numba' on the CPU runs the kernels in Numba's CUDA simulator: "
                                 "set NUMBA_ENABLE_CUDASIM=1 before numba is imported, or use 'torch'")

    def set_model_limits(self, model_config) -> None:
        """``max_model_len`` against the model's limit; None becomes the model's limit (the KV cache may lower
        it later, ``cap_max_model_len``)."""
        limit = model_config.max_position_embeddings
        self._max_model_len_asked = self.max_model_len is not None
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}")
        if self.max_model_len is None:
            self.max_model_len = limit

    def cap_max_model_len(self, num_kv_blocks: int) -> bool:
        """Unless asked for, no longer than the cache holds (a longer request could never finish); True when
        that lowered it."""
        cache_tokens = num_kv_blocks * self.block_size
        if self._max_model_len_asked or self.max_model_len <= cache_tokens:
            return False
        self.max_model_len = cache_tokens
        return True

    def set_scheduling(self, scheduling: str | None, max_num_seqs: int | None) -> None:
        if scheduling is not None and scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling must be 'continuous' or 'static', got {scheduling!r}")
        if max_num_seqs is not None:
            _check_int("max_num_seqs", max_num_seqs)
            if max_num_seqs > self._built_max_num_seqs:
                raise ValueError(f"max_num_seqs={max_num_seqs} exceeds the {self._built_max_num_seqs} the engine "
                                 "was built with (its CUDA graphs stop there); build a new LLM for more")
            self.max_num_seqs = max_num_seqs
        if scheduling is not None:
            self.scheduling = scheduling

    @staticmethod
    def _resolve_device(device) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU")
        return device

    def _resolve_dtype(self, dtype) -> torch.dtype:
        if dtype == "auto":
            if self.device.type != "cuda":
                return torch.float32
            # the kernels' bf16 path needs sm_80+ bf16 arithmetic; older cards get fp16
            return torch.bfloat16 if torch.cuda.get_device_capability(self.device) >= (8, 0) else torch.float16
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
            return DTYPES[dtype]
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
        return dtype
