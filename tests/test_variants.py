"""LoRA variants in a cohort (fp32 on the CPU): rsLoRA's scale, LoRA+'s learning rate for B, DoRA's magnitudes, VeRA's
shared projections and vectors, each checked against PEFT (its init, its training of the same variant, its loading of our export) and beside plain LoRA
jobs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_models import (  # noqa: F401 (fixtures: single_torch_thread is autouse, llama)
    alpaca_rows,
    llama,
    single_torch_thread,
    train_cohort,
    write_jsonl,
)
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from lorafleet.executor.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorafleet.executor.cohort import Cohort, pack
from lorafleet.executor.data import JobData
from lorafleet.executor.model import load_base
from lorafleet.scheduler.memory import ModelShape, estimate_job_bytes
from lorafleet.scheduler.spec import ALL_PROJECTIONS, SpecError, parse_spec

TARGETS = ["q_proj", "v_proj", "down_proj"]
# Each variant's adapter fields; r=4, alpha=16 make rsLoRA's scale (8) differ from LoRA's (4).
VARIANTS = {
    "rslora": {"use_rslora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "rslora+loraplus": {"use_rslora": True, "loraplus_lr_ratio": 4.0},
    "dora": {"use_dora": True},
    "dora+rslora+loraplus": {"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 4.0},
    "vera": {"type": "vera", "vera": {"projection_prng_key": 5, "d_initial": 0.5}},
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"x": write_jsonl(root / "x.jsonl", alpaca_rows(10, seed=1)),
            "y": write_jsonl(root / "y.jsonl", alpaca_rows(7, seed=2))}


def make_spec(model_dir, adapter=None, **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "adapter": adapter or {}}
    raw["hyperparameters"] = {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant", **hyperparameters}
    return parse_spec(raw)


def variant_spec(model_dir, variant: str, **adapter):
    return make_spec(model_dir, adapter={"r": 4, "lora_alpha": 16, "target_modules": TARGETS, **VARIANTS[variant],
                                         **adapter},
                     batch_size=3, epochs=2, gradient_accumulation_steps=2, warmup_steps=1, lr_scheduler="linear",
                     weight_decay=0.05, max_grad_norm=0.5, seed=2)


def weights(cohort: Cohort, job_id: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Layer -> its trained tensors in the order of `peft_factors`."""
    adapter = cohort.jobs[job_id].adapter
    if adapter.spec.type == "vera":
        return {name: (d.detach().clone(), b.detach().clone())
                for name, d, b in zip(adapter.layer_names, adapter.lambda_d, adapter.lambda_b)}
    magnitudes = adapter.magnitudes()
    return {name: (*pair, *([magnitudes[name].detach().clone()] if magnitudes else []))
            for name, pair in adapter.lora_weights().items()}


def peft_factors(spec) -> list[str]:
    """PEFT's names of a layer's trained tensors."""
    if spec.adapter.type == "vera":
        return ["vera_lambda_d", "vera_lambda_b"]
    return ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if spec.adapter.use_dora else [])


def peft_parameter(spec, layer: str, factor: str) -> str:
    return f"base_model.model.{layer}.{factor}.default" + ("" if spec.adapter.type == "vera" else ".weight")


def peft_config(spec) -> LoraConfig | VeraConfig:
    adapter = spec.adapter
    if adapter.type == "vera":
        return VeraConfig(r=adapter.r, target_modules=list(adapter.target_modules),
                          projection_prng_key=adapter.vera.projection_prng_key, d_initial=adapter.vera.d_initial)
    return LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, target_modules=list(adapter.target_modules),
                      use_rslora=adapter.use_rslora, use_dora=adapter.use_dora)


def peft_optimizer(model, spec) -> torch.optim.Optimizer:
    """Plain AdamW, or PEFT's own LoRA+ optimizer (with the job's weight decay: PEFT's default for it is none)."""
    hp = spec.hyperparameters
    common = dict(betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon)
    if spec.adapter.loraplus_lr_ratio is not None:
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=hp.learning_rate,
                                         loraplus_lr_ratio=spec.adapter.loraplus_lr_ratio,
                                         loraplus_weight_decay=hp.weight_decay, **common)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, **common)


