"""Malformed specs through the real submission path (worker subprocess): each gets a clear error naming the problem
and leaves no trace in the job store. Plus base-model lookup and the published JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from lorafleet.scheduler import keys
from lorafleet.scheduler.broker import MAX_MESSAGE_BYTES
from lorafleet.scheduler.spec import JobSpec, SpecError, parse_spec

TEN_MB = 10 * 1024 * 1024

# (case, how to change a valid spec, expected message). `{me}`/`{other}` = the tenants' names, `{outside}` = a file
# outside the data root.
MALFORMED = [
    ("wrong type int", lambda s, e: s["hyperparameters"].update(epochs="three"), r"hyperparameters\.epochs"),
    ("wrong type nested", lambda s, e: s.update(adapter={"r": [16]}), r"adapter\.r"),
    ("wrong type enum", lambda s, e: s.update(quantization="fp4"), r"quantization"),
    ("huge rank", lambda s, e: s.update(adapter={"r": 10**9}), r"adapter\.r: .*less than or equal to 256"),
    ("huge seq len", lambda s, e: s["hyperparameters"].update(max_seq_len=10**7), r"hyperparameters\.max_seq_len"),
    ("huge int overflow", lambda s, e: s["hyperparameters"].update(seed=2**80), r"hyperparameters\.seed"),
    ("zero lr", lambda s, e: s["hyperparameters"].update(learning_rate=0), r"hyperparameters\.learning_rate"),
    ("negative epochs", lambda s, e: s["hyperparameters"].update(epochs=-1), r"hyperparameters\.epochs"),
    ("priority out of range", lambda s, e: s.update(priority=10), r"priority"),
    ("unknown field", lambda s, e: s.update(gpu="a100"), r"gpu: unknown field"),
    ("unknown nested field", lambda s, e: s["hyperparameters"].update(lr=1), r"hyperparameters\.lr: unknown field"),
    ("missing base model", lambda s, e: s.pop("base_model"), r"base_model: Field required"),
    ("bad name", lambda s, e: s.update(name="../../etc"), r"name: .*letters, digits"),
    ("nul byte", lambda s, e: s.update(dataset=s["dataset"] + "\x00"), r"dataset: .*printable"),
    ("lone surrogate (not UTF-8)", lambda s, e: s.update(dataset=s["dataset"] + "\udcff"), r"dataset: .*unicode"),
    ("path traversal", lambda s, e: s.update(dataset="{me}/../{other}/train.jsonl".format(**e)), r"dataset: '\.\.'"),
    ("absolute path outside", lambda s, e: s.update(dataset="/etc/passwd"), r"dataset: .*outside your data areas"),
    ("other tenant's area", lambda s, e: s.update(dataset="{other}/train.jsonl".format(**e)), r"outside your data"),
    ("other tenant via file://", lambda s, e: s.update(dataset="file://{other_area}/train.jsonl".format(**e)),
     r"outside your data"),
    ("symlink escape", lambda s, e: s.update(dataset="{me}/escape.jsonl".format(**e)), r"outside your data areas"),
    ("symlink to other tenant", lambda s, e: s.update(dataset="{me}/peek.jsonl".format(**e)), r"outside your data"),
    ("file:// with a host", lambda s, e: s.update(dataset="file://evil.example/x.jsonl"), r"must not name a host"),
    ("remote scheme", lambda s, e: s.update(dataset="s3://bucket/x.jsonl"), r"scheme 's3' not supported"),
    ("missing dataset file", lambda s, e: s.update(dataset="{me}/nope.jsonl".format(**e)), r"no such file"),
    ("validation traversal", lambda s, e: s.update(validation_dataset="../x.jsonl"), r"validation_dataset: '\.\.'"),
    ("missing local model", lambda s, e: s.update(base_model=s["base_model"] + "-gone"), r"base_model: no such local dir"),
    ("model outside the model roots", lambda s, e: s.update(base_model="/usr/lib"), r"base_model: '/usr/lib' is not under the operator's model roots"),
    ("model id not cached", lambda s, e: s.update(base_model="meta-llama/Llama-3-8B"),
     r"base_model: 'meta-llama/Llama-3-8B' is not in the local model cache"),
    ("cached model, unknown revision", lambda s, e: s.update(base_model="test-org/tiny-model",
                                                            base_model_revision="v9"), r"at revision 'v9'"),
    ("revision escaping the cache", lambda s, e: s.update(base_model="test-org/tiny-model",
                                                           base_model_revision="../../../etc"),
     r"base_model_revision: '../../../etc' is not a branch, tag or commit name"),
    ("10 MB spec", lambda s, e: s.update(name="a" * TEN_MB), rf"message refused: the message is over the limit of {MAX_MESSAGE_BYTES}"),
    ("100 KB spec", lambda s, e: s.update(name="a" * 100_000), r"spec is \d+ bytes, the limit is 65536"),
    ("nola settings on lora", lambda s, e: s.update(adapter={"type": "lora", "nola": {}}), r"adapter: .*nola"),
]


@pytest.fixture
def two_tenants(make_tenant, tmp_path):
    me, other = make_tenant("me"), make_tenant("other")
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"text": "secret"}\n')
    (me.area / "escape.jsonl").symlink_to(outside)
    (me.area / "peek.jsonl").symlink_to(other.area / "train.jsonl")
    return me, other


def job_keys(store) -> set[str]:
    return set(store.r.scan_iter(match=keys.PREFIX + "job:*", count=1000))


@pytest.mark.parametrize("case, change, message", MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_malformed_spec_is_refused_without_trace(call, store, two_tenants, base_model_dir, case, change, message):
    me, other = two_tenants
    spec = {"base_model": str(base_model_dir), "dataset": me.dataset, "hyperparameters": {"max_steps": 3}}
    change(spec, {"me": me.name, "other": other.name, "other_area": other.area})
    before = job_keys(store)
    with pytest.raises(ValueError, match=message) as refused:
        call("lorafleet.submit_job", me.token, spec)
    assert type(refused.value) is ValueError  # the built-in type, catchable without lorafleet installed
    assert len(str(refused.value)) < 1000
    assert job_keys(store) == before
    assert store.counts(me.name) == dict.fromkeys(keys.JOB_STATES, 0)
    assert store.r.zcard(keys.tenant_jobs(me.name)) == 0


def test_spec_as_json_text_and_non_json(call, store, make_tenant, base_model_dir):
    me = make_tenant("me")
    text = json.dumps({"base_model": str(base_model_dir), "dataset": me.dataset})
    assert call("lorafleet.submit_job", me.token, text)["state"] == "queued"
    with pytest.raises(ValueError, match="not JSON"):
        call("lorafleet.submit_job", me.token, text[:-1])
    with pytest.raises(ValueError, match="expected a JSON object"):
        call("lorafleet.submit_job", me.token, [text])
    with pytest.raises(ValueError, match="larger than 65536"):  # within one message, over a spec's limit
        call("lorafleet.submit_job", me.token, " " * 100_000)
    with pytest.raises(ValueError, match=f"message refused: the message is over the limit of {MAX_MESSAGE_BYTES} bytes"):
        call("lorafleet.submit_job", me.token, " " * TEN_MB)
    assert store.counts(me.name)["queued"] == 1


def test_accepted_locations(call, make_tenant, data_root, base_model_dir):
    me = make_tenant("me")
    (data_root / "shared" / f"{me.name}-common.jsonl").write_text('{"text": "hello"}\n')
    for dataset, base_model in [
        (f"file://{me.area}/train.jsonl", str(base_model_dir)),
        (f"shared/{me.name}-common.jsonl", "test-org/tiny-model"),
        (str(me.area / "train.jsonl"), f"file://{base_model_dir}"),
    ]:
        job = call("lorafleet.submit_job", me.token, {"base_model": base_model, "dataset": dataset})
        assert job["state"] == "queued" and job["spec"]["dataset"] == dataset
    pinned = {"base_model": "test-org/tiny-model", "base_model_revision": "main", "dataset": me.dataset}
    assert call("lorafleet.submit_job", me.token, pinned)["state"] == "queued"


def test_spec_bytes_must_be_utf8_and_small():
    with pytest.raises(SpecError, match=r"not UTF-8 \(byte 19\)"):
        parse_spec(b'{"base_model": "caf\xe9", "dataset": "x"}')
    with pytest.raises(SpecError, match="limit is 65536"):
        parse_spec(b" " * TEN_MB)


def test_schema_command_prints_a_valid_json_schema():
    out = subprocess.run(
        [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", "schema"], capture_output=True, text=True, check=True
    ).stdout
    schema = json.loads(out)
    assert schema == JobSpec.model_json_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    validator.validate({"base_model": "org/model", "dataset": "me/train.jsonl", "adapter": {"r": 8}})
    for bad in ({"dataset": "x"}, {"base_model": "m", "dataset": "x", "surprise": 1},
                {"base_model": "m", "dataset": "x", "adapter": {"r": 0}}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
