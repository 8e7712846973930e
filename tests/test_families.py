"""Model families beyond Llama's names: submission checks target modules against the base's own linear layers and
offers `all-linear`, the memory model sizes any family from its config, and each family trains in a cohort and
exports an adapter PEFT loads with the same logits."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers_models import (  # noqa: F401 (single_torch_thread is an autouse fixture)
    FAMILIES,
    MORE_FAMILIES,
    alpaca_rows,
    build_tiny_model,
    single_torch_thread,
    write_jsonl,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

from lorafleet.executor.cohort import Cohort
from lorafleet.executor.gpu import frozen_matmul_params
from lorafleet.executor.model import decoder_layers
from lorafleet.executor.multilora import all_linear_names
from lorafleet.scheduler import datasets, submission
from lorafleet.scheduler.base_modules import linear_widths, weight_shapes
from lorafleet.scheduler.memory import ModelShape, estimate_activation_bytes, estimate_job_bytes
from lorafleet.scheduler.spec import SpecError, parse_spec

ALL_FAMILIES = FAMILIES + MORE_FAMILIES


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> its tiny random base on disk, built on first use."""
    built = {}

    def base(family):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(family), family)
        return built[family]

    return base


def reference_model(model_dir):
    """The base as transformers runs it by itself (Gemma 2's capped attention scores need the eager path)."""
    family = json.loads((model_dir / "config.json").read_text())["model_type"]
    attention = "eager" if family == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)


def peft_linear_names(model_dir) -> set[str]:
    model = get_peft_model(reference_model(model_dir), LoraConfig(r=2, target_modules="all-linear"))
    return {name.rpartition(".")[2] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_linear_layers_read_from_the_weights_are_the_models_and_peft_all_linear(bases, family):
    model_dir = bases(family)
    widths = linear_widths(weight_shapes(model_dir))
    model = reference_model(model_dir)
    assert set(widths) == set(all_linear_names(model)) == peft_linear_names(model_dir)
    layers = [m for name, m in model.named_modules() if name.rpartition(".")[2] in widths]
    assert sum(widths.values()) == sum(m.weight.shape[0] + m.weight.shape[1] for m in layers)


def accept(model_dir, tmp_path, adapter):
    area = tmp_path / "data" / "alice"
    area.mkdir(parents=True, exist_ok=True)
    write_jsonl(area / "train.jsonl", alpaca_rows(4))
    raw = {"base_model": str(model_dir), "dataset": "alice/train.jsonl", "adapter": adapter,
           "hyperparameters": {"batch_size": 2, "max_seq_len": 256}}
    return submission.accept_submission(raw, "alice", tmp_path / "data", tmp_path / "hub", [model_dir.parent],
                                        tmp_path / "store")


def test_submission_refuses_target_modules_the_base_lacks_naming_its_linear_layers(bases, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SETTLED_SECONDS", 0.0)
    gpt2 = bases("gpt2")
    time.sleep(0.02)
    with pytest.raises(SpecError, match=r"adapter.target_modules: this base has no linear layer named q_proj, v_proj; "
                                        r"its linear layers are c_attn, c_fc, c_proj \(or \"all-linear\"\)"):
        accept(gpt2, tmp_path, {"r": 4, "target_modules": ["q_proj", "c_attn", "v_proj"]})
    with pytest.raises(SpecError, match="named q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; its "):
        accept(gpt2, tmp_path, {"r": 4})  # the default names Llama's projections
    accepted = accept(gpt2, tmp_path, {"r": 4, "target_modules": ["c_attn", "c_proj"]})
    all_linear = accept(gpt2, tmp_path, {"r": 4, "target_modules": "all-linear"})
    assert all_linear.spec.adapter.target_modules == ("all-linear",)
    # c_proj is two layers a block (attention's [64, 64], the MLP's [256, 64]): both are sized
    adapter_bytes = {name: sub.plan.sizes["float32"].job_bytes - sub.plan.sizes["float32"].activation_bytes
                     for name, sub in (("some", accepted), ("all", all_linear))}
    assert adapter_bytes["some"] == 16 * 4 * 2 * ((64 + 192) + (64 + 64) + (256 + 64))
    assert adapter_bytes["all"] == adapter_bytes["some"] + 16 * 4 * 2 * (64 + 256)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_memory_model_sizes_each_familys_adapter_as_the_cohort_builds_it(bases, family, tmp_path):
    model_dir = bases(family)
    shape = submission.model_shape(str(model_dir))
    cohort = Cohort(model_dir)
    spec = parse_spec({"base_model": str(model_dir), "dataset": "d",
                       "adapter": {"r": 4, "target_modules": "all-linear"}})
    cohort.add_job("x", spec, write_jsonl(tmp_path / "x.jsonl", alpaca_rows(2)))
    params = sum(p.numel() for p in cohort.jobs["x"].adapter.parameters())
    adapter_bytes = (estimate_job_bytes(shape, 4, ("all-linear",), 1, 8, "float32")
                     - estimate_activation_bytes(shape, 1, 8, "float32"))
    assert adapter_bytes == 16 * params


# Real models' configs (sizes as published), built on the meta device: no weights, no download.
LARGE_CONFIGS = {
    "llama-3.1-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "gpt2": GPT2Config(),
    "gemma-2-2b": Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=256, vocab_size=256000),
    "phi-3-mini": Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32064, pad_token_id=0, tie_word_embeddings=False),
    "qwen3-8b": Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "qwen1.5-moe-a2.7b": Qwen2MoeConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
                                        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                        shared_expert_intermediate_size=5632, tie_word_embeddings=False),
    "mixtral-8x7b": MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                  num_local_experts=8, tie_word_embeddings=False),
}


