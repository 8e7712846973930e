"""A LoPA job's prompt rows cost what tokens cost: on a GPT-2 base (Hugging Face's modules, as on a GPU), the bytes
autograd saves per row of the step are those of a LoRA job's tokens (within 10%), so the memory model's
`size_lopa_job` (activations of max_seq_len + m rows per sequence) sizes it as it sizes tokens."""

from __future__ import annotations

import pytest
from helpers_models import (  # noqa: F401 (an autouse fixture)
    build_tiny_model,
    single_torch_thread,
    step_with_saved_bytes,
    write_jsonl,
)

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

SEQUENCE, PROMPT = 32, 8
ADAPTERS = {"lora": {"r": 4, "target_modules": ["c_attn"]},
            "lopa": {"type": "lopa", "lopa": {"num_virtual_tokens": PROMPT, "rank": 1, "head_size": 32}}}


def saved_bytes(model_dir, kind: str, sequences: int, tmp_path) -> tuple[int, int]:
    """(bytes autograd saves in one step, rows of the step) for one job of `sequences` sequences of SEQUENCE tokens."""
    cohort = Cohort(model_dir)
    # text records longer than max_seq_len: every sequence is cut to exactly SEQUENCE tokens
    data = write_jsonl(tmp_path / f"{kind}-{sequences}.jsonl",
                       [{"text": " ".join(["the quick brown fox"] * 40)} for _ in range(sequences)])
    spec = parse_spec({"base_model": str(model_dir), "dataset": "d", "adapter": ADAPTERS[kind],
                       "hyperparameters": {"batch_size": sequences, "max_seq_len": SEQUENCE, "max_steps": 1}})
    cohort.add_job("job", spec, data)
    results, saved = step_with_saved_bytes(cohort)
    assert results["job"].error is None
    return saved, cohort.step_tokens


def test_a_lopa_jobs_prompt_rows_are_kept_as_tokens_are(tmp_path):
    model = build_tiny_model(tmp_path / "gpt2", "gpt2", hidden=256)
    slopes = {}
    for kind in ADAPTERS:
        (small, small_rows), (large, large_rows) = (saved_bytes(model, kind, n, tmp_path) for n in (2, 4))
        slopes[kind] = (large - small) / (large_rows - small_rows)
        rows_per_sequence = SEQUENCE + (PROMPT if kind == "lopa" else 0)
        assert large_rows - small_rows == 2 * rows_per_sequence, "the step's tokens count the prompt rows"
    # measured: 47,440 B a LoPA row, 48,224 B a LoRA token (its own x·Aᵀ kept besides)
    assert slopes["lopa"] == pytest.approx(slopes["lora"], rel=0.10), slopes
