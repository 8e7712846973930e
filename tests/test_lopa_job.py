"""LoPA jobs (adapter.type lopa) in a cohort, fp32 on the CPU: the job's gradient against a float64 reference built
from executor/lopa.py's definition and the plain Hugging Face base fed inputs_embeds; cohort invariance beside LoRA
jobs both ways; failure isolation; an exact resume; the export and its loader on a plain base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers_models import alpaca_rows, llama, single_torch_thread, train_cohort, write_jsonl  # noqa: F401 (fixtures)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafleet.executor.checkpoint import TRAINING_STATE
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.data import IGNORE_INDEX, JobData
from lorafleet.executor.merge import MergeError, merge_adapter
from lorafleet.executor.lopa import (
    LOPA_CONFIG,
    LOPA_WEIGHTS,
    LopaAdapter,
    head_tensors,
    load_lopa,
    lopa_logits,
    lopa_prompts_reference,
)
from lorafleet.scheduler.spec import parse_spec

LOPA = {"type": "lopa", "lopa": {"num_virtual_tokens": 3, "rank": 2, "head_size": 8}}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"p": write_jsonl(root / "p.jsonl", alpaca_rows(9, seed=5)),
            "x": write_jsonl(root / "x.jsonl", alpaca_rows(10, seed=1)),
            "y": write_jsonl(root / "y.jsonl", alpaca_rows(7, seed=2)),
            "q": write_jsonl(root / "q.jsonl", alpaca_rows(5, seed=6))}


def make_spec(model_dir, adapter, **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "adapter": adapter}
    raw["hyperparameters"] = {"batch_size": 3, "learning_rate": 1e-2, "lr_scheduler": "constant", **hyperparameters}
    return parse_spec(raw)


# The LoPA job and two LoRA jobs of other shapes: a cohort holds them in this order, so the LoRA jobs' rows move
# by the prompt rows before them.
P_SPEC = dict(adapter=LOPA, epochs=2, gradient_accumulation_steps=2, warmup_steps=1, weight_decay=0.01, seed=4)
X_SPEC = dict(adapter=LORA, epochs=2, gradient_accumulation_steps=2, lr_scheduler="cosine", seed=7)
Y_SPEC = dict(adapter={"r": 8, "target_modules": ["q_proj", "v_proj"]}, batch_size=2, max_seq_len=24, seed=3)
# A second LoPA job, of other sizes, on other data
Q_SPEC = dict(adapter={"type": "lopa", "lopa": {"num_virtual_tokens": 5, "rank": 1, "head_size": 4}}, batch_size=2,
              max_seq_len=40, seed=8)
SPECS = {"p": P_SPEC, "x": X_SPEC, "y": Y_SPEC, "q": Q_SPEC}


def cohort_of(model_dir, datasets, job_ids) -> Cohort:
    cohort = Cohort(model_dir)
    for job_id in job_ids:
        cohort.add_job(job_id, make_spec(model_dir, **SPECS[job_id]), datasets[job_id])
    return cohort


def state(cohort: Cohort, job_id: str) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in cohort.jobs[job_id].adapter.named_parameters()}


def assert_bitwise(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def spread(adapter: LopaAdapter, seed: int = 0) -> None:
    """Larger parameters than the init's, so the gate sigmoid(u vᵀ) is far from 1/2 and every part of the
    generator shapes the gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def reference_loss(model, examples, params, m: int) -> torch.Tensor:
    """The LoPA loss of `examples` in float64, one sequence at a time: executor/lopa.py's formula for its prompt
    (`lopa_prompts_reference`), [Z, x] through the plain model by inputs_embeds, the mean over all target tokens."""
    shared, *heads = params
    total, targets = 0.0, 0
    for example in examples:
        ids, labels = torch.tensor(example.input_ids), torch.tensor(example.labels)
        inputs = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)  # before the 1st target
        embeds = model.get_input_embeddings()(ids)
        prompt = lopa_prompts_reference(embeds, [len(ids)], [inputs], shared, heads[:4], heads[4:])[0]
        logits = model(inputs_embeds=torch.cat([prompt, embeds])[None], use_cache=False).logits[0, m:]
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        targets += int((labels[1:] != IGNORE_INDEX).sum())
    return total / targets


