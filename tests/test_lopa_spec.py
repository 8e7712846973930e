"""LoPA jobs in the spec, the memory model and the planner: `adapter.type: "lopa"` with the authors' defaults, refused
with clear messages where an option does not apply, sized with its prompt rows by `size_lopa_job`, planned beside
LoRA jobs of its base; `lorafleet merge` refuses its export."""

from __future__ import annotations

import pytest
from helpers_models import build_tiny_model, llama, single_torch_thread  # noqa: F401 (fixtures)

from lorafleet.scheduler import auto
from lorafleet.scheduler.memory import (
    ModelShape,
    estimate_activation_bytes,
    lopa_parameter_count,
    size_lopa_job,
)
from lorafleet.scheduler.policy import ExecutorView, PlanConfig, QueuedJob, plan
from lorafleet.scheduler.spec import SpecError, parse_spec
from lorafleet.scheduler.submission import model_shape, plan_for

SHAPE_8B = ModelShape(hidden_size=4096, intermediate_size=14336, num_layers=32, num_attention_heads=32,
                      num_kv_heads=8, vocab_size=128256)


def lopa_spec(adapter: dict | None = None, **fields):
    return parse_spec({"base_model": "/models/base", "dataset": "t/train.jsonl",
                       "adapter": {"type": "lopa", **(adapter or {})}, **fields})


def test_a_lopa_job_gets_the_authors_defaults_and_keeps_them_through_a_round_trip():
    spec = lopa_spec()
    settings = spec.adapter.lopa
    assert (settings.num_virtual_tokens, settings.rank, settings.head_size) == (10, 1, 256)
    assert parse_spec(spec.model_dump()) == spec, "a stored spec parses back to the same job"
    given = lopa_spec({"lopa": {"num_virtual_tokens": 4, "rank": 2, "head_size": 32}}, quantization="nf4")
    assert given.adapter.lopa.num_virtual_tokens == 4 and given.quantization == "nf4"


@pytest.mark.parametrize("adapter, fields, named", [
    ({"target_modules": ["q_proj"]}, {}, "takes no target_modules"),
    ({"r": 8}, {}, "takes no r"),
    ({"lora_alpha": 8}, {}, "takes no lora_alpha"),
    ({"lora_dropout": 0.1}, {}, "takes no lora_dropout"),
    ({"use_rslora": True}, {}, "takes no use_rslora"),
    ({"use_dora": True}, {}, "use_dora applies to type 'lora', not 'lopa'"),
    ({"loraplus_lr_ratio": 8}, {}, "loraplus_lr_ratio applies to type 'lora'"),
    ({"nola": {"num_basis": 4}}, {}, "takes no nola"),
    ({"vera": {"d_initial": 0.5}}, {}, "vera"),
    ({"galore": {"rank": 4}}, {}, "'galore' settings are only allowed with type 'galore'"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, {}, "target_parameters applies to type 'lora'"),
    ({"lopa": {"num_virtual_tokens": 0}}, {}, "adapter.lopa.num_virtual_tokens"),
    ({"lopa": {"rank": 65}}, {}, "adapter.lopa.rank"),
    ({"lopa": {"head_size": 0}}, {}, "adapter.lopa.head_size"),
    ({}, {"method": "dpo", "dataset_format": "preference"}, "method 'sft' only, not 'dpo'"),
    ({}, {"method": "simpo"}, "method 'sft' only, not 'simpo'"),
    ({}, {"method": "orpo"}, "method 'sft' only, not 'orpo'"),
    ({}, {"eval_samples": ["say hi"]}, "eval_samples"),
])
def test_a_lopa_job_that_cannot_run_is_refused_naming_why(adapter, fields, named):
    with pytest.raises(SpecError, match=named):
        lopa_spec(adapter, **fields)


def test_lopa_settings_are_refused_on_a_lora_adapter():
    with pytest.raises(SpecError, match="'lopa' settings are only allowed with type 'lopa'"):
        parse_spec({"base_model": "/m", "dataset": "t/train.jsonl", "adapter": {"lopa": {"rank": 4}}})


