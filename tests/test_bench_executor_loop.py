"""bench/bench_executor_loop.py's smoke run on the CPU: an executor turning a real cohort of running jobs against a
real Valkey server reports its loop's time, `record_step`'s in the loop and back to back, and the steps'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_executor_loop.py"


def test_the_loop_bench_reports_the_loop_and_its_write_round_trip_apart_from_the_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-P", str(BENCH), "--jobs", "2", "--turns", "10", "--warmup", "2",
                          "--out", str(tmp_path)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "executor_loop.json").read_text())
    assert report["jobs"] == 2 and report["turns"] == 10
    assert 0 < report["record_step_ms"] < report["loop_ms"] < report["cohort_step_ms"]
    assert 0 < report["record_step_alone_ms"] and report["loop_ms"] <= report["loop_p90_ms"]
    assert "2 jobs: the loop" in run.stdout
