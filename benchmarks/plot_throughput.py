"""Plots of a throughput report written by benchmarks/benchmark_throughput.py.

    python benchmarks/plot_throughput.py results/throughput_<tag>.json [--out-dir DIR] [--workload W2] [--cap N]

throughput_<tag>.png: output tok/s, one group of bars per workload, one bar per (scheduling, max_num_seqs)
row; Hugging Face baseline rows (scheduling "hf-...") are grey and hatched.
throughput_timeline_<tag>.png: sequences running at each engine step, static batching above continuous, for
one workload and batch cap. A static batch drains as its requests finish and the freed slots stay empty
until its longest request is done (the "bubbles"); continuous batching refills them at once.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

STYLE = {"static": dict(color="tab:orange"), "continuous": dict(color="tab:blue"),
         "hf-static": dict(color="0.8", hatch="//", edgecolor="0.4"),
         "hf-continuous": dict(color="0.8", hatch="..", edgecolor="0.4")}
ENGINE = ("static", "continuous")


def kilo(value: float) -> str:
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def bar_order(row: dict) -> tuple:
    """Static and continuous side by side at each cap (the comparison), then the baselines by kind."""
    kind, cap = list(STYLE).index(row["scheduling"]) if row.get("scheduling") in STYLE else 9, row.get("max_num_seqs")
    return (0, cap or 0, kind) if row.get("scheduling") in ENGINE else (1, kind, cap or 0)


def plot_bars(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A row without a throughput cannot be drawn; anything else missing only costs it a label.
    rows = [r for r in report.get("results", []) if r.get("output_tok_per_s") is not None]
    workloads = list(dict.fromkeys(r.get("workload", "?") for r in rows))
    hf = [r for r in rows if str(r.get("scheduling")).startswith("hf-")]
    fig, ax = plt.subplots(figsize=(max(7.0, 3.0 + 0.75 * len(rows) + 0.6 * len(workloads)), 4.8))
    x, ticks, centres, seen = 0.0, [], [], set()
    for name in workloads:
        start = x
        for r in sorted((r for r in rows if r.get("workload", "?") == name), key=bar_order):
            scheduling = r.get("scheduling") or "?"
            who = "Hugging Face" if scheduling.startswith("hf-") else "this engine"
            label = None if scheduling in seen else f"{who}, {scheduling.removeprefix('hf-')}"  # one per kind
            seen.add(scheduling)
            bars = ax.bar(x, r["output_tok_per_s"], 0.8, label=label, **STYLE.get(scheduling, STYLE["hf-static"]))
            ax.bar_label(bars, [kilo(r["output_tok_per_s"])], padding=2, fontsize=8)
            ticks.append((x, "—" if r.get("max_num_seqs") is None else str(r["max_num_seqs"])))
            x += 1
        centres.append((start + x - 1) / 2)
        x += 0.8  # the gap between workloads
    ax.set_xticks(*zip(*ticks), fontsize=8)
    # Workload names under the cap numbers: a second x axis at the bottom, its ticks hidden.
    groups = ax.secondary_xaxis("bottom")
    groups.set_xticks(centres, workloads, fontsize=10, fontweight="bold")
    groups.tick_params(length=0, pad=16)
    ax.set_xlabel("max_num_seqs" + (" (Hugging Face: batch size)" if hf else ""), labelpad=18)
    ax.set_ylabel("output tokens / s")
    ax.margins(y=0.1)  # room for the value labels above the tallest bar
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: a tall bar can be anywhere
    ax.set_title(f"Output throughput\n{report.get('device', '?')}, {report.get('model', '?')}, "
                 f"{report.get('dtype', '?')}", fontsize=10)
    engines = list(dict.fromkeys(r["engine"] for r in hf if r.get("engine")))
    if engines:  # what the baselines ran on, in small print: the legend has no room for it
        fig.text(0.01, 0.01, textwrap.fill("Hugging Face: " + "; ".join(engines), 160), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if engines else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline_rows(report: dict, workload: str | None, cap: int | None) -> list[dict]:
    """The static and continuous rows to draw (either may be missing), or [] if none has a timeline.
    Default workload: W2, else the first with a timeline. Default cap: the smallest with both schedulings
    (there the bubbles are widest), else the smallest with either."""
    rows = [r for r in report.get("results", [])
            if r.get("scheduling") in ENGINE and (r.get("timeline") or {}).get("t_s")]
    names = list(dict.fromkeys(r.get("workload") for r in rows))
    workload = workload or ("W2" if "W2" in names else names[0] if names else None)
    rows = [r for r in rows if r.get("workload") == workload]
    if cap is None:
        caps = {r.get("max_num_seqs") for r in rows}
        both = [c for c in caps if {r["scheduling"] for r in rows if r.get("max_num_seqs") == c} == set(ENGINE)]
        cap = min(both or caps, key=lambda c: c or 0, default=None)
    by_scheduling = {r["scheduling"]: r for r in reversed(rows) if r.get("max_num_seqs") == cap}  # first wins
    return [by_scheduling[s] for s in ENGINE if s in by_scheduling]


def plot_timeline(report: dict, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def wall(r):  # the last step lasts until the run ends; a report without wall_s ends at the last step
        return r.get("wall_s") or r["timeline"]["t_s"][-1]

    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 2.6 * len(rows) + 0.8), sharex=True, squeeze=False)
    cap = rows[0].get("max_num_seqs")
    for ax, r in zip(axes[:, 0], rows):
        line, color = r["timeline"], STYLE[r["scheduling"]]["color"]
        # Close the curve at the run's end (extend the last step, then drop to 0) so the end shows.
        t, running = line["t_s"] + [wall(r)] * 2, line["running"] + [line["running"][-1], 0]
        ax.step(t, running, where="post", color=color, lw=0.9, label="running sequences")
        ax.fill_between(t, running, step="post", color=color, alpha=0.2)
        if cap:
            ax.axhline(cap, color="k", ls="--", lw=0.8, label=f"max_num_seqs = {cap}")
        # Prefill steps: grey spans as long as the step lasted (prefill time is what continuous batching
        # pays to refill slots; a stall shows as a wide span), plus a tick on top so short ones show too.
        ends = line["t_s"][1:] + [wall(r)]
        spans = [(s, e - s) for s, e, p in zip(line["t_s"], ends, line.get("prefill") or []) if p]
        if spans:
            top = ax.get_xaxis_transform()  # x in data, y in axes fractions
            ax.broken_barh(spans, (0, 1), transform=top, color="0.5", alpha=0.2, lw=0,
                           label="prefill step (span: its duration)")
            ax.plot([s for s, _ in spans], [0.97] * len(spans), "|", color="0.3", ms=6, transform=top)
        facts = [f"{kilo(r['output_tok_per_s'])} output tok/s" if r.get("output_tok_per_s") else None,
                 f"{wall(r):.2f} s wall", f"mean {r['mean_running']:.1f} running" if r.get("mean_running") else None,
                 f"{len(spans)} prefill steps"]
        ax.set_title(f"{r['scheduling']} batching: " + ", ".join(f for f in facts if f), fontsize=10)
        ax.set(ylabel="running sequences", ylim=(0, max([cap or 0] + running) * 1.12))
    # One legend for both: inside an axes it would cover the filled curve, which reaches 0 everywhere.
    handles = {label: h for ax in axes[:, 0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    # Both runs on the longer one's time axis (sharex): the shorter run visibly ends earlier.
    axes[-1, 0].set(xlim=(0, max(wall(r) for r in rows) * 1.01), xlabel="time since the run started (s)")
    fig.suptitle(f"{rows[0].get('workload', '?')}, batch occupancy per engine step: "
                 f"{report.get('device', '?')}, {report.get('model', '?')}", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: dict, out_dir: Path, tag: str, workload: str | None = None,
                    cap: int | None = None) -> list[Path]:
    """Write throughput_<tag>.png and, if the report has engine timelines, throughput_timeline_<tag>.png
    (for ``workload`` and batch cap ``cap``; defaults in timeline_rows). Returns the paths written."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [Path(out_dir) / f"throughput_{tag}.png"]
    plot_bars(report, paths[0])
    if rows := timeline_rows(report, workload, cap):
        paths.append(Path(out_dir) / f"throughput_timeline_{tag}.png")
        plot_timeline(report, rows, paths[1])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="throughput_<tag>.json")
    parser.add_argument("--out-dir", type=Path, help="default: the report's directory")
    parser.add_argument("--workload", help="the timeline's workload (default: W2 if present)")
    parser.add_argument("--cap", type=int, help="the timeline's max_num_seqs (default: smallest with both)")
    args = parser.parse_args(argv)
    tag = args.report.stem.removeprefix("throughput_")
    paths = plot_throughput(json.loads(args.report.read_text()), args.out_dir or args.report.parent, tag,
                            args.workload, args.cap)
    print("\n".join(f"wrote {path}" for path in paths))
    if len(paths) == 1:
        print("no timeline: no static or continuous row with a timeline for that workload and cap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
