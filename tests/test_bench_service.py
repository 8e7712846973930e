"""bench/bench_service.py's smoke run on the CPU: the whole service (Valkey, the Celery worker, the scheduler, one
executor, each its own process) trains two cohorts of the tiny base, cold then warm, and the bench reports the ratio
to `Cohort.step` alone, the time to the first step and the stall around each publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_service.py"


def test_the_service_bench_reports_its_ratio_first_steps_and_publish_stalls(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-P", str(BENCH), "--shape", "tiny", "--jobs", "2", "--batch", "2x64",
                          "--steps", "24", "--checkpoint-every", "8", "--out", str(tmp_path)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "service_tiny.json").read_text())
    assert report["bench_step_s"] > 0 and report["service_over_bench"] > 0
    for batch in ("cold", "warm"):
        measured = report[batch]
        assert 0 < measured["first_step_s"]["min"] <= measured["first_step_s"]["max"]
        assert measured["service_step_s"] > 0 and measured["steps_timed"] >= 1
        # each gap between a job's progress events holds the whole later step
        assert 0 < measured["cohort_step_in_service_s"] <= measured["service_step_s"]
        stall = measured["publish_stall_s"]
        assert stall["publishing_steps"] >= 2, "checkpoints at steps 8 and 16 of the last job to join"
        assert 0 <= stall["median"] <= stall["max"]
        assert 0 <= stall["in_next_step_median"] <= stall["in_next_step_max"]
    assert "publish stall s" in run.stdout
    # on the CPU no step replays a graph; the logs of the service's processes come back with the report
    assert report["executor_steps"]["steps"] > 0 and report["executor_steps"]["graphed"] == 0
    assert (tmp_path / "logs" / "executor.log").is_file()
