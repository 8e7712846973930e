"""bench/bench_gemm_peak.py's smoke run on the CPU (the tiny shape in fp32): the burst, the held rate in windows, each
of a layer's 14 frozen GEMMs and the layer in sequence, written and tabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gemm_peak.py"
sys.path.insert(0, str(BENCH.parent))
from bench_gemm_peak import ClockSampler  # noqa: E402


def test_the_gemm_bench_reports_the_burst_the_held_rate_and_each_of_a_layers_gemms(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-P", str(BENCH), "--seconds", "0.1", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gemm_peak.json").read_text())
    assert result["shape"] == "tiny" and result["burst_tflops"] > 0
    assert len(result["held_tflops"]) == 10 and all(rate > 0 for rate in result["held_tflops"])
    names = [f"{projection} {kind}" for projection in ("q", "k", "v", "o", "gate", "up", "down")
             for kind in ("forward", "dX")]
    assert list(result["gemm_tflops"]) == names and all(rate > 0 for rate in result["gemm_tflops"].values())
    assert len(result["layer_tflops"]) == 10
    assert "| the layer's 14 in sequence |" in run.stdout and "| down dX |" in run.stdout
    assert result["held_clocks"] is None and result["layer_clocks"] is None  # no NVML readings on a CPU


def test_the_clock_summary_reports_the_first_least_and_median_reading():
    sampler = ClockSampler(torch.device("cpu"))
    with sampler:
        pass
    assert sampler.summary() is None  # a CPU: no NVML, no readings
    sampler.readings = [(1980, 690.0), (1755, 700.0), (1830, 650.0)]
    assert sampler.summary() == {"sm_mhz_first": 1980, "sm_mhz_min": 1755, "sm_mhz_median": 1830,
                                 "power_w_median": 690.0, "readings": 3}