def test_a_lopa_jobs_gradient_equals_the_float64_reference(llama, datasets, tmp_path):
    data = write_jsonl(tmp_path / "four.jsonl", alpaca_rows(4, seed=9))
    # one micro-batch of all four examples, and a window of two: after one step the gradient is pending, unstepped
    spec = make_spec(llama, LOPA, batch_size=4, gradient_accumulation_steps=2, max_steps=1)
    cohort = Cohort(llama)
    cohort.add_job("p", spec, data)
    cohort.add_job("x", make_spec(llama, **X_SPEC), datasets["x"])  # a LoRA job beside it, as in service
    adapter = cohort.jobs["p"].adapter
    spread(adapter)
    cohort.step()
    produced = [p.grad * 2 for p in adapter.parameters()]  # the step weighs a micro-batch 1 / window

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64, attn_implementation="sdpa")
    model.requires_grad_(False)
    prompt = adapter.prompt
    params = [t.detach().double().requires_grad_() for t in (prompt.shared, *head_tensors(prompt.u_head),
                                                              *head_tensors(prompt.v_head))]
    examples, _ = JobData(data, "auto", cohort.tokenizer, 512, 4, 0).next_batch()
    reference_loss(model, examples, params, prompt.num_virtual_tokens).backward()
    names = [name for name, _ in adapter.named_parameters()]
    assert len(names) == len(params) == 9
    for name, grad, param in zip(names, produced, params):
        assert grad.abs().sum() > 0, name
        error = (grad.double() - param.grad).norm() / param.grad.norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"  # fp32 against fp64 (measured: 2e-7 to 5e-7)


def test_a_lora_job_beside_a_lopa_job_trains_bitwise_as_alone(llama, datasets):
    alone = cohort_of(llama, datasets, ["x"])
    alone_history = train_cohort(alone)
    together = cohort_of(llama, datasets, ["p", "x", "y"])
    together_history = train_cohort(together)
    assert [r.loss for r in together_history["x"]] == [r.loss for r in alone_history["x"]]
    assert_bitwise(state(together, "x"), state(alone, "x"))
    assert all(r.error is None for results in together_history.values() for r in results)


def test_a_lopa_job_beside_lora_jobs_and_another_lopa_job_trains_bitwise_as_alone(llama, datasets):
    alone = cohort_of(llama, datasets, ["p"])
    alone_history = train_cohort(alone)
    together = cohort_of(llama, datasets, ["x", "q", "p", "y"])
    together_history = train_cohort(together)
    # 9 examples / 3 = 3 micro-batches an epoch, x2 epochs, in windows of 2: 3 optimizer steps
    assert len(alone_history["p"]) == 6 and alone_history["p"][-1].step == 3 and alone_history["p"][-1].done
    assert [r.loss for r in together_history["p"]] == [r.loss for r in alone_history["p"]]
    assert_bitwise(state(together, "p"), state(alone, "p"))
    assert all(r.error is None for results in together_history.values() for r in results)
    first = make_spec(llama, **P_SPEC)
    initial = LopaAdapter(first.adapter, together.model.config.hidden_size, first.hyperparameters.seed)
    assert all(not torch.equal(p, q) for p, q in zip(together.jobs["p"].adapter.parameters(), initial.parameters()))


def test_the_lopa_jobs_target_tokens_are_its_datas_and_its_prompt_rows_count_as_step_tokens(llama, datasets):
    cohort = cohort_of(llama, datasets, ["p"])
    result = cohort.step()["p"]
    examples, _ = JobData(datasets["p"], "auto", cohort.tokenizer, 512, 3, 4).next_batch()
    assert result.tokens == sum(example.num_targets for example in examples)
    assert cohort.step_tokens == sum(len(example.input_ids) + 3 for example in examples)


def test_a_lopa_job_whose_loss_is_nan_fails_alone(llama, datasets):
    alone = cohort_of(llama, datasets, ["x"])
    alone_history = train_cohort(alone)
    together = cohort_of(llama, datasets, ["p", "x"])
    with torch.no_grad():
        together.jobs["p"].adapter.prompt.shared.fill_(float("nan"))
    history = train_cohort(together)
    assert "loss is nan" in history["p"][0].error and len(history["p"]) == 1
    assert [r.loss for r in history["x"]] == [r.loss for r in alone_history["x"]]
    assert_bitwise(state(together, "x"), state(alone, "x"))


