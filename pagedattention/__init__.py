"""pagedattention: a compact PagedAttention inference engine."""

__version__ = "0.1.0"
