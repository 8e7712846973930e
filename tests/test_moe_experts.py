"""LoRA on a MoE base's routed experts (`target_parameters`, executor/experts.py), fp32 on the CPU: a job trains as
PEFT trains it with target_parameters, trains the same beside other jobs (some on experts, some not), exports what
PEFT loads with the same logits, resumes bitwise from a checkpoint; submission checks the names against the base and
the memory model counts the experts' factors. Tiny random Qwen2-MoE (shared expert) and Mixtral bases."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from helpers_models import (  # noqa: F401 (single_torch_thread is an autouse fixture)
    alpaca_rows,
    build_tiny_model,
    build_tokenizer,
    single_torch_thread,
    write_jsonl,
)
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralConfig

from lorafleet.executor.checkpoint import ADAPTER_WEIGHTS, lora_tensors
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.data import JobData
from lorafleet.executor.model import load_base
from lorafleet.scheduler import datasets, submission
from lorafleet.scheduler.base_modules import expert_parameters, weight_shapes
from lorafleet.scheduler.spec import SpecError, parse_spec

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FAMILIES = ("qwen2_moe", "mixtral")


def build_tiny_mixtral(directory, hidden: int = 64):
    """A random Mixtral (4 experts, 2 a token; transformers saves it with Mixtral's own per-expert names w1/w2/w3)."""
    tokenizer = build_tokenizer()
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, num_local_experts=4, num_experts_per_tok=2,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    built = {}

    def base(family):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            built[family] = (build_tiny_mixtral(directory) if family == "mixtral"
                             else build_tiny_model(directory, family))
        return built[family]

    return base


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"x": write_jsonl(root / "x.jsonl", alpaca_rows(8, seed=1)),
            "y": write_jsonl(root / "y.jsonl", alpaca_rows(6, seed=2))}


def make_spec(model_dir, adapter, **hyperparameters):
    return parse_spec({"base_model": str(model_dir), "dataset": "unused", "adapter": adapter,
                       "hyperparameters": {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant",
                                           **hyperparameters}})


def experts_spec(model_dir, adapter=None, **hyperparameters):
    """A job on attention's q_proj and both expert parameters, r=8 (unpadded in the grouped matmul), 3 steps."""
    return make_spec(model_dir, {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "target_parameters": EXPERTS,
                                 **(adapter or {})}, **{"max_steps": 3, "seed": 2, **hyperparameters})


def train(cohort: Cohort) -> dict[str, list]:
    history: dict[str, list] = {}
    while cohort.active_jobs():
        for job_id, result in cohort.step().items():
            assert result.error is None, result.error
            history.setdefault(job_id, []).append(result.loss)
    return history


def trained_tensors(cohort: Cohort, job_id: str) -> dict[str, torch.Tensor]:
    """The job's factors under the names PEFT saves them with (copies)."""
    return lora_tensors(cohort.jobs[job_id].adapter)


def as_peft_parameter(saved_key: str) -> str:
    """A key of PEFT's file as the parameter's name in a live PeftModel (adapter 'default')."""
    return saved_key.removesuffix(".weight") + ".default.weight"


