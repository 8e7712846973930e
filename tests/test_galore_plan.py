"""A GaLore job's plan: the GPU time its tenant is charged (fair share) and the scheduler's remaining-work estimate
start from is a full fine-tune's, more than a LoRA job's on the same base and tokens."""

from __future__ import annotations

from lorafleet.scheduler.memory import FULL_FINE_TUNE_FLOPS, ModelShape, plan_galore_job, plan_job

SHAPE = ModelShape(64, 128, 2, 4, 2, 360)


def test_a_galore_job_is_charged_a_full_fine_tunes_gpu_time():
    tokens = 1_000_000
    lora = plan_job("base|none|auto", "/b", SHAPE, 8, ("q_proj", "v_proj"), 4, 256, "none", "auto", tokens)
    galore = plan_galore_job("galore|job", "/b", SHAPE, 8, "std", ("q_proj", "v_proj"), 4, 256, "auto", tokens)
    assert FULL_FINE_TUNE_FLOPS > 1
    assert galore.est_gpu_seconds == lora.est_gpu_seconds * FULL_FINE_TUNE_FLOPS
    half = plan_galore_job("galore|job", "/b", SHAPE, 8, "std", ("q_proj", "v_proj"), 4, 256, "auto", tokens // 2)
    assert half.est_gpu_seconds == galore.est_gpu_seconds / 2, "in proportion to its tokens"