def peft_reference_run(model_dir, spec, dataset, initial):
    """Train the same job with PEFT's implementation of the variant, each sequence alone through HF's sdpa."""
    hp = spec.hyperparameters
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"),
                           peft_config(spec))
    model.load_state_dict({peft_parameter(spec, name, f): t for name, tensors in initial.items()
                           for f, t in zip(peft_factors(spec), tensors)}, strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = peft_optimizer(model, spec)
    data = JobData(dataset, "auto", load_base(model_dir)[1], hp.max_seq_len, hp.batch_size, hp.seed)
    n_micro = data.steps_per_epoch * hp.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, hp.warmup_steps,
                                                math.ceil(n_micro / hp.gradient_accumulation_steps))
    losses = []
    for micro in range(n_micro):
        examples, _ = data.next_batch()
        token_losses = [F.cross_entropy(model(torch.tensor([e.input_ids])).logits[0, :-1], torch.tensor(e.labels[1:]),
                                        reduction="sum") for e in examples]
        loss = sum(token_losses) / sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
        window_start = micro - micro % hp.gradient_accumulation_steps
        (loss / min(hp.gradient_accumulation_steps, n_micro - window_start)).backward()
        losses.append(loss.item())
        if (micro + 1) % hp.gradient_accumulation_steps == 0 or micro + 1 == n_micro:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    state = model.state_dict()
    return losses, {name: tuple(state[peft_parameter(spec, name, f)] for f in peft_factors(spec)) for name in initial}


def assert_same_weights(got, want, rtol):
    assert got.keys() == want.keys()
    for name in want:
        for g, w in zip(got[name], want[name]):
            err = (g - w).norm() / w.norm().clamp_min(1e-12)
            assert err <= rtol, f"{name}: relative error {err:.2e}"


def test_rslora_scale_is_peft_scale(llama, datasets):
    cohort = Cohort(llama)
    for job_id, rslora in (("rs", True), ("plain", False)):
        cohort.add_job(job_id, make_spec(llama, adapter={"r": 4, "lora_alpha": 16, "use_rslora": rslora}), datasets["x"])
    for job_id in ("rs", "plain"):
        spec = cohort.jobs[job_id].spec
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), peft_config(spec))
        peft_scale = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
        assert cohort.jobs[job_id].adapter.scale == peft_scale
    assert cohort.jobs["rs"].adapter.scale == 16 / 2 and cohort.jobs["plain"].adapter.scale == 16 / 4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_variant_trains_as_peft_trains_it(llama, datasets, variant):
    spec = variant_spec(llama, variant)
    cohort = Cohort(llama)
    cohort.add_job("x", spec, datasets["x"])
    cohort.add_job("plain", make_spec(llama, adapter={"r": 2}, batch_size=4, seed=9), datasets["y"])
    initial = weights(cohort, "x")
    history = train_cohort(cohort)
    want_losses, want = peft_reference_run(llama, spec, datasets["x"], initial)
    assert [r.loss for r in history["x"]] == pytest.approx(want_losses, rel=1e-5)
    assert_same_weights(weights(cohort, "x"), want, rtol=1e-5)