def peft_reference_run(model_dir, spec, dataset, initial: dict[str, torch.Tensor]) -> tuple[list, dict]:
    """The same job trained by PEFT (target_parameters: its ParamWrapper), from the same initial factors, each
    sequence alone through transformers' own model."""
    hp, adapter = spec.hyperparameters, spec.adapter
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, target_modules=list(adapter.target_modules),
                        target_parameters=list(adapter.target_parameters), use_rslora=adapter.use_rslora)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"), config)
    state = {as_peft_parameter(key): tensor for key, tensor in initial.items()}
    assert not state.keys() - model.state_dict().keys(), "our names are PEFT's"
    model.load_state_dict(state, strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(t.numel() for t in initial.values())
    common = dict(betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon)
    if adapter.loraplus_lr_ratio is not None:
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=hp.learning_rate,
                                              loraplus_lr_ratio=adapter.loraplus_lr_ratio,
                                              loraplus_weight_decay=hp.weight_decay, **common)
    else:
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, **common)
    job_data = JobData(dataset, "auto", load_base(model_dir)[1], hp.max_seq_len, hp.batch_size, hp.seed)
    losses = []
    for _ in range(hp.max_steps):
        examples, _ = job_data.next_batch()
        token_losses = [F.cross_entropy(model(torch.tensor([e.input_ids])).logits[0, :-1], torch.tensor(e.labels[1:]),
                                        reduction="sum") for e in examples]
        loss = sum(token_losses) / sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    return losses, {key: state[as_peft_parameter(key)] for key in initial}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_expert_parameters_read_from_the_headers_are_the_models_fused_3d_parameters(bases, family):
    model_dir = bases(family)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fused = {name: (p.shape[0], p.shape[2], p.shape[1]) for name, p in model.named_parameters() if p.dim() == 3}
    assert fused and expert_parameters(weight_shapes(model_dir)) == fused


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True, "loraplus_lr_ratio": 4.0}])
def test_an_experts_job_trains_as_peft_trains_it_with_target_parameters(bases, data, family, variant):
    model_dir = bases(family)
    spec = experts_spec(model_dir, variant)
    cohort = Cohort(model_dir)
    cohort.add_job("x", spec, data["x"])
    initial = trained_tensors(cohort, "x")
    losses = train(cohort)["x"]
    want_losses, want = peft_reference_run(model_dir, spec, data["x"], initial)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    got = trained_tensors(cohort, "x")
    moved = [key for key in want if "experts" in key and ".lora_B." in key and want[key].abs().max() > 0]
    assert len(moved) == 4, "both expert parameters of both layers train"
    for key in want:
        err = (got[key] - want[key]).norm() / want[key].norm().clamp_min(1e-12)
        assert err <= 1e-4, f"{key}: relative error {err:.2e}"


def test_an_experts_job_trains_the_same_beside_jobs_on_experts_and_jobs_not(bases, data):
    """Bitwise on the CPU for the experts job. A plain job's rows pass the experts module through transformers' own
    grouped_mm path, alone and beside others; that path sorts the (token, expert) pairs with an unstable sort, so
    the order its backward sums a token's expert gradients in depends on the other rows: equal to rounding."""
    model_dir = bases("qwen2_moe")
    watched = {"x": (experts_spec(model_dir), data["x"]),
               "plain": (make_spec(model_dir, {"r": 8, "lora_dropout": 0.2, "target_modules": ["v_proj", "down_proj"]},
                                   max_steps=3, seed=3), data["y"])}
    others = {"down": (make_spec(model_dir, {"r": 2, "target_modules": ["o_proj"],
                                             "target_parameters": ["layers.1.mlp.experts.down_proj"]},
                                 batch_size=3, max_steps=3, learning_rate=5e-2, seed=5), data["y"]),
              "rs": (make_spec(model_dir, {"r": 3, "use_rslora": True, "loraplus_lr_ratio": 8.0, "target_modules": [],
                                           "target_parameters": ["gate_up_proj"]}, max_steps=3, seed=6), data["x"])}
    alone = {}
    for job_id, (spec, dataset) in watched.items():
        cohort = Cohort(model_dir)
        cohort.add_job(job_id, spec, dataset)
        alone[job_id] = train(cohort)[job_id], trained_tensors(cohort, job_id)
    together = Cohort(model_dir)
    for job_id, (spec, dataset) in {**watched, **others}.items():
        together.add_job(job_id, spec, dataset)
    history = train(together)
    losses, weights = alone["x"]
    got = trained_tensors(together, "x")
    assert history["x"] == losses
    assert all(torch.equal(got[key], weights[key]) for key in weights)
    losses, weights = alone["plain"]
    got = trained_tensors(together, "plain")
    assert history["plain"] == pytest.approx(losses, rel=1e-6)
    for key in weights:
        assert (got[key] - weights[key]).norm() <= 1e-5 * weights[key].norm().clamp_min(1e-12), key


