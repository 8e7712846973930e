"""The memory model's activations held to the bytes autograd really saves in a cohort step, counted on the CPU with
`saved_tensors_hooks` (each storage once, however many views of it are saved), for the families whose layer runs
Hugging Face's modules on the CPU as on a GPU (GPT-2, Gemma 2 and 3), DoRA's extra rows, and a preference job's
pairs. The fused decoder's kernels (Llama's family) run their references on the CPU, which keep other tensors than
the kernels: those are checked on the GPU (bench/bench_memory_families.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import single_torch_thread, step_with_saved_bytes  # noqa: F401 (an autouse fixture)
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_memory_families as bench  # noqa: E402

from lorafleet.executor.cohort import Cohort  # noqa: E402
from lorafleet.scheduler.memory import ModelShape, layer_activation_bytes, plan_job  # noqa: E402

SEQUENCE = 32
VOCAB = 512
# Proportional to the published shapes (intermediate 4 x hidden, Gemma's head_dim 256 over a narrower hidden), small.
FAMILIES = {
    "gpt2": dict(model_type="gpt2", n_embd=256, n_head=4, n_positions=256, vocab_size=VOCAB),
    "gemma2": dict(model_type="gemma2", hidden_size=224, intermediate_size=896, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=4096,
                   vocab_size=VOCAB),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=1024,
                        vocab_size=VOCAB),
}
LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=1,
             vocab_size=VOCAB)


def with_layers(shape: dict, layers: int) -> dict:
    return {**shape, ("n_layer" if shape["model_type"] == "gpt2" else "num_hidden_layers"): layers}


def saved_bytes(shape: dict, jobs: list[tuple[str, bool]], sequences: int, scratch: Path) -> tuple[int, int, Cohort]:
    """(bytes autograd saves in one step, tokens of the step, the cohort) for a cohort of `jobs` (method, DoRA?),
    each of `sequences` sequences of SEQUENCE tokens. Left out: the base's weights (not activations)."""
    model = bench.build_model(shape, torch.device("cpu"))
    bench.save_tokenizer(scratch, VOCAB)
    with bench.cohort_base(model, AutoTokenizer.from_pretrained(scratch)):
        cohort = Cohort(scratch, device="cpu")
    for job, (method, dora) in enumerate(jobs):
        spec = bench.job_spec(scratch, method, dora, (sequences, SEQUENCE), 5, seed=job)
        cohort.add_job(f"job-{job}", spec, bench.write_data(scratch, job, method, (sequences, SEQUENCE), VOCAB))
    results, saved = step_with_saved_bytes(cohort)
    assert not [result.error for result in results.values() if result.error]
    return saved, cohort.step_tokens, cohort


def per_token(shape: dict, jobs: list[tuple[str, bool]], tmp_path: Path) -> float:
    """Saved bytes per token: the slope between micro-batches of 2 and 4 sequences (constants drop out)."""
    (small, small_tokens, _), (large, large_tokens, _) = (
        saved_bytes(shape, jobs, sequences, tmp_path / f"{sequences}") for sequences in (2, 4))
    return (large - small) / (large_tokens - small_tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_layers_planned_activations_are_within_10_percent_of_what_autograd_saves(family, tmp_path):
    shape = FAMILIES[family]
    one, two = (per_token(with_layers(shape, layers), [("sft", False)], tmp_path / f"{layers}") for layers in (1, 2))
    counted = two - one  # one more layer
    _, _, cohort = saved_bytes(with_layers(shape, 1), [], 1, tmp_path / "shape")
    config = json.loads(cohort.model.config.to_json_string(use_diff=False))  # every field, as config.json has them
    planned = layer_activation_bytes(ModelShape.from_config(config), "float32", SEQUENCE)
    assert counted == pytest.approx(planned, rel=0.10), f"{family}: counted {counted:.0f} B/token, planned {planned}"


def test_a_dora_job_keeps_two_activations_per_token_of_its_own_per_output_feature(tmp_path):
    shape = with_layers(LLAMA, 1)
    lora = per_token(shape, [("sft", False), ("sft", False)], tmp_path / "lora")
    dora = per_token(shape, [("sft", False), ("sft", True)], tmp_path / "dora")
    _, _, cohort = saved_bytes(shape, [], 1, tmp_path / "shape")
    out_features = sum(module.out_features for module in cohort.model.modules() if type(module) is torch.nn.Linear
                       and module is not cohort.model.lm_head)
    # per token of the cohort, half of them the DoRA job's: 2 fp32 activations per DoRA token, not a view of the
    # whole cohort's base output (which kept 3)
    assert (dora - lora) / out_features == pytest.approx(2 * 4 / 2, rel=0.05)


def test_a_preference_job_is_planned_for_both_sequences_of_its_pairs(tmp_path):
    _, tokens, cohort = saved_bytes(with_layers(LLAMA, 1), [("dpo", False)], 4, tmp_path)
    spec = cohort.jobs["job-0"].spec
    hp = spec.hyperparameters
    shape = ModelShape.from_config(with_layers(LLAMA, 1))
    plan = plan_job("key", "base", shape, spec.adapter.r, spec.adapter.target_modules, hp.batch_size, hp.max_seq_len,
                    "none", "float32", 0, method=spec.method)
    sft = plan_job("key", "base", shape, spec.adapter.r, spec.adapter.target_modules, hp.batch_size, hp.max_seq_len,
                   "none", "float32", 0)
    assert hp.batch_size == 2 and plan.tokens_per_step == tokens == 4 * SEQUENCE
    assert plan.sizes["float32"].activation_bytes == 2 * sft.sizes["float32"].activation_bytes