def test_loraplus_trains_b_at_its_ratio_of_the_learning_rate(llama, datasets):
    cohort = Cohort(llama)
    cohort.add_job("x", variant_spec(llama, "loraplus"), datasets["x"])
    groups = cohort.jobs["x"].optimizer.optimizer.param_groups
    assert [group["initial_lr"] / groups[0]["initial_lr"] for group in groups] == [1.0, 16.0]  # the peaks
    adapter = cohort.jobs["x"].adapter
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in adapter.lora_B]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_variant_job_trains_the_same_beside_plain_lora_jobs(llama, datasets, variant):
    spec = variant_spec(llama, variant, lora_dropout=0.1)
    runs = {}
    for with_others in (False, True):
        cohort = Cohort(llama)
        cohort.add_job("x", spec, datasets["x"])
        if with_others:
            cohort.add_job("plain", make_spec(llama, adapter={"r": 8, "lora_dropout": 0.2}, seed=3), datasets["y"])
            cohort.add_job("rs", make_spec(llama, adapter={"r": 2, "use_rslora": True, "target_modules": ["o_proj"]},
                                           batch_size=4, learning_rate=5e-2, seed=5), datasets["y"])
            cohort.add_job("dora", make_spec(llama, adapter={"r": 2, "use_dora": True, "lora_dropout": 0.3,
                                                             "target_modules": ["q_proj", "o_proj"]}, seed=6),
                           datasets["y"])
        runs[with_others] = cohort, train_cohort(cohort)
    (alone, alone_history), (together, together_history) = runs[False], runs[True]
    assert [r.loss for r in together_history["x"]] == [r.loss for r in alone_history["x"]]
    got, want = weights(together, "x"), weights(alone, "x")
    assert all(torch.equal(g, w) for name in want for g, w in zip(got[name], want[name])), "bitwise, on the CPU"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_variant_exports_to_peft_with_the_same_logits(llama, datasets, tmp_path, variant):
    cohort = Cohort(llama)
    cohort.add_job("x", make_spec(llama, adapter={"r": 4, "lora_alpha": 16, "target_modules": TARGETS,
                                                  **VARIANTS[variant]}, max_steps=3, learning_rate=0.1), datasets["x"])
    train_cohort(cohort)
    directory = cohort.export("x", tmp_path / "export")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    spec = cohort.jobs["x"].spec.adapter
    if spec.type == "vera":
        assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 5 and config["save_projection"]
    else:
        assert (config["use_rslora"], config["use_dora"]) == (spec.use_rslora, spec.use_dora)
    base = AutoModelForCausalLM.from_pretrained(llama, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, directory).eval()
    sequence = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    with torch.no_grad():
        want = peft_model(torch.tensor([sequence])).logits[0]
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor([sequence])).logits[0]
    got = cohort.logits("x", sequence)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base_logits, atol=1e-4), "the adapter should have moved the logits"


def test_loraplus_is_refused_for_nola_at_submission(llama):
    with pytest.raises(SpecError, match="loraplus_lr_ratio applies to type 'lora'"):
        make_spec(llama, adapter={"type": "nola", "loraplus_lr_ratio": 16})
    with pytest.raises(SpecError, match="adapter.loraplus_lr_ratio: Input should be greater than 0"):
        make_spec(llama, adapter={"loraplus_lr_ratio": 0})


