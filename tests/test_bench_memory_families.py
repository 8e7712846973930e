"""bench/bench_memory_families.py on the CPU with tiny shapes of every family, so that the GPU run cannot rot: it trains
each cohort, writes its table, and sizes each base exactly as submission does from the saved weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import single_torch_thread  # noqa: F401 (an autouse fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_memory_families as bench  # noqa: E402

from lorafleet.scheduler import submission  # noqa: E402


def test_the_bench_trains_both_cohorts_of_tiny_shapes_and_writes_its_table(tmp_path):
    shapes = ["llama-3.1-8b", "gpt2-xl", "qwen1.5-moe-a2.7b"]
    rows = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--shapes", ",".join(shapes),
                       "--out", str(tmp_path)])
    assert [(row["shape"], row["cohort"]) for row in rows] == [(s, c) for s in shapes for c in ("lora", "mixed")]
    assert all("error" not in row and row["planned_bytes"] > row["planned_base_bytes"] > 0 for row in rows)
    assert all(row["step_tokens"] == 4 * 2 * 32 for row in rows)  # every job's micro-batch is its whole 2x32
    assert all(row["peak_bytes"] is None and row["ratio"] is None for row in rows)  # no CUDA peak on the CPU
    by_cohort = {(row["shape"], row["cohort"]): row["planned_bytes"] for row in rows}
    assert all(by_cohort[shape, "mixed"] > by_cohort[shape, "lora"] for shape in shapes)  # DoRA's magnitudes
    assert json.loads((tmp_path / "memory_families.json").read_text()) == rows
    table = (tmp_path / "memory_families.md").read_text()
    assert all(f"| {shape} |" in table for shape in shapes)


@pytest.mark.parametrize("name", sorted(bench.SHAPES))
def test_the_bench_plans_each_cohort_as_submission_plans_it_from_the_saved_base(name, tmp_path):
    """The bench reads the linear layers from the model in memory (it saves no weights, and submission's reader
    needs redis, which the device image lacks); the plans must be the ones submission makes from the saved base."""
    model = bench.build_model(bench.tiny(bench.SHAPES[name]), torch.device("cpu"))
    model.save_pretrained(tmp_path)
    specs = [bench.job_spec(tmp_path, method, dora, (4, 64), 1, seed) for seed, (method, dora)
             in enumerate(bench.cohort_jobs("mixed", 4))]
    from_saved = bench.planned_bytes(submission.model_shape(str(tmp_path)), specs, "bfloat16")
    assert bench.planned_bytes(bench.model_shape(model), specs, "bfloat16") == from_saved


def test_an_unknown_shape_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(SystemExit, match="unknown shape.* llama-9b; expected some of llama-3.1-8b, mistral-7b"):
        bench.main(["--tiny", "--device", "cpu", "--shapes", "llama-9b", "--out", str(tmp_path)])
