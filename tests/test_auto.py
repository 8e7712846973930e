"""`scheduler.auto`: the values chosen for "auto" hyperparameters (pure functions, property-tested)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.scheduler import auto
from lorafleet.scheduler.memory import ModelShape, estimate_job_bytes
from lorafleet.scheduler.spec import JobSpec, SpecError, parse_spec

SHAPE_8B = ModelShape(hidden_size=4096, intermediate_size=14336, num_layers=32, num_attention_heads=32,
                      num_kv_heads=8, vocab_size=128256)
SHAPE_SMALL = ModelShape(hidden_size=512, intermediate_size=1024, num_layers=4, num_attention_heads=8, num_kv_heads=8,
                         vocab_size=32000)
records = st.integers(min_value=1, max_value=10_000_000)


def spec(**hyperparameters) -> JobSpec:
    return parse_spec({"base_model": "org/base", "dataset": "t/train.jsonl", "hyperparameters": hyperparameters})


@given(records)
def test_auto_epochs_stay_in_bounds_and_show_a_dataset_at_least_min_examples_records(n):
    epochs = auto.auto_epochs(n)
    assert 1 <= epochs <= auto.MAX_EPOCHS
    assert n * epochs >= min(auto.MIN_EXAMPLES, n * auto.MAX_EPOCHS)


@given(records, records)
def test_a_larger_dataset_never_gets_more_epochs(a, b):
    small, large = sorted((a, b))
    assert auto.auto_epochs(large) <= auto.auto_epochs(small)


@settings(max_examples=60, deadline=None)
@given(records, st.integers(1, 2000), st.integers(1, 4000), st.sampled_from([128, 512, 2048, 8192]))
def test_auto_batch_size_is_a_power_of_two_within_the_memory_budget(n, sample_records, tokens_per_record, seq_len):
    job = spec(max_seq_len=seq_len)
    sample = auto.DatasetSample(n, min(n, sample_records), min(n, sample_records) * tokens_per_record)
    size = auto.auto_batch_size(job, SHAPE_8B, sample)
    assert size >= 1 and size & (size - 1) == 0 and size <= auto.MAX_BATCH_SIZE
    assert size == 1 or estimate_job_bytes(SHAPE_8B, 16, job.adapter.target_modules, size, seq_len,
                                           "float32") <= auto.JOB_BYTES_BUDGET
    assert size == 1 or n // size >= auto.MIN_STEPS_PER_EPOCH, "an epoch keeps at least MIN_STEPS_PER_EPOCH steps"


def test_short_records_get_larger_batches_than_long_ones():
    job = spec(max_seq_len=256)
    short = auto.auto_batch_size(job, SHAPE_SMALL, auto.DatasetSample(100_000, 2000, 2000 * 20))
    long = auto.auto_batch_size(job, SHAPE_SMALL, auto.DatasetSample(100_000, 2000, 2000 * 250))
    assert short > long


def test_a_large_base_gets_a_smaller_batch_than_a_small_one():
    job, sample = spec(max_seq_len=2048), auto.DatasetSample(100_000, 2000, 2000 * 100)
    assert auto.auto_batch_size(job, SHAPE_8B, sample) < auto.auto_batch_size(job, SHAPE_SMALL, sample)


def test_take_auto_leaves_the_rest_of_the_spec_and_resolve_stores_concrete_values():
    raw = {"base_model": "org/base", "dataset": "t/train.jsonl", "adapter": {"type": "nola"},
           "hyperparameters": {"epochs": "auto", "batch_size": 2, "learning_rate": "auto", "max_seq_len": 64}}
    rest, taken = auto.take_auto(raw)
    assert taken == {"epochs", "learning_rate"} and rest["hyperparameters"] == {"batch_size": 2, "max_seq_len": 64}
    resolved = auto.resolve(parse_spec(rest), taken, SHAPE_8B, auto.DatasetSample(10, 10, 300))
    hp = resolved.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.learning_rate) == (auto.auto_epochs(10), 2, auto.base_learning_rate("nola"))


def test_auto_is_refused_where_a_value_must_be_concrete():
    with pytest.raises(SpecError, match="hyperparameters.max_seq_len"):
        parse_spec(auto.take_auto({"base_model": "b", "dataset": "d", "hyperparameters": {"max_seq_len": "auto"}})[0])


def test_a_submission_with_auto_values_stores_the_values_chosen(make_tenant, data_root, hf_cache, tmp_path):
    """The path both APIs take (`accept_submission`): "auto" in, concrete values in the stored spec."""
    from lorafleet.scheduler.submission import accept_submission

    tenant = make_tenant()
    raw = {"base_model": "test-org/tiny-model", "dataset": tenant.dataset,
           "hyperparameters": {"epochs": "auto", "batch_size": "auto", "learning_rate": "auto", "max_seq_len": 256}}
    hp = accept_submission(raw, tenant.name, data_root, hf_cache, [], tmp_path / "datasets").spec.hyperparameters
    assert hp.epochs == auto.auto_epochs(2), "two records: enough epochs to show MIN_EXAMPLES records"
    assert hp.batch_size == 1, "two records leave one sequence per step to keep MIN_STEPS_PER_EPOCH steps"
    assert hp.learning_rate == auto.base_learning_rate("lora")
