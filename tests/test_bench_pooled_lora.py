"""bench/bench_pooled_lora.py runs on a tiny shape on the CPU, and both of its paths add the same deltas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers_models import single_torch_thread  # noqa: F401 (autouse fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_pooled_lora  # noqa: E402


def test_the_pooled_bench_runs_on_a_tiny_shape_and_writes_its_table(tmp_path):
    report = bench_pooled_lora.main(["--shape", "tiny", "--device", "cpu", "--adapters", "1,3", "--rows", "8",
                                     "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "pooled_lora_tiny_cpu.json").read_text())
    assert saved["rows_by_adapters"] == report["rows_by_adapters"]
    assert [row["adapters"] for row in saved["rows_by_adapters"]] == [1, 3]
    assert saved["layers"] == 8  # q/k/v/o of the tiny shape's two layers
    assert all(row[key] > 0 for row in saved["rows_by_adapters"]
               for key in ("stacked_wall_ms", "pooled_wall_ms", "stacking_ms", "table_ms"))


def test_both_paths_of_the_bench_add_the_same_deltas():
    args = bench_pooled_lora.parse_args(["--shape", "tiny", "--device", "cpu", "--rows", "10"])
    dims = bench_pooled_lora.step_dims(args)
    placed = bench_pooled_lora.PlacedAdapters(3, dims, 4, torch.float32, torch.device("cpu"))
    segments = bench_pooled_lora.decode_segments(10, 3)
    assert segments == [(0, 4), (4, 7), (7, 10)]
    inputs = [torch.randn(10, d_in) for d_in, _ in dims]
    stacked, pooled = ([torch.zeros(10, d_out) for _, d_out in dims] for _ in range(2))
    bench_pooled_lora.stacked_step(placed, 3, segments, inputs, stacked)
    bench_pooled_lora.pooled_step(placed, 3, segments, inputs, pooled, dims, torch.device("cpu"))
    for got, want in zip(pooled, stacked):
        assert torch.count_nonzero(want) == want.numel() and torch.equal(got, want)
