"""Checkpoints: PEFT export loads to the same logits, exact resume in a fresh process; all four families; nf4/int8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers_models import (  # noqa: F401 (fixtures: single_torch_thread is autouse, llama)
    FAMILIES,
    alpaca_rows,
    build_tiny_model,
    llama,
    single_torch_thread,
    write_jsonl,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafleet.executor.checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_STATE, _Slot,
                                           read_training_state)
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.model import quantization_config
from lorafleet.scheduler.spec import parse_spec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", alpaca_rows(11, seed=4))


def make_spec(model_dir, adapter=None, quantization="none", **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "adapter": adapter or {}, "quantization": quantization}
    raw["hyperparameters"] = {"batch_size": 2, "learning_rate": 2e-2, **hyperparameters}
    return parse_spec(raw)


def assert_peft_gives_the_same_logits(cohort, job_id, directory, base):
    sequence = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    peft_model = PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([sequence])).logits[0]
    got = cohort.logits(job_id, sequence)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(torch.tensor([sequence])).logits[0]
    assert not torch.allclose(got, base_logits, atol=1e-4), "the adapter should have moved the logits"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("adapter_type", ["lora", "nola"])
def test_peft_export_loads_to_the_same_logits(tmp_path, family, adapter_type):
    model_dir = build_tiny_model(tmp_path / "model", family)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(6))
    adapter = {"type": adapter_type, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]}
    cohort = Cohort(model_dir)
    cohort.add_job("a", make_spec(model_dir, adapter=adapter, max_steps=3, learning_rate=0.1), data)
    while cohort.active_jobs():
        cohort.step()
    directory = cohort.checkpoint("a", tmp_path / "ckpt")
    assert {p.name for p in directory.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_STATE}
    keys = load_file(str(directory / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 4 * 2  # A and B, 4 modules, 2 layers
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    assert_peft_gives_the_same_logits(cohort, "a", directory, base)


RESUME_SCRIPT = """
import json, sys
from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec
model_dir, dataset, checkpoints, out = sys.argv[1:5]
specs = json.loads(sys.argv[5])
cohort = Cohort(model_dir)
for job_id, spec in specs.items():
    cohort.add_job(job_id, parse_spec(spec), dataset, resume_from=f"{checkpoints}/{job_id}")
losses = {job_id: [] for job_id in specs}
while cohort.active_jobs():
    for job_id, result in cohort.step().items():
        losses[job_id].append(result.loss)
for job_id in specs:
    cohort.checkpoint(job_id, f"{out}/{job_id}")