def test_dora_magnitudes_start_as_peft_starts_them(llama, datasets):
    cohort = Cohort(llama)
    cohort.add_job("x", variant_spec(llama, "dora"), datasets["x"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), peft_config(cohort.jobs["x"].spec))
    state = model.state_dict()
    magnitudes = cohort.jobs["x"].adapter.magnitudes()
    assert len(magnitudes) == 2 * len(TARGETS)
    for name, magnitude in magnitudes.items():
        assert torch.equal(magnitude, state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"])


def test_dora_exports_its_magnitudes(llama, datasets, tmp_path):
    cohort = Cohort(llama)
    cohort.add_job("x", make_spec(llama, adapter={"r": 4, "use_dora": True, "target_modules": ["q_proj"]}, max_steps=2,
                                  learning_rate=0.1), datasets["x"])
    train_cohort(cohort)
    tensors = load_file(str(cohort.export("x", tmp_path / "export") / ADAPTER_WEIGHTS))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    assert torch.equal(tensors[key], cohort.jobs["x"].adapter.magnitudes()["model.layers.1.self_attn.q_proj"])
    assert len(tensors) == 3 * 2  # A, B and m of q_proj in 2 layers


@pytest.mark.parametrize("spec, error", [
    ({"adapter": {"use_dora": True}, "quantization": "nf4"}, "adapter.use_dora: DoRA is not offered on a quantized base"),
    ({"adapter": {"type": "nola", "use_dora": True}}, "use_dora applies to type 'lora', not 'nola'"),
])
def test_dora_is_refused_where_it_cannot_run_at_submission(spec, error):
    with pytest.raises(SpecError, match=error):
        parse_spec({"base_model": "m", "dataset": "d", **spec})


def saved_for_backward_bytes(cohort: Cohort, job_id: str) -> tuple[int, int, dict]:
    """The bytes autograd keeps for the backward of one forward of the job's next micro-batch (each storage once),
    the batch's tokens, and the forward's losses (whose graph holds what was saved)."""
    examples, _ = cohort.jobs[job_id].data.next_batch()
    batch = pack({job_id: examples}, cohort.device)
    saved = {}

    def keep(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        losses = cohort._forward(batch)
    return sum(saved.values()), batch.input_ids.shape[1], losses


def test_the_memory_model_counts_what_dora_keeps_for_the_backward(llama, datasets):
    """The bytes one forward of a DoRA job keeps for the backward over those of the same LoRA job, per token, against
    the memory model's DoRA term (its magnitudes counted apart)."""
    kept, tokens = {}, {}
    for dora in (False, True):
        cohort = Cohort(llama)
        cohort.add_job("x", make_spec(llama, adapter={"r": 4, "use_dora": dora}, batch_size=4), datasets["x"])
        kept[dora], tokens[dora], _ = saved_for_backward_bytes(cohort, "x")
    assert tokens[True] == tokens[False]
    measured_per_token = (kept[True] - kept[False]) / tokens[True]
    shape = ModelShape.from_config(json.loads((llama / "config.json").read_text()))
    size = {dora: estimate_job_bytes(shape, 4, ALL_PROJECTIONS, 1, 1, "float32", dora) for dora in (False, True)}
    out_features = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # q k v o gate up down, 2 layers
    magnitudes = 16 * out_features  # fp32 weight, grad and Adam's two moments
    assert size[True] - size[False] - magnitudes == pytest.approx(measured_per_token, rel=0.1)  # 8192 vs 8209 measured


def test_vera_starts_as_peft_starts_it_and_jobs_share_its_projections(llama, datasets):
    cohort = Cohort(llama)
    for job_id, seed in (("x", 1), ("y", 2)):
        cohort.add_job(job_id, variant_spec(llama, "vera", **{"r": 8}) if job_id == "x" else
                       make_spec(llama, adapter={"r": 8, "target_modules": TARGETS, **VARIANTS["vera"]}, seed=seed),
                       datasets[job_id])
    x, y = cohort.jobs["x"].adapter, cohort.jobs["y"].adapter
    assert x.projections is y.projections, "one copy of the frozen projections for jobs with the same key and shapes"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), peft_config(cohort.jobs["x"].spec))
    state = model.state_dict()
    layer = "model.layers.0.self_attn.q_proj"
    assert torch.equal(x.projections[0], state[f"base_model.model.{layer}.vera_A.default"])
    assert torch.equal(x.projections[1], state[f"base_model.model.{layer}.vera_B.default"])
    for name, tensors in weights(cohort, "x").items():
        for factor, tensor in zip(peft_factors(cohort.jobs["x"].spec), tensors):
            assert torch.equal(tensor, state[peft_parameter(cohort.jobs["x"].spec, name, factor)])
    assert sum(p.numel() for p in x.parameters()) == 2 * (3 * 8 + 64 + 64 + 32)  # d (r) and b (d_out) per layer


@pytest.mark.parametrize("adapter, error", [
    ({"type": "vera", "use_rslora": True}, "use_rslora does not apply to type 'vera'"),
    ({"type": "lora", "vera": {"projection_prng_key": 1}}, "'vera' settings are only allowed with type 'vera'"),
    ({"type": "vera", "use_dora": True}, "use_dora applies to type 'lora', not 'vera'"),
])
def test_vera_refuses_what_it_cannot_do_at_submission(adapter, error):
    with pytest.raises(SpecError, match=error):
        parse_spec({"base_model": "m", "dataset": "d", "adapter": adapter})


@pytest.mark.parametrize("variant", ["dora+rslora+loraplus", "vera"])
def test_a_variant_job_resumed_from_its_checkpoint_ends_as_an_uninterrupted_run(llama, datasets, tmp_path, variant):
    """DoRA's magnitudes, VeRA's vectors and LoRA+'s optimizer groups come back from the checkpoint (mid-window:
    accumulation 2, stopped after 3 micro-batches)."""
    spec = variant_spec(llama, variant, lora_dropout=0.1)
    uninterrupted = Cohort(llama)
    uninterrupted.add_job("x", spec, datasets["x"])
    train_cohort(uninterrupted)
    first = Cohort(llama)
    first.add_job("x", spec, datasets["x"])
    for _ in range(3):
        first.step()
    directory = first.checkpoint("x", tmp_path / "ckpt")
    resumed = Cohort(llama)
    resumed.add_job("x", spec, datasets["x"], resume_from=directory)
    train_cohort(resumed)
    got, want = weights(resumed, "x"), weights(uninterrupted, "x")
    assert all(torch.equal(g, w) for name in want for g, w in zip(got[name], want[name]))
