"""`lorafleet merge`: a job's exported adapter merged into its base is a plain model with the logits of PEFT's model of
base + adapter (fp32 on the CPU), for every adapter kind a job exports; bad input is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers_models import alpaca_rows, build_tiny_model, llama, single_torch_thread, write_jsonl  # noqa: F401
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lorafleet.executor.cohort import Cohort
from lorafleet.executor.merge import MergeError, merge_adapter
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.cli import main
from lorafleet.scheduler.spec import parse_spec

ADAPTERS = {  # job -> its adapter; trained a few steps so that B, the magnitudes and VeRA's vectors all moved
    "lora": {"r": 4},
    "rslora": {"r": 4, "use_rslora": True},
    "dora": {"r": 4, "use_dora": True},
    "vera": {"type": "vera", "r": 8},
}
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 101, 4, 60, 2]])


def export_trained(base, tmp_path, adapters: dict[str, dict], target_modules="all-linear") -> dict[str, object]:
    """Train one job per adapter in one cohort (3 steps) and export each; job -> its adapter directory."""
    cohort = Cohort(base)
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_rows(6, seed=4))
    for seed, (job_id, adapter) in enumerate(adapters.items()):
        spec = parse_spec({"base_model": "tenant-name-of-the-base", "dataset": "d",
                           "adapter": {**adapter, "target_modules": target_modules},
                           "hyperparameters": {"batch_size": 6, "max_steps": 3, "learning_rate": 2e-2, "seed": seed}})
        cohort.add_job(job_id, spec, data)
    while cohort.active_jobs():
        assert all(result.error is None for result in cohort.step().values())
    return {job_id: cohort.export(job_id, tmp_path / "adapters" / job_id) for job_id in adapters}


@pytest.fixture(scope="module")
def llama_adapters(llama, tmp_path_factory):
    return export_trained(llama, tmp_path_factory.mktemp("trained"), ADAPTERS)


def peft_and_plain_logits(base, adapter_dir) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        want = peft_model(IDS).logits
        with peft_model.disable_adapter():
            plain = peft_model(IDS).logits
    return want, plain


def merged_logits(directory) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory).eval()(IDS).logits


@pytest.mark.parametrize("job_id", ADAPTERS)
def test_a_merged_model_computes_the_logits_of_peft_with_the_adapter(llama, llama_adapters, job_id, tmp_path):
    result = merge_adapter(llama_adapters[job_id], llama, tmp_path / "merged")
    assert (result.adapter_type, result.layers, result.dtype) == (job_id, 2 * 7, "float32")  # 2 layers x 7
    want, plain = peft_and_plain_logits(llama, llama_adapters[job_id])
    got = merged_logits(tmp_path / "merged")
    assert (want - plain).abs().max() > 1e-2, "the adapter changes the logits"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_merged_directory_is_a_plain_model_with_the_bases_tokenizer(llama, llama_adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # an empty directory may be named
    merge_adapter(llama_adapters["dora"], llama, out)
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]  # written beside it, then renamed
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    with safe_open(out / "model.safetensors", framework="pt") as tensors:
        names = list(tensors.keys())
    assert not [name for name in names if "lora" in name or "magnitude" in name or "base_layer" in name]
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (llama / "tokenizer_config.json").read_text())


def test_a_bf16_base_is_merged_in_fp32_and_stored_in_bf16_rounded_once(llama, llama_adapters, tmp_path):
    bf16_base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).save_pretrained(bf16_base)
    result = merge_adapter(llama_adapters["dora"], bf16_base, tmp_path / "merged")
    assert result.dtype == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.float32),
                                     llama_adapters["dora"]).merge_and_unload()
    layer = "model.layers.1.mlp.down_proj.weight"
    want = fp32.state_dict()[layer].to(torch.bfloat16)
    assert torch.equal(merged.state_dict()[layer], want)


def test_a_gpt2_base_merges_its_conv1d_layers(tmp_path):
    gpt2 = build_tiny_model(tmp_path / "gpt2", "gpt2")
    adapters = export_trained(gpt2, tmp_path, {"lora": {"r": 4}, "dora": {"r": 4, "use_dora": True}})
    for job_id, adapter_dir in adapters.items():
        merge_adapter(adapter_dir, gpt2, tmp_path / f"merged-{job_id}")
        want, _plain = peft_and_plain_logits(gpt2, adapter_dir)
        torch.testing.assert_close(merged_logits(tmp_path / f"merged-{job_id}"), want, rtol=1e-5, atol=1e-5)


def test_a_moe_bases_expert_parameters_merge(tmp_path):
    """target_parameters: PEFT wraps the experts module once per parameter (…experts.base_layer.lora_A)."""
    moe = build_tiny_model(tmp_path / "moe", "qwen2_moe")
    experts = {"r": 4, "lora_alpha": 16, "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    adapter_dir = export_trained(moe, tmp_path, {"experts": experts}, target_modules=["q_proj"])["experts"]
    result = merge_adapter(adapter_dir, moe, tmp_path / "merged")
    assert result.layers == 2 * 2  # q_proj and the experts module, in each of 2 layers
    want, plain = peft_and_plain_logits(moe, adapter_dir)
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(merged_logits(tmp_path / "merged"), want, rtol=1e-5, atol=1e-5)


def test_an_adapter_of_another_base_is_refused_naming_the_layer(llama_adapters, tmp_path):
    narrower = build_tiny_model(tmp_path / "narrow", "llama", hidden=32)
    with pytest.raises(MergeError, match=r"does not fit base .*narrow: layer model.layers.0.mlp.down_proj takes "
                                         r"64 -> 32 features, the adapter's lora_A is \[4, 128\]"):
        merge_adapter(llama_adapters["lora"], narrower, tmp_path / "out")
    gpt2 = build_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(MergeError, match="gpt2: the base has no layer model.layers.0.mlp.down_proj"):
        merge_adapter(llama_adapters["lora"], gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_incomplete_inputs_are_refused_in_one_line(llama, llama_adapters, tmp_path):
    with pytest.raises(MergeError, match=r"adapter .*nowhere: no such directory"):
        merge_adapter(tmp_path / "nowhere", llama, tmp_path / "out")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    with pytest.raises(MergeError, match=r"partial: no adapter_model.safetensors there"):
        merge_adapter(partial, llama, tmp_path / "out")
    with pytest.raises(MergeError, match=r"base .*: no config.json there"):
        merge_adapter(llama_adapters["lora"], tmp_path, tmp_path / "out")
    with pytest.raises(MergeError, match=r"is a whole model \(a GaLore job's result\), not an adapter"):
        merge_adapter(llama, llama, tmp_path / "out")  # a model directory given as the adapter
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(MergeError, match=r"output .*taken: exists and is not an empty directory"):
        merge_adapter(llama_adapters["lora"], llama, tmp_path / "taken")


def test_the_merge_command_prints_json_and_refuses_bad_input_in_one_line(llama, llama_adapters, tmp_path):
    runner = CliRunner()
    out = tmp_path / "merged"
    result = runner.invoke(main, ["merge", str(llama_adapters["vera"]), "--base", str(llama), "--out", str(out),
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"output": str(out), "adapter_type": "vera", "layers": 14,
                                         "dtype": "float32"}
    result = runner.invoke(main, ["merge", str(tmp_path / "nowhere"), "--base", str(llama), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: adapter {tmp_path / 'nowhere'}: no such directory (expected a job's exported adapter: "
        "adapter_config.json and adapter_model.safetensors)"]


def test_a_succeeded_jobs_adapter_is_fetched_from_the_artifact_store_and_merged(llama, llama_adapters, store, redis_url,
                                                                                make_tenant, tmp_path):
    """The operator names a job instead of a directory: its record's adapter_uri, published in the artifact store."""
    root = tmp_path / "artifacts"
    tenant = make_tenant()
    job_id = store.submit(tenant.name, parse_spec({"base_model": str(llama), "dataset": tenant.dataset}))["job_id"]
    attempt = store.claim(job_id, "exec-merge")
    store.start(job_id, attempt, "exec-merge")
    env = {"REDIS_URL": redis_url, "LORAFLEET_ARTIFACT_URI": str(root)}
    runner = CliRunner()
    args = ["merge", job_id, "--base", str(llama), "--out", str(tmp_path / "merged"), "--json"]
    result = runner.invoke(main, args, env=env)
    assert result.exit_code == 1 and f"Error: job {job_id} has no exported adapter (state running)" in result.stderr
    uri = ArtifactStore(str(root)).publish(llama_adapters["dora"], tenant.name, job_id, attempt, "adapter")
    store.succeed(job_id, uri, attempt, "exec-merge")
    result = runner.invoke(main, args, env=env)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["adapter_type"] == "dora"
    want, _plain = peft_and_plain_logits(llama, llama_adapters["dora"])
    torch.testing.assert_close(merged_logits(tmp_path / "merged"), want, rtol=1e-5, atol=1e-5)
