// Many threads hammer one BlockManager with random allocate / incref / decref (invalid batches
// included); built with -fsanitize=thread by `make tsan`, so a data race aborts with a report.
//
// Each thread only touches blocks it holds, and keeps a ledger of how many references it holds on
// each. A block allocated to one thread is thus touched by no one else until that thread frees it,
// so its ref count must always equal that thread's ledger entry -- checked while the threads run.
// At the end the counts must match the ledgers, free + used == total, and releasing every ledger
// must return every block to the free list. Exit status: 0 on success, 1 on a failed check.
#include "block_manager.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <thread>
#include <vector>

static std::atomic<int> failures{0};

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            std::fprintf(stderr, "check failed at line %d: %s\n", __LINE__, #cond); \
            failures.fetch_add(1);                                                  \
        }                                                                           \
    } while (0)

using Ledger = std::map<int32_t, int32_t>;  // block id -> references this thread holds

static void worker(BlockManager* bm, int32_t num_blocks, int num_ops, unsigned seed, Ledger& ledger) {
    std::mt19937 rng(seed);
    auto pick_held = [&]() {  // a held id, chosen uniformly among held ids
        auto it = ledger.begin();
        std::advance(it, rng() % ledger.size());
        return it->first;
    };
    std::vector<int32_t> ids, freed;
    for (int op = 0; op < num_ops; ++op) {
        int kind = rng() % 10;
        if (kind < 4) {  // allocate 0..4
            int32_t n = rng() % 5, seen_free = -1;
            ids.assign(n, -1);
            int rc = bm_allocate(bm, n, ids.data(), &seen_free);
            CHECK(rc == BM_OK || (rc == BM_ERR_OUT_OF_BLOCKS && seen_free < n));
            if (rc != BM_OK) continue;
            for (int32_t id : ids) {
                CHECK(id >= 0 && id < num_blocks && ledger.count(id) == 0);  // it was free
                ledger[id] = 1;
            }
        } else if (kind < 6 && !ledger.empty()) {  // incref 1..3 held ids (repeats allowed)
            ids.clear();
            for (int n = 1 + rng() % 3; n > 0; --n) ids.push_back(pick_held());
            CHECK(bm_incref(bm, ids.data(), (int32_t)ids.size()) == BM_OK);
            for (int32_t id : ids) ++ledger[id];
        } else if (kind < 9 && !ledger.empty()) {  // decref 1..3 held references
            ids.clear();
            Ledger dropping;
            for (int n = 1 + rng() % 3; n > 0; --n) {
                int32_t id = pick_held();
                if (dropping[id] < ledger[id]) {
                    ++dropping[id];
                    ids.push_back(id);
                }
            }
            freed.assign(ids.size(), -1);
            int32_t num_freed = -1;
            CHECK(bm_decref(bm, ids.data(), (int32_t)ids.size(), freed.data(), &num_freed) == BM_OK);
            for (auto [id, n] : dropping) ledger[id] -= n;
            int32_t expect_freed = 0;
            for (auto [id, n] : dropping) expect_freed += ledger[id] == 0;
            CHECK(num_freed == expect_freed);
            for (int32_t i = 0; i < num_freed; ++i) {
                CHECK(ledger[freed[i]] == 0);
                ledger.erase(freed[i]);
            }
        } else if (!ledger.empty()) {  // an invalid batch: held ids plus one out of range
            ids = {pick_held(), (rng() % 2) ? -1 - (int32_t)(rng() % 5) : num_blocks + (int32_t)(rng() % 5)};
            freed.assign(2, -1);
            int32_t num_freed = 0;
            CHECK(bm_incref(bm, ids.data(), 2) == BM_ERR_INVALID_BLOCK);
            CHECK(bm_decref(bm, ids.data(), 2, freed.data(), &num_freed) == BM_ERR_INVALID_BLOCK);
        }
        if (!ledger.empty()) {  // a held block's count is ours alone
            int32_t id = pick_held();
            CHECK(bm_ref_count(bm, id) == ledger[id]);
        }
        int32_t num_free = bm_num_free(bm);
        CHECK(num_free >= 0 && num_free <= num_blocks);
    }
}

int main(int argc, char** argv) {
    int num_threads = argc > 1 ? std::atoi(argv[1]) : 8;
    int num_ops = argc > 2 ? std::atoi(argv[2]) : 20000;
    const int32_t num_blocks = 64;  // small, so threads run out and blocks migrate between them
    BlockManager* bm = bm_create(num_blocks);
    CHECK(bm != nullptr);
    if (bm == nullptr) return 1;

    std::vector<Ledger> ledgers(num_threads);
    std::vector<std::thread> threads;
    for (int t = 0; t < num_threads; ++t)
        threads.emplace_back(worker, bm, num_blocks, num_ops, 1234u + t, std::ref(ledgers[t]));
    for (auto& th : threads) th.join();

    // The counts are the sum of the ledgers; free + used == total.
    std::vector<int32_t> expected(num_blocks, 0);
    for (auto& ledger : ledgers)
        for (auto [id, n] : ledger) expected[id] += n;
    int32_t used = 0;
    for (int32_t id = 0; id < num_blocks; ++id) {
        CHECK(bm_ref_count(bm, id) == expected[id]);
        used += expected[id] > 0;
    }
    CHECK(bm_num_free(bm) + used == num_blocks);

    // Releasing every reference returns every block; then all of them can be allocated at once.
    std::vector<int32_t> freed(num_blocks), ids;
    for (auto& ledger : ledgers) {
        ids.clear();
        for (auto [id, n] : ledger) ids.insert(ids.end(), n, id);
        freed.resize(ids.size());
        int32_t num_freed = -1;
        CHECK(bm_decref(bm, ids.data(), (int32_t)ids.size(), freed.data(), &num_freed) == BM_OK);
        CHECK(num_freed == (int32_t)ledger.size());
    }
    CHECK(bm_num_free(bm) == num_blocks);
    ids.assign(num_blocks, -1);
    CHECK(bm_allocate(bm, num_blocks, ids.data(), nullptr) == BM_OK);
    std::vector<int> seen(num_blocks, 0);
    for (int32_t id : ids)
        if (id >= 0 && id < num_blocks) ++seen[id];
    for (int32_t id = 0; id < num_blocks; ++id) CHECK(seen[id] == 1);
    bm_destroy(bm);

    std::printf("stress test: %d threads x %d ops, %d failed checks\n", num_threads, num_ops, failures.load());
    return failures.load() == 0 ? 0 : 1;
}