def test_a_resumed_lopa_job_ends_bitwise_as_an_uninterrupted_one(llama, datasets, tmp_path):
    uninterrupted = cohort_of(llama, datasets, ["p", "x"])
    train_cohort(uninterrupted)
    first = cohort_of(llama, datasets, ["p", "x"])
    train_cohort(first, steps=3)  # mid-window: a pending gradient is part of the state
    assert first.jobs["p"].accumulated == 1
    directory = first.checkpoint("p", tmp_path / "ckpt")
    assert {path.name for path in directory.iterdir()} == {LOPA_CONFIG, LOPA_WEIGHTS, TRAINING_STATE}
    resumed = Cohort(llama)
    resumed.add_job("p", make_spec(llama, **P_SPEC), datasets["p"], resume_from=directory)
    train_cohort(resumed)
    assert resumed.jobs["p"].step == uninterrupted.jobs["p"].step == 3
    assert_bitwise(state(resumed, "p"), state(uninterrupted, "p"))
    assert_bitwise(resumed.jobs["p"].optimizer.optimizer.state_dict()["state"][0],
                   uninterrupted.jobs["p"].optimizer.optimizer.state_dict()["state"][0])


def test_the_export_on_a_plain_hf_base_gives_the_cohorts_logits(llama, datasets, tmp_path):
    cohort = cohort_of(llama, datasets, ["p", "x"])
    spread(cohort.jobs["p"].adapter)  # an instance part that matters (at the init it is ~0: every gate ~1/2)
    train_cohort(cohort, steps=4)
    directory = cohort.export("p", tmp_path / "export")
    assert {path.name for path in directory.iterdir()} == {LOPA_CONFIG, LOPA_WEIGHTS}
    config = json.loads((directory / LOPA_CONFIG).read_text())
    assert (config["adapter_type"], config["num_virtual_tokens"], config["rank"], config["head_size"]) == (
        "lopa", 3, 2, 8)
    assert config["base_model_name_or_path"] == str(llama)
    assert set(load_file(str(directory / LOPA_WEIGHTS))) == {
        "shared", *(f"{head}.{layer}.{kind}" for head in ("u_head", "v_head") for layer in ("dense", "out")
                    for kind in ("weight", "bias"))}

    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32, attn_implementation="sdpa")
    prompt = load_lopa(directory)
    ids = cohort.tokenizer("question: what is two plus two? answer: four")["input_ids"]
    for inputs in (6, None):
        want = cohort.logits("p", ids, inputs)
        got = lopa_logits(base, prompt, ids, inputs)
        assert got.shape == (len(ids), base.config.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        bare = base(torch.tensor([ids])).logits[0]
    assert not torch.allclose(got, bare, atol=1e-3), "the prompt should move the logits"
    assert not torch.allclose(lopa_logits(base, prompt, ids, 6), lopa_logits(base, prompt, ids, 9), atol=1e-5), \
        "the prompt depends on the input"
    with pytest.raises(MergeError, match="a LoPA job's soft-prompt generator, not a weight delta"):
        merge_adapter(directory, llama, tmp_path / "merged")  # `lorafleet merge`: nothing to merge


def test_loading_something_else_than_a_lopa_export_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lopa_config.json"):
        load_lopa(tmp_path)
    (tmp_path / LOPA_CONFIG).write_text(json.dumps({"format": 9, "adapter_type": "lopa"}))
    with pytest.raises(ValueError, match="format 9"):
        load_lopa(tmp_path)


def test_passes_and_checkpointed_layers_give_a_lopa_job_its_one_pass_gradient(llama, datasets):
    def pending_gradients(**options) -> tuple[dict[str, torch.Tensor], Cohort]:
        cohort = Cohort(llama, **options)
        for job_id in ("p", "x"):  # windows of two: after one step the gradients are pending
            cohort.add_job(job_id, make_spec(llama, **SPECS[job_id]), datasets[job_id])
        spread(cohort.jobs["p"].adapter)
        cohort.step()
        return {name: p.grad.clone() for name, p in cohort.jobs["p"].adapter.named_parameters()}, cohort

    one_pass, cohort = pending_gradients()
    assert cohort.largest_pass_tokens == cohort.step_tokens
    in_passes, cohort = pending_gradients(max_pass_tokens=100)
    assert cohort.step_tokens > cohort.largest_pass_tokens, "the step ran in several passes"
    checkpointed, _ = pending_gradients(activation_checkpointing=1)
    for name, grad in one_pass.items():
        torch.testing.assert_close(in_passes[name], grad, rtol=1e-5, atol=1e-7)  # summed in another order
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-8)


