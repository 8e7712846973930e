"""GaLore jobs in the spec and the planner (issue 18): `adapter.type: "galore"` is accepted with galore-torch's
defaults, refused with clear messages where it cannot run, sized by `size_galore_job` and planned alone."""

from __future__ import annotations

import pytest

from helpers_models import build_tiny_model
from lorafleet.scheduler import auto
from lorafleet.scheduler.memory import ModelShape, estimate_activation_bytes, size_galore_job
from lorafleet.scheduler.policy import ExecutorView, PlanConfig, QueuedJob, plan
from lorafleet.scheduler.spec import ALL_PROJECTIONS, SpecError, parse_spec
from lorafleet.scheduler.submission import model_shape, plan_for

SHAPE_3B = ModelShape(hidden_size=3072, intermediate_size=8192, num_layers=28, num_attention_heads=24,
                      num_kv_heads=8, vocab_size=128256)


def galore_spec(adapter: dict | None = None, **fields):
    return parse_spec({"base_model": "/models/base", "dataset": "t/train.jsonl",
                       "adapter": {"type": "galore", **(adapter or {})}, **fields})


def test_a_galore_job_gets_galore_torch_defaults_and_keeps_them_through_a_round_trip():
    spec = galore_spec()
    settings = spec.adapter.galore
    assert (settings.rank, settings.update_proj_gap, settings.scale, settings.proj_type) == (128, 200, 0.25, "std")
    assert spec.adapter.target_modules == ALL_PROJECTIONS
    assert parse_spec(spec.model_dump()) == spec, "a stored spec parses back to the same job"
    given = galore_spec({"galore": {"rank": 8, "update_proj_gap": 50, "scale": 1.0, "proj_type": "left"},
                         "target_modules": ["q_proj", "v_proj"]})
    assert given.adapter.galore.rank == 8 and given.adapter.galore.proj_type == "left"


@pytest.mark.parametrize("adapter, fields, named", [
    ({"r": 8}, {}, "takes no r"),
    ({"lora_alpha": 8}, {}, "takes no lora_alpha"),
    ({"use_rslora": True}, {}, "takes no use_rslora"),
    ({"use_dora": True}, {}, "use_dora"),
    ({"loraplus_lr_ratio": 8}, {}, "loraplus_lr_ratio"),
    ({"nola": {"num_basis": 4}}, {}, "nola"),
    ({"vera": {"d_initial": 0.5}}, {}, "vera"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, {}, "target_parameters"),
    ({"galore": {"rank": 0}}, {}, "adapter.galore.rank"),
    ({"galore": {"proj_type": "diagonal"}}, {}, "adapter.galore.proj_type"),
    ({"galore": {"update_proj_gap": 0}}, {}, "adapter.galore.update_proj_gap"),
    ({}, {"quantization": "nf4"}, "quantized base"),
    ({}, {"method": "dpo", "dataset_format": "preference"}, "method 'sft' only"),
    ({}, {"method": "orpo"}, "method 'sft' only"),
])
def test_a_galore_job_that_cannot_run_is_refused_naming_why(adapter, fields, named):
    with pytest.raises(SpecError, match=named):
        galore_spec(adapter, **fields)


def test_galore_settings_are_refused_on_a_lora_adapter():
    with pytest.raises(SpecError, match="'galore' settings are only allowed with type 'galore'"):
        parse_spec({"base_model": "/m", "dataset": "t/train.jsonl", "adapter": {"galore": {"rank": 4}}})


def test_a_galore_job_is_planned_with_its_own_compatibility_key_and_its_galore_size(tmp_path):
    model = build_tiny_model(tmp_path / "llama")
    spec = galore_spec({"galore": {"rank": 4}}, base_model=str(model),
                       hyperparameters={"max_steps": 3, "batch_size": 2, "max_seq_len": 64})
    first, second = plan_for(spec, model, 1000), plan_for(spec, model, 1000)
    assert first.compat_key != second.compat_key, "two GaLore jobs of one base never share a key"
    lora = plan_for(parse_spec({"base_model": str(model), "dataset": "t/train.jsonl"}), model, 1000)
    assert first.compat_key != lora.compat_key
    for dtype, size in first.sizes.items():
        assert size == size_galore_job(model_shape(str(model.resolve())), 4, "std", ALL_PROJECTIONS, 2, 64, dtype)


def test_the_planner_never_puts_a_job_beside_a_galore_job(tmp_path):
    model = build_tiny_model(tmp_path / "llama")
    hp = {"max_steps": 3, "batch_size": 1, "max_seq_len": 64}
    galore = galore_spec({"galore": {"rank": 4}}, base_model=str(model), hyperparameters=hp)
    lora = parse_spec({"base_model": str(model), "dataset": "t/train.jsonl", "hyperparameters": hp})
    plans = [plan_for(spec, model, 1000) for spec in (galore, lora, galore)]  # each job planned at its submission
    jobs = [QueuedJob.from_plan(f"job-{i}", "acme", 5, float(i), p) for i, p in enumerate(plans)]
    executor = ExecutorView("exec-1", total_bytes=64 * 2**30, free_bytes=64 * 2**30)
    assignments = plan(jobs, [executor], {}, 10.0, PlanConfig())
    assert [a.job_id for a in assignments] == ["job-0"], "one executor, room for all: the GaLore job goes alone"


def test_an_auto_learning_rate_of_a_galore_job_is_a_full_fine_tuning_rate():
    assert auto.base_learning_rate("galore") == 1e-5
    spec = galore_spec(hyperparameters={"max_seq_len": 128}, dtype="float32")
    sample = auto.DatasetSample(records=10_000, sample_records=100, sample_tokens=100 * 128)
    resolved = auto.resolve(spec, frozenset({"learning_rate", "batch_size"}), SHAPE_3B, sample)
    assert resolved.hyperparameters.learning_rate == 1e-5
    whole = size_galore_job(SHAPE_3B, 128, "std", ALL_PROJECTIONS, 1, 128, "float32").job_bytes
    assert whole > auto.JOB_BYTES_BUDGET, "the job alone at batch 1 is over the budget..."
    batch = resolved.hyperparameters.batch_size
    assert batch > 1, "...but its weights and state do not grow with the batch"
    activations = [estimate_activation_bytes(SHAPE_3B, b, 128, "float32") for b in (batch, 2 * batch)]
    assert activations[0] <= auto.JOB_BYTES_BUDGET < activations[1], "the batch is as large as its activations allow"
