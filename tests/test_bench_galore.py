"""bench/bench_galore.py's smoke run on the CPU: both optimizers train, and what each keeps is what the memory model
counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_galore import main  # noqa: E402
from helpers_models import single_torch_thread  # noqa: E402,F401 (an autouse fixture)


def test_the_galore_bench_measures_less_optimizer_state_than_adamw_as_planned(tmp_path):
    rows = main(["--shape", "tiny", "--device", "cpu", "--rank", "8", "--warmup", "1", "--steps", "2",
                 "--out", str(tmp_path)])
    adamw, galore = rows
    assert [adamw["optimizer"], galore["optimizer"]] == ["adamw", "galore"]
    for row in rows:
        assert row["state_gib"] == row["planned_state_gib"]
        assert row["tokens_per_s"] > 0 and row["planned_gib"] > row["state_gib"]
    assert galore["state_gib"] < adamw["state_gib"]
    assert adamw["refresh_step_s"] is None and galore["refresh_step_s"] > 0
    assert json.loads((tmp_path / "galore_tiny.json").read_text())["rows"] == rows