def test_a_lopa_job_is_sized_with_its_prompt_rows_and_its_generators_adam_state():
    m, d, batch, length = 10, SHAPE_8B.hidden_size, 4, 512
    size = size_lopa_job(SHAPE_8B, m, 1, 256, batch, length, "none", "bfloat16")
    params = lopa_parameter_count(m, d, d, 256, 1)
    assert params == m * d + 2 * (d * 256 + 256) + 256 * (m + d) + (m + d)
    rows = estimate_activation_bytes(SHAPE_8B, batch, length + m, "bfloat16")
    assert size.activation_bytes == rows + batch * 3 * m * d * 4
    assert size.job_bytes == params * 16 + size.activation_bytes
    assert size.activation_bytes > estimate_activation_bytes(SHAPE_8B, batch, length, "bfloat16")
    quantized = size_lopa_job(SHAPE_8B, m, 1, 256, batch, length, "nf4", "bfloat16")
    assert quantized.base_bytes < size.base_bytes and quantized.job_bytes == size.job_bytes


def test_a_lopa_job_on_any_base_is_planned_with_its_bases_key_and_its_prompt_rows(tmp_path):
    model = build_tiny_model(tmp_path / "gpt2", "gpt2")  # its linear layers are not Llama's: none is targeted
    hp = {"max_steps": 3, "batch_size": 2, "max_seq_len": 64}
    spec = lopa_spec({"lopa": {"num_virtual_tokens": 5}}, base_model=str(model), hyperparameters=hp)
    lopa = plan_for(spec, model, 1000)
    lora = plan_for(parse_spec({"base_model": str(model), "dataset": "t/train.jsonl", "hyperparameters": hp,
                                "adapter": {"target_modules": "all-linear"}}), model, 1000)
    assert lopa.compat_key == lora.compat_key, "a LoPA job shares its base's cohort with LoRA jobs"
    assert (lopa.tokens_per_step, lopa.max_seq_len) == (2 * (64 + 5), 64 + 5)
    assert lopa.tokens == lora.tokens == 3 * 2 * 64, "the run's tokens are its data's"
    shape = model_shape(str(model.resolve()))
    for dtype, size in lopa.sizes.items():
        assert size == size_lopa_job(shape, 5, 1, 256, 2, 64, "none", dtype)
    jobs = [QueuedJob.from_plan(f"job-{i}", "acme", 5, float(i), p) for i, p in enumerate((lopa, lora))]
    executor = ExecutorView("exec-1", total_bytes=64 * 2**30, free_bytes=64 * 2**30)
    assert {a.job_id for a in plan(jobs, [executor], {}, 10.0, PlanConfig())} == {"job-0", "job-1"}


def test_an_auto_lopa_job_gets_prompt_tunings_rate_and_a_batch_its_size_allows():
    assert auto.base_learning_rate("lopa") == 1e-3
    spec = lopa_spec(hyperparameters={"max_seq_len": 128}, dtype="float32")
    sample = auto.DatasetSample(records=10_000, sample_records=100, sample_tokens=100 * 128)
    resolved = auto.resolve(spec, frozenset({"learning_rate", "batch_size"}), SHAPE_8B, sample)
    assert resolved.hyperparameters.learning_rate == 1e-3
    batch = resolved.hyperparameters.batch_size
    assert size_lopa_job(SHAPE_8B, 10, 1, 256, batch, 128, "none", "float32").job_bytes <= auto.JOB_BYTES_BUDGET
    long = lopa_spec(hyperparameters={"max_seq_len": 1024}, dtype="bfloat16")
    longest = auto.resolve(long, frozenset({"batch_size"}), SHAPE_8B, sample).hyperparameters.batch_size
    sizes = [size_lopa_job(SHAPE_8B, 10, 1, 256, b, 1024, "none", "bfloat16").job_bytes for b in (longest, 2 * longest)]
    assert sizes[0] <= auto.JOB_BYTES_BUDGET < sizes[1], "the batch is as large as the LoPA job's size allows"
