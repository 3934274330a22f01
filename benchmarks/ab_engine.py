"""Engine throughput of this tree against another build of it, on one machine: one process per tree and run, in the
order old, new, new, old (then again), so that a machine's drift over the minutes weighs on both alike.

    git archive <rev> pagedattention benchmarks | tar -x -C /tmp/old     # the other build (plus `make` there)
    python benchmarks/ab_engine.py --old /tmp/old [--workloads W1,W2,W3] [--runs 2] [--out DIR]
    python benchmarks/ab_engine.py --old /tmp/old --tiny                  # a CPU smoke run
    python benchmarks/ab_engine.py --old /tmp/old --steps                 # decode steps instead (profile_step.py)

Each run is the tree's own ``benchmark_throughput.py`` (continuous, 256 seats, no Hugging Face baselines),
writing its JSON under DIR/<tree>_<run>/. The table gives each workload's output tok/s per run and the ratio of
the means (new / old); DIR/ab_engine.json holds it. Runs on different machines of one card differ by up to 10%:
compare builds within one invocation, not across them.

``--steps``: each run is the tree's ``profile_step.py --no-w2`` instead, and the table gives, per batch size, a
decode step's wall time, the host's own work in it (wall minus its waits for the GPU) and the GPU's busy time,
per run, with the ratio of the mean walls: a change of the host's work per step shows there before it shows in
throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NEW = Path(__file__).resolve().parent.parent


def run_order(runs: int) -> list[str]:
    """old, new, new, old, ... : ``runs`` runs of each tree, every pair of runs in the reverse order of the last."""
    order = []
    for i in range(runs):
        order += ["old", "new"] if i % 2 == 0 else ["new", "old"]
    return order


def throughput_command(tree: Path, workloads: str, out: Path, tiny: bool) -> list[str]:
    command = [sys.executable, str(tree / "benchmarks" / "benchmark_throughput.py"), "--workloads", workloads,
               "--scheduling", "continuous", "--hf", "off", "--no-plots", "--out", str(out)]
    return command + (["--tiny"] if tiny else ["--max-num-seqs", "256"])


def profile_command(tree: Path, out: Path, tiny: bool) -> list[str]:
    command = [sys.executable, str(tree / "benchmarks" / "profile_step.py"), "--no-w2", "--out", str(out)]
    return command + (["--tiny"] if tiny else [])


def summarize_steps(results: dict[str, list[dict]]) -> list[dict]:
    """``results``: "old"/"new" -> each run's profile JSON. One row per batch size: each run's step wall, host
    work (wall minus waits) and GPU busy ms, and the ratio of the mean walls (new / old)."""
    rows = []
    for i, batch in enumerate(r["batch"] for r in results["new"][0]["rows"]):
        row = {"batch": batch}
        for tree, runs in results.items():
            steps = [run["rows"][i] for run in runs]
            row[f"{tree}_wall_ms"] = [s["wall_ms"] for s in steps]
            row[f"{tree}_host_ms"] = [s["wall_ms"] - s["host_wait_ms"] for s in steps]
            row[f"{tree}_busy_ms"] = [s["device_busy_ms"] for s in steps]
        row["new_over_old"] = statistics.fmean(row["new_wall_ms"]) / statistics.fmean(row["old_wall_ms"])
        rows.append(row)
    return rows


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """``results``: "old"/"new" -> each run's throughput JSON. One row per workload: tok/s of every run, the
    means and their ratio (new / old)."""
    rows = []
    names = [r["workload"] for r in results["new"][0]["results"]]
    for name in names:
        per_tree = {tree: [next(r["output_tok_per_s"] for r in run["results"] if r["workload"] == name)
                           for run in runs] for tree, runs in results.items()}
        old, new = statistics.fmean(per_tree["old"]), statistics.fmean(per_tree["new"])
        rows.append({"workload": name, "old_tok_per_s": per_tree["old"], "new_tok_per_s": per_tree["new"],
                     "old_mean": old, "new_mean": new, "new_over_old": new / old})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True,
                        help="root of the other build (its pagedattention/ and benchmarks/)")
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--runs", type=int, default=2, help="runs of each tree")
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny model and small workloads (CPU)")
    parser.add_argument("--steps", action="store_true", help="decode steps (profile_step.py) instead of throughput")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "ab")
    args = parser.parse_args(argv)
    if not (args.old / "benchmarks" / "benchmark_throughput.py").is_file():
        parser.error(f"--old must hold benchmarks/benchmark_throughput.py, {args.old} does not")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    trees = {"old": args.old.resolve(), "new": NEW}
    results: dict[str, list[dict]] = {"old": [], "new": []}
    for i, tree in enumerate(run_order(args.runs)):
        out = args.out / f"{tree}_{i}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(trees[tree])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != NEW])}
        print(f"== {tree} ({trees[tree]}), run {i}", flush=True)
        command, written = (profile_command(trees[tree], out, args.tiny), "profile_*.json") if args.steps else \
            (throughput_command(trees[tree], args.workloads, out, args.tiny), "throughput_*.json")
        subprocess.run(command, env=env, check=True)
        results[tree].append(json.loads(next(out.glob(written)).read_text()))
    if args.steps:
        rows = summarize_steps(results)
        print(f"\n{'batch':>6}  {'ms per decode step, old':<36}{'new':<36}{'new / old':>10}")
        for r in rows:
            cells = {tree: "; ".join(f"{w:.3f} (host {h:.3f}, GPU {b:.3f})" for w, h, b in
                                     zip(r[f"{tree}_wall_ms"], r[f"{tree}_host_ms"], r[f"{tree}_busy_ms"]))
                     for tree in ("old", "new")}
            print(f"{r['batch']:>6}  {cells['old']:<36}{cells['new']:<36}{r['new_over_old']:>10.3f}")
    else:
        rows = summarize(results)
        print(f"\n{'workload':<10}{'old tok/s':>28}{'new tok/s':>28}{'new / old':>12}")
        for r in rows:
            old = ", ".join(f"{v:,.0f}" for v in r["old_tok_per_s"])
            new = ", ".join(f"{v:,.0f}" for v in r["new_tok_per_s"])
            print(f"{r['workload']:<10}{old:>28}{new:>28}{r['new_over_old']:>12.3f}")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    report = {**common.run_info(device), "old": str(trees["old"]), "order": run_order(args.runs), "rows": rows}
    name = "ab_steps.json" if args.steps else "ab_engine.json"
    print(f"wrote {common.write_json(args.out / name, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
