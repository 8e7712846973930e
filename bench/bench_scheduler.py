"""Scheduler benchmark: the 10,000-job fleet simulation for every strategy, and plan()'s decision time.

    python -P bench/bench_scheduler.py [--seeds 0,1,2] [--loads 0.9,1.5] [--json]

Prints one Markdown table (metrics averaged over the seeds, per offered load and strategy) plus decision times.
"""

import argparse
import json
import platform
import statistics
import time

from lorafleet.scheduler.simulate import STRATEGIES, measure_decision_time, run_simulation

COLUMNS = (
    ("gpu_utilisation", "util", "{:.1%}"),
    ("gpu_busy", "busy", "{:.1%}"),
    ("jct_mean_s", "JCT mean s", "{:,.0f}"),
    ("jct_p95_s", "JCT p95 s", "{:,.0f}"),
    ("wait_mean_s", "wait mean s", "{:,.0f}"),
    ("wait_p95_s", "wait p95 s", "{:,.0f}"),
    ("makespan_hours", "makespan h", "{:.1f}"),
    ("jain_backlogged", "Jain", "{:.3f}"),
    ("base_loads", "base loads", "{:,.0f}"),
    ("oom_evictions", "OOMs", "{:.0f}"),
    ("plan_ms_median", "round ms p50", "{:.2f}"),
    ("plan_ms_p95", "round ms p95", "{:.2f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--executors", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--loads", default="0.9,1.5", help="offered work / fleet capacity at 8k-token cohorts")
    parser.add_argument("--decision-rounds", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    loads = [float(x) for x in args.loads.split(",")]

    began = time.perf_counter()
    runs = {load: [run_simulation(args.jobs, args.tenants, args.executors, seed, load, decision_rounds=0)
                   for seed in seeds] for load in loads}
    decisions = {packing: measure_decision_time(args.jobs, args.executors, args.tenants, args.decision_rounds,
                                                packing=packing)
                 for packing in STRATEGIES if packing != "fifo"}
    elapsed = time.perf_counter() - began
    averaged = {load: {s: {key: statistics.fmean(r["strategies"][s][key] for r in results) for key, _, _ in COLUMNS}
                       for s in STRATEGIES} for load, results in runs.items()}
    if args.json:
        print(json.dumps({"runs": {str(k): v for k, v in runs.items()}, "decision_time": decisions,
                          "elapsed_s": elapsed}, indent=2))
        return

    workload = runs[loads[0]][0]["workload"]
    print(f"{args.jobs:,} jobs, {args.tenants} tenants, {args.executors} executors "
          f"({', '.join(f'{n}x{name}' for name, n in workload['gpus'].items())} for seed {seeds[0]}), "
          f"seeds {args.seeds}, means over seeds; {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, {elapsed:.0f} s in all\n")
    print("| load | strategy | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for load, strategies in averaged.items():
        for strategy, metrics in strategies.items():
            cells = " | ".join(fmt.format(metrics[key]) for key, _, fmt in COLUMNS)
            print(f"| {load} | {strategy} | {cells} |")
    print()
    print(f"| plan() with {args.jobs:,} queued, {args.executors} executors, {args.decision_rounds} rounds "
          "| median ms | p95 ms | max ms | first round (idle fleet) ms |")
    print("|---|---|---|---|---|")
    for packing, d in decisions.items():
        times = (d["median_ms"], d["p95_ms"], d["max_ms"], d["first_round_ms"])
        print(f"| {packing} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
