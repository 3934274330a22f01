// C API of the KV-cache block allocator (loaded from Python with ctypes; see block_manager.py).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Every call that can fail returns one of these; no C++ exception ever crosses this boundary.
enum {
    BM_OK = 0,
    BM_ERR_OUT_OF_BLOCKS = -1,     // allocate(n) with fewer than n free blocks
    BM_ERR_INVALID_BLOCK = -2,     // id out of range, or incref/decref of a free block
    BM_ERR_INVALID_ARGUMENT = -3,  // null handle/pointer or negative count
    BM_ERR_REF_OVERFLOW = -4,      // a ref count would pass INT32_MAX
};

typedef struct BlockManager BlockManager;

// NULL when num_blocks is not positive or memory runs out.
BlockManager* bm_create(int32_t num_blocks);
// Frees the manager, its mutex included: no other call on bm may be running or start afterwards (the
// caller must wait for calls in flight; block_manager.py's close() does).
void bm_destroy(BlockManager* bm);

// Takes n blocks off the free list, all or nothing; each gets ref count 1. out_ids has room for n.
// *out_num_free (if not NULL) receives the free count seen by this call, success or not.
int bm_allocate(BlockManager* bm, int32_t n, int32_t* out_ids, int32_t* out_num_free);
// Adds one reference per entry of ids (an id may repeat); every id must be in use.
int bm_incref(BlockManager* bm, const int32_t* ids, int32_t n);
// Drops one reference per entry of ids (an id may repeat, at most its count times). Blocks that
// reach 0 go to the back of the free list and are written to out_freed (room for n), in the order
// they became free; their number to *out_num_freed.
int bm_decref(BlockManager* bm, const int32_t* ids, int32_t n, int32_t* out_freed, int32_t* out_num_freed);
// The block's ref count (0 = free), or BM_ERR_INVALID_BLOCK / BM_ERR_INVALID_ARGUMENT.
int32_t bm_ref_count(BlockManager* bm, int32_t id);
int32_t bm_num_free(BlockManager* bm);
int32_t bm_num_blocks(BlockManager* bm);

#ifdef __cplusplus
}
#endif
