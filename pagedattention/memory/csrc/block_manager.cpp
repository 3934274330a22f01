// The KV-cache block allocator: which physical blocks are free, and how many owners each used one has.
//
// Ref counts. A block is owned by every block table that lists it (and by anyone else who took a
// reference, e.g. a prefix cache). ref_count[id] is the number of owners: allocate() hands a block out
// with count 1, fork and prefix sharing add owners with incref(), and decref() removes them. A block
// whose count drops to 0 has no owner left and goes back to the free list. So at every moment:
//     ref_count[id] == 0  <=>  id is on the free list,    num_free + num_used == num_blocks.
//
// Free list. A FIFO ring buffer holding exactly the free ids: decref() pushes freed blocks at the back
// and allocate() pops from the front, so the block that has been free the longest is reused first
// (a freed block's contents stay valid the longest, which is what a prefix cache wants). The ring has
// room for every block, so nothing is allocated after bm_create() and no call can fail halfway.
//
// All-or-nothing. Each call checks its whole batch before it commits: allocate() compares n with the
// free count; incref()/decref() apply the batch one entry at a time and undo the entries already
// applied when one is invalid, which also checks a batch that names the same block twice against
// its actual count. A failed call leaves the manager exactly as it found it.
//
// Threads. One std::mutex guards all state; every entry point holds it for its whole duration.
// bm_destroy() is the exception: it deletes the mutex too, so the caller must make sure no other call
// is in flight (block_manager.py's close() waits for them).
#include "block_manager.h"

#include <climits>
#include <mutex>
#include <new>
#include <vector>

struct BlockManager {
    explicit BlockManager(int32_t n) : ref_count(n, 0), free_ring(n), num_blocks(n), head(0), num_free(n) {
        for (int32_t i = 0; i < n; ++i) free_ring[i] = i;  // initially blocks come out in id order
    }

    bool valid(int32_t id) const { return id >= 0 && id < num_blocks; }

    int32_t pop_free() {  // caller checked num_free > 0
        int32_t id = free_ring[head];
        head = (head + 1) % num_blocks;
        --num_free;
        return id;
    }

    void push_free(int32_t id) {  // never overflows: at most num_blocks ids are free
        free_ring[(head + num_free) % num_blocks] = id;
        ++num_free;
    }

    std::mutex mutex;
    std::vector<int32_t> ref_count;  // [num_blocks]; 0 = free
    std::vector<int32_t> free_ring;  // free ids live in free_ring[head .. head + num_free) mod num_blocks
    const int32_t num_blocks;
    int32_t head;
    int32_t num_free;
};

extern "C" {

BlockManager* bm_create(int32_t num_blocks) {
    if (num_blocks <= 0) return nullptr;
    try {
        return new BlockManager(num_blocks);
    } catch (...) {  // std::bad_alloc, std::length_error
        return nullptr;
    }
}

void bm_destroy(BlockManager* bm) { delete bm; }

int bm_allocate(BlockManager* bm, int32_t n, int32_t* out_ids, int32_t* out_num_free) {
    if (bm == nullptr || n < 0 || (n > 0 && out_ids == nullptr)) return BM_ERR_INVALID_ARGUMENT;
    std::lock_guard<std::mutex> lock(bm->mutex);
    if (out_num_free != nullptr) *out_num_free = bm->num_free;
    if (n > bm->num_free) return BM_ERR_OUT_OF_BLOCKS;
    for (int32_t i = 0; i < n; ++i) {
        int32_t id = bm->pop_free();
        bm->ref_count[id] = 1;
        out_ids[i] = id;
    }
    return BM_OK;
}

int bm_incref(BlockManager* bm, const int32_t* ids, int32_t n) {
    if (bm == nullptr || n < 0 || (n > 0 && ids == nullptr)) return BM_ERR_INVALID_ARGUMENT;
    std::lock_guard<std::mutex> lock(bm->mutex);
    for (int32_t i = 0; i < n; ++i) {
        int32_t id = ids[i];
        int err = !bm->valid(id) || bm->ref_count[id] == 0 ? BM_ERR_INVALID_BLOCK
                  : bm->ref_count[id] == INT32_MAX          ? BM_ERR_REF_OVERFLOW
                                                            : BM_OK;
        if (err != BM_OK) {
            while (i-- > 0) --bm->ref_count[ids[i]];  // undo entries 0..i-1
            return err;
        }
        ++bm->ref_count[id];
    }
    return BM_OK;
}

int bm_decref(BlockManager* bm, const int32_t* ids, int32_t n, int32_t* out_freed, int32_t* out_num_freed) {
    if (bm == nullptr || n < 0 || (n > 0 && (ids == nullptr || out_freed == nullptr)) || out_num_freed == nullptr)
        return BM_ERR_INVALID_ARGUMENT;
    std::lock_guard<std::mutex> lock(bm->mutex);
    // Drop the references one entry at a time. A block reaches 0 at its last occurrence (one more
    // would be invalid), so it is recorded once, in the order blocks became free. If an entry is
    // invalid (a free block, or a block named more times than it has owners) every drop is undone;
    // the free list is only touched once the whole batch is known to be valid.
    int32_t num_freed = 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t id = ids[i];
        if (!bm->valid(id) || bm->ref_count[id] == 0) {
            while (i-- > 0) ++bm->ref_count[ids[i]];
            return BM_ERR_INVALID_BLOCK;
        }
        if (--bm->ref_count[id] == 0) out_freed[num_freed++] = id;
    }
    for (int32_t i = 0; i < num_freed; ++i) bm->push_free(out_freed[i]);
    *out_num_freed = num_freed;
    return BM_OK;
}

int32_t bm_ref_count(BlockManager* bm, int32_t id) {
    if (bm == nullptr) return BM_ERR_INVALID_ARGUMENT;
    std::lock_guard<std::mutex> lock(bm->mutex);
    return bm->valid(id) ? bm->ref_count[id] : BM_ERR_INVALID_BLOCK;
}

int32_t bm_num_free(BlockManager* bm) {
    if (bm == nullptr) return BM_ERR_INVALID_ARGUMENT;
    std::lock_guard<std::mutex> lock(bm->mutex);
    return bm->num_free;
}

int32_t bm_num_blocks(BlockManager* bm) {
    if (bm == nullptr) return BM_ERR_INVALID_ARGUMENT;
    return bm->num_blocks;  // const after construction: no lock needed
}

}  // extern "C"
