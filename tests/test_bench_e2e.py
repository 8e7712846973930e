"""bench/bench_e2e.py end to end on the CPU with the tiny shape: the GPU runs are rare and costly, so the whole
script (cohort rows, base vs adapters, the PEFT baseline, the report and its table) must not rot between them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e.py"


def test_the_e2e_bench_writes_a_row_per_cohort_and_a_baseline_to_compare_it_with(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-P", str(BENCH), "--shape", "tiny", "--device", "cpu", "--cohorts", "1,2",
                    "--batches", "1x512", "--overhead", "2x1x512", "--baselines", "peft", "--warmup", "1",
                    "--steps", "1", "--capacity", "1,3", "--micro-batches", "3", "--evaluate", "2",
                    "--workdir", str(tmp_path / "work"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "e2e_tiny.json").read_text())
    assert [(row["jobs"], row["tokens"]) for row in report["cohorts"]] == [(1, 512), (2, 1024)]
    records = (tmp_path / "work" / "data" / "1x512-1.jsonl").read_text().splitlines()
    assert len(records) == len(set(records)) == 3, "three micro-batches of distinct records"
    assert all(row["seconds"] > 0 and row["checkpointing"] == "off" for row in report["cohorts"])
    assert [len(report["baselines"]["peft"]["1x512"]["per_job_seconds"])] == [2], "each job of the largest cohort"
    assert report["overhead"][0]["jobs"] == 2 and report["overhead"][0]["adapters"] > 0
    evaluate = report["evaluate"]
    assert (evaluate["micro_batches"], evaluate["tokens"], evaluate["cohort_jobs"]) == (2, 1024, 2)
    assert evaluate["largest_pass_tokens"] == 1024, "the cohort of two stepped before evaluating"
    assert evaluate["first"]["seconds"] > 0 and evaluate["cached"]["seconds"] > 0
    # nothing runs out of memory on the CPU: the capacity search climbs to the range's top, a bound, not exact
    assert [row["jobs"] for row in report["capacity"]] == [1, 2, 3]
    assert report["capacity_result"] == {"most_jobs": 3, "exact": False, "probes": 3}
    table = (out / "e2e_tiny.md").read_text().splitlines()
    assert table[0].startswith("| jobs | per-job batch |")
    assert len([line for line in table if line.startswith("| 2 |")]) == 1


def test_the_summary_names_what_ran_on_the_device_in_the_graphed_step():
    """The graphed step's parts are a GPU's alone: their table is checked here, on a report as a GPU run leaves it."""
    sys.path.insert(0, str(BENCH.parent))
    import bench_e2e

    device = {"device_ops": 2274, "groups": {"fp32 adds": {"count": 15, "ms": 0.02}, "dA kernel": {"count": 64,
                                                                                                     "ms": 3.26}}}
    timeline = {"step_ms": 185.0, "idle_ms": 8.0, "before_first_kernel_ms": 3.0, "after_last_kernel_ms": 0.5,
                "functions_ms": {"executor/cohort.py: step": 7.5}, "device": device, "unprofiled_step_ms": 176.7,
                "replay_gpu_ms": 170.7}
    report = {"baselines": {}, "planner": [], "parts": {"jobs": 8, "batch": "4x512", "checkpointing": "off",
                                                        "table": "| part |", "graphed_timeline": timeline}}
    summary = bench_e2e.summary_tables(report, None)
    assert "On the device in that step: 2,274 kernels, copies and fills" in summary
    assert "| fp32 adds | 15 | 0.02 |" in summary and "| dA kernel | 64 | 3.26 |" in summary
    assert "the graph's replay kept the GPU busy 170.7 ms" in summary
