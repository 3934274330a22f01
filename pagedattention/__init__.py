"""pagedattention: a compact PagedAttention inference engine."""

__version__ = "0.1.0"

_ENGINE_NAMES = ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "BeamSearchParams",
                 "BeamSearchOutput", "BeamSearchSequence")
__all__ = [*_ENGINE_NAMES, "__version__"]


def __getattr__(name):
    # torch and the engine load on first use, so `import pagedattention` (and the CLI's --help) stays fast
    if name in _ENGINE_NAMES:
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'pagedattention' has no attribute {name!r}")
