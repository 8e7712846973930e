"""bench/bench_publish.py's smoke run on the CPU: a cohort of the tiny base checkpoints all its jobs in rounds, the
snapshots written beside the next step or after it, and the bench reports each round's parts and a profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_publish.py"


def test_the_publish_bench_reports_each_round_with_its_writes_beside_or_after_the_next_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-P", str(BENCH), "--shape", "tiny", "--jobs", "2", "--batch", "2x64",
                          "--rounds", "2", "--out", str(tmp_path)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "publish_tiny.json").read_text())
    assert [r["mode"] for r in report["rounds"]] == ["contended", "alone", "contended", "alone"]
    for measured in report["rounds"]:
        assert measured["reference_step_s"] > 0 and measured["next_step_s"] > 0
        assert measured["snapshots_loop_s"] > 0 and measured["writes_s"] > 0
        expected = (measured["snapshots_loop_s"] + measured["device_drain_s"] + measured["next_step_s"]
                    - measured["reference_step_s"])
        assert abs(measured["stall_s"] - expected) < 1e-9
    assert report["buffers"] is None, "the buffer probe is a GPU's"
    written = list(tmp_path.glob("bench-publish-*/out/round-*/*/adapter_model.safetensors"))
    assert len(written) == 2 * 4, "each round wrote each job's export"
    assert [len(report["handover_s"][mode]) for mode in ("each", "after")] == [2, 2]
    assert all(seconds > 0 for mode in ("each", "after") for seconds in report["handover_s"][mode])
    handed = list(tmp_path.glob("bench-publish-*/out/handover/*/*/adapter_model.safetensors"))
    assert len(handed) == 2 * 4, "each handover round wrote each job's export"
    assert "handed to the writer each as taken" in run.stdout
    assert "| round | writes |" in run.stdout and "tottime" in run.stdout