def real_params(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


@pytest.mark.parametrize("name", LARGE_CONFIGS)
def test_the_memory_model_counts_a_real_models_parameters_from_its_config(name):
    config = json.loads(LARGE_CONFIGS[name].to_json_string(use_diff=False))
    assert ModelShape.from_config(config).num_params() == pytest.approx(real_params(LARGE_CONFIGS[name]), rel=0.01)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_memory_model_counts_each_tiny_familys_parameters(bases, family):
    model_dir = bases(family)
    config = json.loads((model_dir / "config.json").read_text())
    real = sum(p.numel() for p in reference_model(model_dir).parameters())
    assert ModelShape.from_config(config).num_params() == pytest.approx(real, rel=0.03)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_a_family_trains_in_a_cohort_and_its_adapter_loads_in_peft_with_equal_logits(bases, family, tmp_path):
    model_dir = bases(family)
    cohort = Cohort(model_dir)
    data = write_jsonl(tmp_path / "x.jsonl", alpaca_rows(8, seed=1))
    for job_id, modules in (("all", "all-linear"), ("one", sorted(all_linear_names(cohort.model))[:1])):
        spec = parse_spec({"base_model": str(model_dir), "dataset": "d", "adapter": {"r": 4, "target_modules": modules},
                           "hyperparameters": {"batch_size": 4, "max_steps": 4, "learning_rate": 1e-2}})
        cohort.add_job(job_id, spec, data)
    losses = []
    while cohort.active_jobs():
        results = cohort.step()
        assert all(result.error is None for result in results.values())
        losses.append(results["all"].loss)
    assert losses[-1] < losses[0]
    ids = [1, 5, 9, 20, 33, 7, 101, 4]
    base = reference_model(model_dir)
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0]
        for job_id in ("all", "one"):
            peft = PeftModel.from_pretrained(base, cohort.export(job_id, tmp_path / job_id), adapter_name=job_id)
            want = peft(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(cohort.logits(job_id, ids), want, rtol=1e-5, atol=1e-5)
            assert (want - plain).abs().max() > 1e-3, "the adapter changes the logits"
            base = peft.unload()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_mfu_counts_every_matmul_weight_of_the_decoder_layers(bases, family):
    """GPT-2's Conv1D too (it has no in_features); a MoE block's experts are no linear module and not counted."""
    model = reference_model(bases(family))
    layers = decoder_layers(model)
    expected = sum(p.numel() for name, p in layers.named_parameters()
                   if p.dim() == 2 and "experts." not in name and not name.endswith("mlp.gate.weight"))
    assert frozen_matmul_params(layers) == expected > 0


def test_a_sharded_base_lists_the_same_linear_layers_as_one_file(bases, tmp_path):
    model_dir = bases("qwen3")
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    assert weight_shapes(tmp_path) == weight_shapes(model_dir)
    assert weight_shapes(tmp_path / "nowhere") == {}