def test_a_validation_set_is_evaluated_with_the_jobs_prompts(llama, datasets):
    cohort = cohort_of(llama, datasets, ["p", "x"])
    spread(cohort.jobs["p"].adapter)
    data = JobData(datasets["p"], "auto", cohort.tokenizer, 512, 9, 0)
    examples, _ = JobData(datasets["p"], "auto", cohort.tokenizer, 512, 9, 0).next_batch()
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float64, attn_implementation="sdpa")
    prompt = cohort.jobs["p"].adapter.prompt
    params = [t.detach().double() for t in (prompt.shared, *head_tensors(prompt.u_head), *head_tensors(prompt.v_head))]
    with torch.no_grad():
        want = reference_loss(base, examples, params, prompt.num_virtual_tokens).item()
    assert cohort.evaluate("p", data) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("quantization, dtype", [("nf4", "float32"), ("none", "bfloat16")])
def test_a_lopa_job_trains_beside_a_lora_job_on_a_quantized_or_bf16_base(llama, datasets, tmp_path, quantization,
                                                                         dtype):
    """bitsandbytes runs 4-bit layers on the CPU; the prompt (its generator in fp32) is cast to the compute dtype."""
    cohort = Cohort(llama, quantization=quantization, dtype=dtype)
    data = write_jsonl(tmp_path / "six.jsonl", alpaca_rows(6, seed=3))
    for job_id, adapter in (("p", LOPA), ("x", {"r": 4, "target_modules": ["q_proj", "up_proj"]})):
        spec = parse_spec({"base_model": str(llama), "dataset": "d", "adapter": adapter, "quantization": quantization,
                           "dtype": dtype, "hyperparameters": {"batch_size": 6, "max_steps": 6,
                                                               "learning_rate": 5e-2}})
        cohort.add_job(job_id, spec, data)
    spread(cohort.jobs["p"].adapter)
    assert all(p.dtype == torch.float32 for p in cohort.jobs["p"].adapter.parameters())
    history = train_cohort(cohort)
    assert all(r.error is None for results in history.values() for r in results)
    losses = [r.loss for r in history["p"]]  # one batch = the whole dataset, so losses are comparable
    assert losses[-1] < losses[0], losses
    exported = load_lopa(cohort.export("p", tmp_path / "export")).state_dict()
    assert_bitwise(exported, cohort.jobs["p"].adapter.prompt.state_dict())


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "gpt2", "qwen2_moe", "phi3"])
def test_a_lopa_job_on_another_family_exports_the_cohorts_logits(tmp_path, family):
    """Families that scale their embeddings (Gemma: in the model, Gemma 3: in the embedding), add learned positions
    (GPT-2) or route tokens to experts (Qwen2-MoE): the loader on the plain base agrees with the cohort."""
    from helpers_models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / family, family)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(6, seed=3))
    cohort = Cohort(model_dir)
    cohort.add_job("x", make_spec(model_dir, {"r": 4, "target_modules": "all-linear"}, max_steps=3), data)
    cohort.add_job("p", make_spec(model_dir, LOPA, max_steps=3), data)
    spread(cohort.jobs["p"].adapter)
    history = train_cohort(cohort)
    assert [r.error for results in history.values() for r in results if r.error] == []
    prompt = load_lopa(cohort.export("p", tmp_path / "export"))
    attention = "eager" if family == "gemma2" else "sdpa"  # Gemma 2's soft-capped scores: eager only in HF
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    ids = cohort.tokenizer("question: what is two plus two? answer: four")["input_ids"]
    torch.testing.assert_close(lopa_logits(base, prompt, ids, 6), cohort.logits("p", ids, 6), rtol=1e-5, atol=1e-5)