def test_an_experts_job_trains_the_same_with_its_decoder_layers_recomputed_in_backward(bases, data):
    """Activation checkpointing recomputes the experts layer with the routing its forward saw."""
    model_dir = bases("qwen2_moe")
    runs = []
    for every in (0, 1):
        cohort = Cohort(model_dir, activation_checkpointing=every)
        cohort.add_job("x", experts_spec(model_dir), data["x"])
        cohort.add_job("plain", make_spec(model_dir, {"r": 2, "target_modules": ["v_proj"]}, max_steps=3), data["y"])
        runs.append((train(cohort)["x"], trained_tensors(cohort, "x")))
    (losses, weights), (recomputed_losses, recomputed) = runs
    assert recomputed_losses == losses
    assert all(torch.equal(recomputed[key], weights[key]) for key in weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_experts_adapter_loads_in_peft_with_the_same_logits_and_names(bases, data, family, tmp_path):
    model_dir = bases(family)
    cohort = Cohort(model_dir)
    cohort.add_job("both", experts_spec(model_dir, {"lora_alpha": 64}, learning_rate=0.1), data["x"])
    cohort.add_job("down", make_spec(model_dir, {"r": 2, "lora_alpha": 32, "target_modules": [],
                                                 "target_parameters": ["experts.down_proj"]},
                                     max_steps=3, learning_rate=0.1), data["y"])
    train(cohort)
    ids = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0]
    for job_id in ("both", "down"):
        directory = cohort.export(job_id, tmp_path / job_id)
        config = LoraConfig.from_pretrained(directory)
        fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        fresh.save_pretrained(tmp_path / f"peft-{job_id}")
        assert saved_keys(directory) == saved_keys(tmp_path / f"peft-{job_id}"), "the tensors PEFT saves, by name"
        peft_model = PeftModel.from_pretrained(base, directory, adapter_name=job_id).eval()
        with torch.no_grad():
            want = peft_model(torch.tensor([ids])).logits[0]
        got = cohort.logits(job_id, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (want - plain).abs().max() > 1e-3, "the adapter moves the logits"
        base = peft_model.unload()


def saved_keys(directory) -> set[str]:
    with safe_open(str(directory / ADAPTER_WEIGHTS), "pt") as file:
        return set(file.keys())


def test_an_experts_job_resumed_from_its_checkpoint_ends_as_an_uninterrupted_run(bases, data, tmp_path):
    """Mid-window (accumulation 2, stopped after 3 micro-batches), with LoRA+'s groups over the expert factors."""
    model_dir = bases("qwen2_moe")
    spec = experts_spec(model_dir, {"loraplus_lr_ratio": 4.0}, gradient_accumulation_steps=2)
    uninterrupted = Cohort(model_dir)
    uninterrupted.add_job("x", spec, data["x"])
    train(uninterrupted)
    first = Cohort(model_dir)
    first.add_job("x", spec, data["x"])
    for _ in range(3):
        first.step()
    directory = first.checkpoint("x", tmp_path / "ckpt")
    resumed = Cohort(model_dir)
    resumed.add_job("x", spec, data["x"], resume_from=directory)
    train(resumed)
    got, want = trained_tensors(resumed, "x"), trained_tensors(uninterrupted, "x")
    assert any("experts" in key for key in want)
    assert all(torch.equal(got[key], want[key]) for key in want)


def test_the_cohort_refuses_target_parameters_that_are_no_fused_experts_parameter(bases, data):
    model_dir = bases("qwen2_moe")
    cohort = Cohort(model_dir)
    with pytest.raises(ValueError, match=r"target parameters \['experts.up_proj'\] match no parameter"):
        cohort.add_job("x", make_spec(model_dir, {"target_parameters": ["experts.up_proj"]}), data["x"])
    with pytest.raises(ValueError, match="Qwen2MoeTopKRouter is not a fused experts module"):
        cohort.add_job("y", make_spec(model_dir, {"target_parameters": ["mlp.gate.weight"]}), data["x"])
    assert not cohort.jobs


def accept(model_dir, tmp_path, adapter):
    area = tmp_path / "data" / "alice"
    area.mkdir(parents=True, exist_ok=True)
    write_jsonl(area / "train.jsonl", alpaca_rows(4))
    raw = {"base_model": str(model_dir), "dataset": "alice/train.jsonl", "adapter": adapter,
           "hyperparameters": {"batch_size": 2, "max_seq_len": 256}}
    return submission.accept_submission(raw, "alice", tmp_path / "data", tmp_path / "hub", [model_dir.parent],
                                        tmp_path / "store")


def test_submission_refuses_target_parameters_the_base_lacks_naming_its_expert_parameters(bases, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(datasets, "SETTLED_SECONDS", 0.0)
    moe, llama = bases("mixtral"), build_tiny_model(tmp_path / "llama", "llama")
    time.sleep(0.02)
    with pytest.raises(SpecError, match=r"adapter.target_parameters: this base has no expert parameter named "
                                        r"experts.w1; its 3-D expert parameters are mlp.experts.down_proj, "
                                        r"mlp.experts.gate_up_proj$"):
        accept(moe, tmp_path, {"target_modules": ["q_proj"], "target_parameters": ["experts.w1", "down_proj"]})
    with pytest.raises(SpecError, match="adapter.target_parameters: this base has no expert parameters"):
        accept(llama, tmp_path, {"target_parameters": ["mlp.experts.down_proj"]})
    accepted = accept(moe, tmp_path, {"r": 4, "target_modules": [], "target_parameters": EXPERTS})
    assert accepted.spec.adapter.target_parameters == tuple(EXPERTS)


@pytest.mark.parametrize("adapter, error", [
    ({"target_parameters": EXPERTS, "lora_dropout": 0.1}, "target_parameters needs lora_dropout 0"),
    ({"target_parameters": EXPERTS, "use_dora": True}, "cannot be combined with use_dora"),
    ({"target_parameters": EXPERTS, "type": "vera"}, "target_parameters applies to type 'lora'"),
    ({"target_parameters": EXPERTS, "type": "nola"}, "target_parameters applies to type 'lora'"),
    ({"target_modules": []}, "target_modules: name at least one module"),
    ({"target_parameters": ["mlp..experts"]}, "not a parameter name"),
])
def test_target_parameters_are_refused_where_peft_cannot_load_them(adapter, error):
    with pytest.raises(SpecError, match=error):
        parse_spec({"base_model": "m", "dataset": "d", "adapter": adapter})


def test_target_parameters_are_refused_on_a_quantized_base():
    with pytest.raises(SpecError, match="adapter.target_parameters: not offered on a quantized base"):
        parse_spec({"base_model": "m", "dataset": "d", "quantization": "nf4",
                    "adapter": {"target_parameters": EXPERTS}})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_memory_model_counts_the_expert_factors_as_the_cohort_builds_them(bases, data, family):
    model_dir = bases(family)
    shape = submission.model_shape(str(model_dir))
    cohort = Cohort(model_dir)
    for job_id, targets in (("all", EXPERTS), ("one", ["model.layers.1.mlp.experts.down_proj"])):
        spec = make_spec(model_dir, {"r": 4, "target_modules": ["q_proj"], "target_parameters": targets})
        cohort.add_job(job_id, spec, data["x"])
        params = sum(p.numel() for p in cohort.jobs[job_id].adapter.parameters())
        plan = submission.plan_for(spec, model_dir, 1000)
        size = plan.sizes["float32"]
        assert size.job_bytes - size.activation_bytes == 16 * params  # fp32 weight, grad and Adam's two moments
    assert shape.expert_parameter_widths(["down_proj"]) > 0
