"""How a request set's continuous schedule changes with how a full batch admits its waiting requests.

    python benchmarks/admission_sweep.py                       # W3 at 256 seats, the settings below
    python benchmarks/admission_sweep.py --min-admission 1,4,8 --mixed-limits 2048:8,4096:16

A full batch admits waiting requests in mixed steps once ``MIN_MIXED_ADMISSION`` of them have seats
(``engine/scheduler.py``), and a mixed step's prompt part is at most ``mixed_prompt_limit`` (tokens, prompts): the
largest mixed graph's. Outputs end by length, so the schedule does not depend on the tokens: the engine runs the
request set here with the model and the sampling kernel replaced (``host_step.py``'s replay) once per setting,
and counts, for each: the steps of each kind, the prompts and prompt tokens of a mixed step, its prompt rows
padded to graph sizes (every 256 tokens, or ``--buckets``: the smallest (tokens, prompts) that holds the part),
and the seats left empty while requests waited (the price of waiting for more of them). A GPU run says what
each costs; the counts say what a setting changes.
JSON: results/admission_<workload>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
import benchmarks.host_step as host_step  # noqa: E402
import benchmarks.workloads as workloads  # noqa: E402
import pagedattention.engine.scheduler as scheduler  # noqa: E402

GRAPH_TOKENS = 256  # a mixed graph's prompt part is a multiple of this many tokens (cuda_graphs.MIXED_PROMPTS)


@contextlib.contextmanager
def min_mixed_admission(value: int):
    """The scheduler's ``MIN_MIXED_ADMISSION`` set to ``value`` for a replay (a module constant, read each step)."""
    before, scheduler.MIN_MIXED_ADMISSION = scheduler.MIN_MIXED_ADMISSION, value
    try:
        yield
    finally:
        scheduler.MIN_MIXED_ADMISSION = before


def replay(name: str, min_admission: int, mixed_limit: tuple[int, int], cap: int = 256,
           tiny: bool = False) -> list[tuple[str, int, int, int, int]]:
    """(kind, sequences, tokens, decoding sequences, requests waiting before the step) of every step of ``name``."""
    steps = []
    with min_mixed_admission(min_admission), host_step.replayed_workload(name, cap, tiny) as llm:
        llm.scheduler.mixed_prompt_limit = mixed_limit
        while llm.has_unfinished_requests():
            waiting = len(llm.scheduler.waiting)
            llm.step()
            s = llm.last_step
            if s.num_seqs:
                steps.append((s.kind, s.num_seqs, s.num_tokens, s.num_decode_seqs, waiting))
    return steps


def padded_rows(prompts: int, tokens: int, buckets: list[tuple[int, int]] | None) -> int:
    """The rows a mixed step's prompt part of ``prompts`` and ``tokens`` fills in its graph: the smallest of
    ``buckets`` (tokens, prompts) that holds it, or with None the tokens rounded up to ``GRAPH_TOKENS``."""
    if buckets is None:
        return -(-tokens // GRAPH_TOKENS) * GRAPH_TOKENS
    size = next((t for t, n in sorted(buckets) if t >= tokens and n >= prompts), None)
    if size is None:
        raise ValueError(f"no bucket of {buckets} holds a prompt part of {tokens} tokens and {prompts} prompts")
    return size


def summary(steps, cap: int, buckets: list[tuple[int, int]] | None = None) -> dict:
    """What a schedule's steps add up to (``replay``'s tuples); ``buckets`` as ``padded_rows``."""
    mixed = [(seqs - decode, tokens - decode) for kind, seqs, tokens, decode, _ in steps if kind == "mixed"]
    return {
        "steps": {k: sum(1 for s in steps if s[0] == k) for k in ("prefill", "mixed", "decode")},
        "mixed_prompts_mean": statistics.fmean(p for p, _ in mixed) if mixed else 0.0,
        "mixed_prompt_tokens_mean": statistics.fmean(t for _, t in mixed) if mixed else 0.0,
        "mixed_prompt_tokens": sum(t for _, t in mixed),
        "mixed_prompt_rows_padded": sum(padded_rows(p, t, buckets) for p, t in mixed),
        "empty_seat_steps_while_waiting": sum(cap - seqs for kind, seqs, _, _, waiting in steps
                                              if waiting and kind != "prefill"),
        "seat_steps": sum(seqs for kind, seqs, *_ in steps if kind != "prefill"),
    }


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split(":")) for item in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=workloads.NAMES, default="W3")
    parser.add_argument("--tiny", action="store_true",
                        help="the small request sets at 32 seats (a smoke run; a batch of 8 admits one at a time)")
    parser.add_argument("--min-admission", default="1,2,4,8,16", help="MIN_MIXED_ADMISSION values")
    parser.add_argument("--mixed-limits", default="2048:8,4096:16", help="mixed prompt limits, tokens:prompts")
    parser.add_argument("--buckets", default=None, help="mixed graphs' prompt parts, tokens:prompts (default: "
                        f"every {GRAPH_TOKENS} tokens)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    buckets = pairs(args.buckets) if args.buckets else None
    cap = 32 if args.tiny else 256
    report = {**common.run_info("cpu"), "workload": args.workload, "max_num_seqs": cap,
              "min_mixed_admission_now": scheduler.MIN_MIXED_ADMISSION,
              "mixed_prompt_limit_now": list(host_step.GPU_MIXED_PROMPT_LIMIT),
              "padding_buckets": buckets and [list(b) for b in buckets], "runs": []}
    print(f"{args.workload} continuous at {cap} seats, replayed on the CPU (model replaced)")
    print("limit       min  prefill  mixed  decode  prompts/mixed  tokens/mixed  padded rows  empty seat-steps")
    for limit in pairs(args.mixed_limits):
        for m in (int(x) for x in args.min_admission.split(",")):
            row = {"mixed_prompt_limit": list(limit), "min_mixed_admission": m,
                   **summary(replay(args.workload, m, limit, cap, args.tiny), cap, buckets)}
            report["runs"].append(row)
            k = row["steps"]
            print(f"{limit[0]:5d}:{limit[1]:<4d} {m:4d} {k['prefill']:8d} {k['mixed']:6d} {k['decode']:7d} "
                  f"{row['mixed_prompts_mean']:14.2f} {row['mixed_prompt_tokens_mean']:13.0f} "
                  f"{row['mixed_prompt_rows_padded']:12d} {row['empty_seat_steps_while_waiting']:17d}")
    suffix = "_tiny" if args.tiny else ""
    print(f"wrote {common.write_json(args.out / f'admission_{args.workload}{suffix}.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
