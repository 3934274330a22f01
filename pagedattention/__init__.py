"""pagedattention: a compact PagedAttention inference engine."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    # torch and the engine load on first use, so `import pagedattention` (and the CLI's --help) stays fast
    if name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'pagedattention' has no attribute {name!r}")
