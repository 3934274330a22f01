"""The engine: sequences, the scheduler, the sampler, the model runner and the ``LLM`` API."""
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .llm import LLM
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .stats import EngineStats

__all__ = ["LLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "CompletionOutput", "EngineStats",
           "RequestMetrics", "RequestOutput", "SamplingParams"]
