"""bench/bench_optimizer.py's smoke run on the CPU (the tiny shape, torch's fused AdamW there): both updates timed,
written and tabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_optimizer.py"


def test_the_optimizer_bench_times_the_flat_update_against_torchs_per_parameter_one(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-P", str(BENCH), "--jobs", "2", "--steps", "2", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "optimizer.json").read_text())
    assert result["shape"] == "tiny" and result["jobs"] == 2
    # 2 layers of q, k, v, o, gate, up, down (in + out: 64 + 64, 64 + 32, 64 + 32, 64 + 64, three of 64 + 128), r = 16
    assert result["params_per_job"] == 2 * 16 * (128 + 96 + 96 + 128 + 3 * 192)
    assert set(result["variants"]) == {"per parameter", "flat"}
    assert all(row["seconds"] > 0 for row in result["variants"].values())
    assert "| flat |" in run.stdout and "flat / per parameter" in run.stdout
