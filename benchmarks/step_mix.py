"""The steps a request set takes, by kind and batch size, and what each kind cost in a GPU run of it.

    python benchmarks/step_mix.py --workload W3                    # the schedule alone (CPU, model replaced)
    python benchmarks/step_mix.py --workload W3 --timeline benchmarks/results/throughput_NVIDIA_H200.json

Outputs end by length, so a request set's schedule does not depend on the tokens: the engine runs it here with
the model and the sampling kernel replaced (host_step.py's replay, the GPU's mixed-step prompt limit), at 256
seats, continuous or static, and every decode step's rows and its sequences' mean context are counted, in bands
of rows. Two costs follow from the rows alone: a step's attention reads its rows' contexts, and its GEMMs grow
with its rows, so a run's time depends on how many of its steps run full.

``--timeline``: a throughput JSON of the same workload (benchmark_throughput.py on a GPU). Its timeline gives
each run of steps its start time: the seconds and the prompt tokens of the steps that run (nearly) full; the
replay says how many of those are mixed (the timeline merges a mixed step with a decode step beside it); given a
full decode step's time (``--decode-ms``: by default the same JSON's W1 continuous decode step, a full batch at a
similar context), what a mixed step costs beyond it, in all and per prompt token.
JSON: results/step_mix_<workload>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.common as common  # noqa: E402
import benchmarks.host_step as host_step  # noqa: E402
import benchmarks.workloads as workloads  # noqa: E402

BANDS = (16, 64, 128, 192, 240, 256)  # upper ends of the row bands (the last: 241-256, a full batch)
FULL = 240                            # a step with at least this many rows runs full


def replay_steps(name: str, scheduling: str, cap: int = 256,
                 tiny: bool = False) -> list[tuple[str, int, float, bool]]:
    """(kind, rows, mean context of the running sequences before the step, whether it was left in flight) of every
    step of ``name``. A step left in flight overlaps the next one's launch; any other made the host wait for its
    tokens before launching anything more, leaving the GPU idle meanwhile."""
    steps = []
    with host_step.replayed_workload(name, cap, tiny, scheduling) as llm:
        while llm.has_unfinished_requests():
            contexts = [len(s.token_ids) for s in llm.scheduler.running]
            llm.step()
            if llm.last_step.num_seqs:
                steps.append((llm.last_step.kind, llm.last_step.num_seqs, statistics.fmean(contexts or [0]),
                              llm.stepper.inflight is not None))
    return steps


def bands(steps) -> list[dict]:
    """Decode steps per band of rows: how many, and their sequences' mean context."""
    decode, rows = [s for s in steps if s[0] == "decode"], []
    for low, high in zip((0,) + BANDS, BANDS):
        band = [s for s in decode if low < s[1] <= high]
        rows.append({"rows": [low + 1, high], "steps": len(band),
                     "context": statistics.fmean(s[2] for s in band) if band else None})
    return rows


def full_phase_costs(result: dict, decode_ms: float, mixed_steps: int) -> dict:
    """From a throughput run's timeline: the seconds spent in steps of >= FULL rows, how many, and the prompt
    tokens among them (the tokens an entry holds beyond one a row); with ``mixed_steps`` of them mixed (the
    replay's count: the timeline merges a mixed step with a decode step beside it), what a mixed step cost beyond
    ``decode_ms``, in all and per prompt token."""
    tl, wall = result["timeline"], result["wall_s"]
    starts = tl["t_s"] + [wall]
    seconds = num_steps = prompt_tokens = 0
    for i, (prefill, running, n, tokens) in enumerate(zip(tl["prefill"], tl["running"], tl["steps"], tl["tokens"])):
        if not prefill and running >= FULL:
            seconds, num_steps = seconds + starts[i + 1] - starts[i], num_steps + n
            prompt_tokens += tokens - running * n
    extra_s = seconds - num_steps * decode_ms / 1e3
    return {"seconds": seconds, "steps": num_steps, "mixed_steps": mixed_steps, "prompt_tokens": prompt_tokens,
            "decode_ms_assumed": decode_ms, "mixed_extra_ms": 1e3 * extra_s / max(mixed_steps, 1),
            "mixed_extra_us_per_prompt_token": 1e6 * extra_s / max(prompt_tokens, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=workloads.NAMES, default="W3")
    parser.add_argument("--tiny", action="store_true", help="the small request sets (a smoke run)")
    parser.add_argument("--timeline", type=Path, default=None, help="a throughput JSON of the same workload")
    parser.add_argument("--decode-ms", type=float, default=None, help="a full decode step's ms (default: W1's)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    cap = 8 if args.tiny else 256
    report = {**common.run_info("cpu"), "workload": args.workload, "max_num_seqs": cap, "runs": {}}
    for scheduling in ("continuous", "static"):
        steps = replay_steps(args.workload, scheduling, cap, args.tiny)
        kinds = {k: sum(1 for s in steps if s[0] == k) for k in ("prefill", "mixed", "decode")}
        full_mixed = sum(1 for kind, rows, _, _ in steps if kind == "mixed" and rows >= FULL)
        waited = {k: sum(1 for s in steps if s[0] == k and not s[3]) for k in kinds}
        report["runs"][scheduling] = {"steps": kinds, "steps_not_overlapped": waited, "full_mixed_steps": full_mixed,
                                      "decode_bands": bands(steps)}
        print(f"{args.workload} {scheduling} at {cap} seats: {kinds}, of which the host waited for the tokens "
              f"before launching the next: {waited}; decode steps by rows:")
        for b in report["runs"][scheduling]["decode_bands"]:
            context = f"mean context {b['context']:.0f}" if b["context"] is not None else ""
            print(f"  rows {b['rows'][0]:3d}-{b['rows'][1]:3d}: {b['steps']:5d} steps  {context}")
    if args.timeline:
        data = json.loads(args.timeline.read_text())
        run = next(r for r in data["results"] if r["workload"] == args.workload and r["scheduling"] == "continuous")
        w1 = next((r for r in data["results"] if r["workload"] == "W1" and r["scheduling"] == "continuous"), None)
        decode_ms = args.decode_ms or (w1 and w1["decode_step_ms"])
        if decode_ms is None:
            parser.error("--decode-ms is needed: the timeline's JSON has no W1 continuous run")
        mixed = report["runs"]["continuous"]["full_mixed_steps"]
        costs = report["full_phase"] = {"timeline": str(args.timeline), "card": data["card"],
                                        **full_phase_costs(run, decode_ms, mixed)}
        print(f"{data['card']}, {args.workload} continuous, steps of >= {FULL} rows: {costs['seconds']:.3f} s for "
              f"{costs['steps']} steps, {mixed} of them mixed ({costs['prompt_tokens']} prompt tokens); at "
              f"{decode_ms:.3f} ms a decode step, a mixed step costs {costs['mixed_extra_ms']:.2f} ms more, "
              f"{costs['mixed_extra_us_per_prompt_token']:.2f} µs a prompt token")
    suffix = "_tiny" if args.tiny else ""
    print(f"wrote {common.write_json(args.out / f'step_mix_{args.workload}{suffix}.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
