"""PagedAttentionManager by hand: one prompt shared by several sequences, then copy-on-write as they diverge.

    python examples/manager_demo.py [--device cpu|cuda]

No model runs: the manager only reserves slots. A prompt is added once and forked into ``--num-seqs``
sequences (parallel sampling), which share all its blocks; each then appends its own tokens. The first
append into the shared, partly filled last block copies it, every later one lands in private blocks.
"""
import argparse

import torch

from pagedattention.memory import PagedAttentionManager


def show(title, manager):
    s = manager.memory_stats()
    print(f"{title:<36} blocks in use {s.blocks_in_use:>3}/{s.num_blocks}  tokens {s.tokens_stored:>4}  "
          f"utilization {s.utilization:6.1%}  saved by sharing {s.bytes_saved_by_sharing / 2**20:6.2f} MiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()

    # the KV shape of a small Llama-style model (Qwen3-0.6B: 28 layers, 8 KV heads of 128)
    manager = PagedAttentionManager(num_blocks=64, block_size=args.block_size, num_layers=28, num_kv_heads=8,
                                    head_dim=128, dtype=torch.float16, device=args.device)
    print(f"KV cache: {manager.num_blocks} blocks of {args.block_size} tokens, "
          f"{manager.memory_stats().bytes_per_block / 2**20:.2f} MiB per block (K and V, all layers)\n")

    manager.add_sequence("prompt", args.prompt_len)
    show("prompt added", manager)
    for i in range(args.num_seqs):
        manager.fork_sequence("prompt", i)
    manager.free_sequence("prompt")  # the forks keep its blocks alive
    show(f"forked into {args.num_seqs} sequences", manager)
    shared_last = manager.block_table(0)[-1]

    for step in range(args.new_tokens):
        for i in range(args.num_seqs):
            manager.append_token(i)
        if step == 0:
            show("1 token each (copy-on-write)", manager)
            print(f"  {'':<34} last prompt block {shared_last}: now in "
                  f"{sum(shared_last in manager.block_table(i) for i in range(args.num_seqs))} table(s); "
                  f"sequence 0's table {manager.block_table(0)}")
    show(f"{args.new_tokens} tokens each", manager)

    print("\nbatch tensors for the kernels:")
    seqs = list(range(args.num_seqs))
    print("  block_tables\n", manager.block_tables_tensor(seqs).cpu())
    print("  context_lens", manager.context_lens_tensor(seqs).tolist())
    print("  slot_mapping of each sequence's last token",
          manager.slot_mapping_tensor([(i, manager.context_len(i) - 1, manager.context_len(i)) for i in seqs]).tolist())

    for i in seqs:
        manager.free_sequence(i)
    show("all sequences freed", manager)


if __name__ == "__main__":
    main()
