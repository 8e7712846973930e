"""bench/bench_generate.py runs end to end on a tiny shape on the CPU, and its engine gives PEFT's tokens there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers_models import single_torch_thread  # noqa: F401 (autouse fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_generate  # noqa: E402


def test_the_generation_bench_runs_on_a_tiny_shape_and_matches_peft(tmp_path):
    report = bench_generate.main([
        "--shape", "tiny", "--device", "cpu", "--requests", "6", "--adapters", "1,3", "--prompt", "8",
        "--new-tokens", "4", "--peft-sample", "3", "--train-jobs", "2", "--train-steps", "1", "--warmup", "1",
        "--train-requests", "4", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
    ])
    saved = json.loads((tmp_path / "out" / "generate_tiny.json").read_text())
    assert saved["engine"] == report["engine"]
    assert [row["adapters"] for row in saved["engine"]] == [1, 3]
    assert all(row["generated_tokens"] == 6 * 4 and row["tokens_per_s"] > 0 for row in saved["engine"])
    assert saved["engine"][1]["pool"]["resident_adapters"] == 3
    assert saved["peft"]["same_tokens_as_engine"] == 3  # fp32: PEFT's greedy tokens exactly
    assert saved["training"]["step_seconds_alone"] > 0 and saved["training"]["generate_seconds_between_steps"] > 0
    assert "| 3 |" in (tmp_path / "out" / "generate_tiny.md").read_text()


def test_the_generation_bench_measures_the_engine_alone_with_peft_sample_0(tmp_path):
    report = bench_generate.main([
        "--shape", "tiny", "--device", "cpu", "--requests", "4", "--adapters", "2", "--prompt", "8",
        "--new-tokens", "3", "--peft-sample", "0", "--train-jobs", "0", "--workdir", str(tmp_path / "work"),
        "--out", str(tmp_path / "out"),
    ])
    assert "peft" not in report and "training" not in report
    assert report["engine"][0]["generated_tokens"] == 4 * 3
    assert "| 2 |" in (tmp_path / "out" / "generate_tiny.md").read_text()
