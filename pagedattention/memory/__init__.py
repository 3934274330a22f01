"""KV-cache memory: the block allocator (C++ via ctypes, and its Python reference) and the manager that
owns the paged caches, the block tables and copy-on-write."""
from .block_manager import BlockManager
from .errors import BlockManagerError, InvalidBlockError, OutOfBlocksError
from .paged_attention_manager import MemoryStats, PagedAttentionManager
from .reference import ReferenceBlockManager

__all__ = ["BlockManager", "BlockManagerError", "InvalidBlockError", "MemoryStats", "OutOfBlocksError",
           "PagedAttentionManager", "ReferenceBlockManager"]