print(json.dumps(losses))
"""


def run_cohort(cohort: Cohort, steps: int | None = None) -> dict[str, list[float]]:
    losses: dict[str, list[float]] = {}
    while cohort.active_jobs() and (steps is None or len(next(iter(losses.values()), [])) < steps):
        for job_id, result in cohort.step().items():
            losses.setdefault(job_id, []).append(result.loss)
    return losses


def test_resume_in_a_fresh_process_is_identical_to_an_uninterrupted_run(tmp_path, llama, dataset):
    # A LoRA and a NOLA job in one cohort, each with dropout (job RNG), accumulation (stopped half-way: pending
    # grads), warmup + cosine (scheduler) and 2 epochs (data cursor); the NOLA job also has a different batch size.
    common = dict(epochs=2, gradient_accumulation_steps=2, warmup_steps=2, lr_scheduler="cosine", weight_decay=0.1)
    specs = {
        "lora": make_spec(llama, adapter={"r": 4, "lora_dropout": 0.1}, seed=3, **common),
        "nola": make_spec(llama, adapter={"type": "nola", "r": 4, "lora_dropout": 0.1, "nola": {"num_basis": 8}},
                          batch_size=3, seed=4, **common),
    }

    def cohort_of_both() -> Cohort:
        cohort = Cohort(llama)
        for job_id, spec in specs.items():
            cohort.add_job(job_id, spec, dataset)
        return cohort

    uninterrupted = cohort_of_both()
    losses = run_cohort(uninterrupted)
    assert len(losses["lora"]) == 12 and len(losses["nola"]) == 8  # ceil(11/2) and ceil(11/3) batches, 2 epochs
    for job_id in specs:
        uninterrupted.checkpoint(job_id, tmp_path / "full" / job_id)

    first = cohort_of_both()
    stop_at = 7  # the lora job is in its 2nd epoch, half-way through an accumulation
    first_losses = run_cohort(first, steps=stop_at)
    for job_id in specs:
        first.checkpoint(job_id, tmp_path / "partial" / job_id)
    del first

    finished = subprocess.run(
        [sys.executable, "-P", "-c", RESUME_SCRIPT, str(llama), str(dataset), str(tmp_path / "partial"),
         str(tmp_path / "resumed"), json.dumps({job_id: spec.model_dump_json() for job_id, spec in specs.items()})],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed_losses = json.loads(finished.stdout.strip().splitlines()[-1])
    for job_id in specs:
        assert first_losses[job_id] + resumed_losses[job_id] == losses[job_id]
        want = load_file(str(tmp_path / "full" / job_id / ADAPTER_WEIGHTS))
        got = load_file(str(tmp_path / "resumed" / job_id / ADAPTER_WEIGHTS))
        assert want.keys() == got.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), job_id


def test_checkpoint_due_every_n_steps_and_at_the_end(llama, dataset):
    cohort = Cohort(llama)
    cohort.add_job("job", make_spec(llama, max_steps=5, checkpoint_every=2, gradient_accumulation_steps=2), dataset)
    due = []
    while cohort.active_jobs():
        result = cohort.step()["job"]
        due.append((result.step, result.checkpoint_due))
    assert [step for step, is_due in due if is_due] == [2, 4, 5]
    assert len(due) == 10


def test_resume_refuses_a_state_saved_for_another_spec(tmp_path, llama, dataset):
    cohort = Cohort(llama)
    cohort.add_job("job", make_spec(llama, max_steps=2), dataset)
    cohort.step()
    cohort.checkpoint("job", tmp_path / "ckpt")
    with pytest.raises(ValueError, match="different job spec"):
        cohort.add_job("other", make_spec(llama, max_steps=3), dataset, resume_from=tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no training_state.pt"):
        cohort.add_job("other", make_spec(llama, max_steps=2), dataset, resume_from=tmp_path)


def test_a_state_saved_before_a_spec_field_existed_resumes_with_its_default(tmp_path, llama, dataset):
    """A job checkpointed by an older release (its saved spec lacks fields added since) resumes after the upgrade."""
    spec = make_spec(llama, max_steps=4)
    cohort = Cohort(llama)
    cohort.add_job("job", spec, dataset)
    cohort.step()
    cohort.checkpoint("job", tmp_path / "ckpt")
    _, state = read_training_state(tmp_path / "ckpt")
    older = json.loads(state["spec"])
    for field in ("use_dora", "use_rslora"):  # added in a later release, at their defaults here
        assert older["adapter"].pop(field) is False
    # and written as that release wrote it: torch.save of the state itself (format 1)
    torch.save({**state, "format": 1, "spec": json.dumps(older)}, tmp_path / "ckpt" / TRAINING_STATE)
    cohort.add_job("resumed", spec, dataset, resume_from=tmp_path / "ckpt")
    assert cohort.jobs["resumed"].step == 1


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_on_cpu_trains_and_exports(tmp_path, llama, dataset, quantization):
    """bitsandbytes 0.50 runs both 4-bit and 8-bit layers on the CPU, so QLoRA is tested here, not skipped."""
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    cohort = Cohort(llama, quantization=quantization)
    layer_type = type(cohort.model.model.layers[0].mlp.up_proj).__name__
    assert layer_type == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quantization]
    spec = make_spec(llama, adapter={"r": 4, "target_modules": ["q_proj", "up_proj"]}, quantization=quantization,
                     batch_size=11, max_steps=4, learning_rate=0.05)
    cohort.add_job("job", spec, dataset)
    history = []
    while cohort.active_jobs():
        history.append(cohort.step()["job"])
    assert all(r.error is None for r in history) and history[-1].done
    assert history[-1].loss < history[0].loss  # one batch = the whole dataset, so losses are comparable
    directory = cohort.checkpoint("job", tmp_path / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(
        llama, attn_implementation="sdpa", quantization_config=quantization_config(quantization, torch.float32)
    )
    assert_peft_gives_the_same_logits(cohort, "job", directory, base)


def test_bf16_compute_with_fp32_adapters_exports_within_bf16_noise(tmp_path, llama, dataset):
    cohort = Cohort(llama, dtype="bfloat16")
    assert next(cohort.model.parameters()).dtype == torch.bfloat16
    spec = parse_spec({"base_model": str(llama), "dataset": "d", "dtype": "bfloat16", "adapter": {"lora_dropout": 0.1},
                       "hyperparameters": {"batch_size": 11, "max_steps": 4, "learning_rate": 5e-2}})
    cohort.add_job("job", spec, dataset)
    assert all(p.dtype == torch.float32 for p in cohort.jobs["job"].adapter.parameters())
    losses = []
    while cohort.active_jobs():
        losses.append(cohort.step()["job"].loss)
    assert losses[-1] < losses[0]
    directory = cohort.checkpoint("job", tmp_path / "ckpt")
    sequence = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([sequence])).logits[0].float()
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor([sequence])).logits[0].float()
    got = cohort.logits("job", sequence).float()
    # PEFT runs the LoRA path in the adapter's fp32, the cohort in the compute dtype (bf16)
    assert (got - want).abs().max() < 0.1 * (want - base_logits).abs().max()


def test_a_host_copy_of_a_state_is_equal_independent_and_saves_only_its_own_elements(tmp_path):
    from lorafleet.executor.checkpoint import HostCopy

    others = torch.arange(4000, dtype=torch.float32)  # a storage the job's tensors are views of (other jobs' grads)
    state = {"step": 3, "name": "job", "grads": [others[:10].view(2, 5), others[10:40], None],
             "moments": ({"exp_avg": torch.ones(3, dtype=torch.bfloat16)}, torch.tensor([7], dtype=torch.int64)),
             "transposed": torch.arange(6.0).view(2, 3).t()}
    copied = HostCopy.start(state).get()
    assert copied["step"] == 3 and copied["name"] == "job" and copied["grads"][2] is None
    pairs = [(copied["grads"][0], state["grads"][0]), (copied["grads"][1], state["grads"][1]),
             (copied["moments"][0]["exp_avg"], state["moments"][0]["exp_avg"]),
             (copied["moments"][1], state["moments"][1]), (copied["transposed"], state["transposed"])]
    for got, want in pairs:
        assert got.dtype == want.dtype and torch.equal(got, want)
    others.add_(1)  # the live tensors train on; the copy keeps what they were
    assert copied["grads"][1][0].item() == 10
    torch.save(copied, tmp_path / "state.pt")  # 46 floats and a few more: a saved view of `others` writes 4000
    assert (tmp_path / "state.pt").stat().st_size < 4000 * 4
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(torch.equal(loaded["grads"][i], copied["grads"][i]) for i in (0, 1))


def test_a_host_copy_writes_a_safetensors_file_that_safetensors_reads_back(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lorafleet.executor.checkpoint import HostCopy

    state = {"b.lora_B.weight": torch.randn(6, 2), "a.lora_A.weight": torch.randn(2, 5).t(),
             "half": torch.arange(3, dtype=torch.bfloat16), "count": torch.tensor([1, 2, 3], dtype=torch.int64),
             "empty": torch.zeros(0), "flag": torch.tensor([True])}
    HostCopy.start(state).write_safetensors(tmp_path / "x.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(tmp_path / "x.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_host_copy_holds_the_state_of_when_it_started_not_of_when_it_is_read():
    from lorafleet.executor.checkpoint import HostCopy

    live = {"data": {"order": [3, 1, 2], "epoch": 0}, "adapter": {"A": torch.zeros(4)}}
    copy = HostCopy.start(live)
    live["data"]["order"].reverse()  # the data cursor and the weights move on before the publisher reads the copy
    live["data"]["epoch"] = 1
    live["adapter"]["A"].add_(1)
    got = copy.get()
    assert got["data"] == {"order": [3, 1, 2], "epoch": 0} and torch.equal(got["adapter"]["A"], torch.zeros(4))


@pytest.mark.parametrize("adapter", [{"r": 4, "use_dora": True}, {"type": "nola", "r": 4}, {"type": "vera", "r": 4},
                                     {"type": "lopa", "lopa": {"num_virtual_tokens": 3, "rank": 2, "head_size": 8}}],
                         ids=["dora", "nola", "vera", "lopa"])
def test_the_export_pinned_ahead_is_the_exports_tensors(tmp_path, llama, dataset, adapter):
    """`Cohort._pin_ahead` sizes a job's export by these tensors: the host memory its checkpoints' copies take."""
    from lorafleet.executor.checkpoint import peft_tensors
    from lorafleet.executor.lopa import LopaAdapter, lopa_tensors

    cohort = Cohort(llama)
    cohort.add_job("a", make_spec(llama, adapter=adapter, max_steps=3), dataset)
    cohort.step()
    job = cohort.jobs["a"]
    ahead = lopa_tensors(job.adapter) if isinstance(job.adapter, LopaAdapter) else peft_tensors(job.adapter)
    export = cohort.snapshot("a", tmp_path, training_state=False).export.tensors.get()
    assert {key: (tensor.shape, tensor.dtype) for key, tensor in ahead.items()} == {
        key: (tensor.shape, tensor.dtype) for key, tensor in export.items()}


def test_a_training_state_file_holds_one_tensor_per_dtype_and_reads_back_the_live_state(tmp_path, llama, dataset):
    """Its ~hundreds of tensors are pickled as flat tensors with their layout, not one by one: torch.save's pickling
    runs on the publisher's thread, holding the GIL the training loop needs."""
    cohort = Cohort(llama)
    cohort.add_job("job", make_spec(llama, max_steps=4), dataset)
    cohort.step()
    cohort.checkpoint("job", tmp_path / "ckpt")
    live = cohort._training_state(cohort.jobs["job"])
    with torch.serialization.safe_globals([_Slot]):
        saved = torch.load(tmp_path / "ckpt" / TRAINING_STATE, weights_only=True)
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(live) if isinstance(leaf, torch.Tensor)]
    assert len(leaves) > 20 and len(saved["flats"]) == len({leaf.dtype for leaf in leaves})
    _, state = read_training_state(tmp_path / "ckpt")
    got = [leaf for leaf in torch.utils._pytree.tree_leaves(state) if isinstance(leaf, torch.Tensor)]
    assert len(got) == len(leaves) and all(torch.equal(a, b) for a, b in zip(got, leaves))
    assert state["step"] == live["step"] == 1 and state["spec"] == live["spec"]
