"""A GaLore job (executor/galore_job.py) on a tiny Llama on the CPU, fp32: it trains as a plain loop of the Hugging
Face model with GaLoreAdamW does, learns, resumes bitwise, exports a model `from_pretrained` loads, and fails alone
on bad data or a non-finite loss or gradient."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_models import alpaca_rows, llama, single_torch_thread, write_jsonl  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.executor.data import IGNORE_INDEX, JobData, epoch_order
from lorafleet.executor.galore import GaLoreAdamW
from lorafleet.executor.galore_job import GaloreJob, GaloreSettings
from lorafleet.scheduler.spec import Hyperparameters

SETTINGS = GaloreSettings(rank=8, update_proj_gap=2, scale=0.25)
# two micro-batches a step, a warmup step, linear decay, weight decay and clipping (the random model's norms are ~2)
HP = Hyperparameters(batch_size=3, gradient_accumulation_steps=2, max_steps=5, learning_rate=2e-3, warmup_steps=1,
                     lr_scheduler="linear", weight_decay=0.01, max_grad_norm=1.0, max_seq_len=256, seed=3)


@pytest.fixture
def dataset(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(10))


def run(job: GaloreJob, micro_batches: int | None = None) -> list:
    """Step `job` `micro_batches` times (None: to its end); return the results."""
    results = []
    while job.active and (micro_batches is None or len(results) < micro_batches):
        results.append(job.step())
    return results


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def reference_lr_factor(step: int, total_steps: int) -> float:
    """HP's schedule written out: one warmup step from 0, then linear decay to 0."""
    return 0.0 if step < 1 else 1.0 - (step - 1) / (total_steps - 1)


def reference_training(llama, dataset, target_modules) -> tuple[torch.nn.Module, list[float]]:
    """The job's recipe as a plain loop: the HF model (its own attention, each sequence alone, unpacked), the same
    batches, the mean over each micro-batch's target tokens, clipping, GaLoreAdamW on the target Linear weights."""
    model = AutoModelForCausalLM.from_pretrained(llama)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    data = JobData(dataset, "auto", tokenizer, HP.max_seq_len, HP.batch_size, HP.seed)
    projected = [module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                 and name != "lm_head" and (target_modules == ("all-linear",) or name.split(".")[-1] in target_modules)]
    rest = [param for param in model.parameters() if all(param is not weight for weight in projected)]
    optimizer = GaLoreAdamW([{"params": rest}, {"params": projected, "galore": True}], lr=HP.learning_rate,
                            weight_decay=HP.weight_decay, rank=SETTINGS.rank, update_proj_gap=SETTINGS.update_proj_gap,
                            scale=SETTINGS.scale, proj_type=SETTINGS.proj_type)
    losses = []
    for step in range(HP.max_steps):
        for _ in range(HP.gradient_accumulation_steps):
            examples, _epoch = data.next_batch()
            targets = sum(example.num_targets for example in examples)
            assert targets > 0
            loss_sum = sum(F.cross_entropy(model(torch.tensor([example.input_ids])).logits[0, :-1],
                                           torch.tensor(example.labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum")
                           for example in examples)
            losses.append(loss_sum.item() / targets)
            (loss_sum / targets / HP.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HP.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = HP.learning_rate * reference_lr_factor(step, HP.max_steps)
        optimizer.step()
        optimizer.zero_grad()
    return model, losses


@pytest.mark.parametrize("target_modules", [("all-linear",), ("q_proj", "down_proj")])
def test_training_equals_a_plain_loop_of_the_hf_model_with_galore_adamw(llama, dataset, target_modules):
    settings = GaloreSettings(rank=SETTINGS.rank, update_proj_gap=SETTINGS.update_proj_gap, scale=SETTINGS.scale,
                              target_modules=target_modules)
    job = GaloreJob(llama, settings, HP, dataset)
    results = run(job)
    reference, reference_losses = reference_training(llama, dataset, target_modules)

    assert [result.step for result in results][-1] == job.total_steps == HP.max_steps and results[-1].done
    torch.testing.assert_close([result.loss for result in results], reference_losses, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(llama)
    for name, param in job.model.named_parameters():
        assert not torch.equal(param, base.get_parameter(name)), f"{name} did not train"
        torch.testing.assert_close(param, reference.get_parameter(name), rtol=1e-4, atol=1e-5, msg=name)


def test_the_loss_decreases_on_a_learnable_dataset(llama, tmp_path):
    dataset = write_jsonl(tmp_path / "fox.jsonl", [{"text": "the quick brown fox jumps over the lazy dog"}] * 8)
    hp = Hyperparameters(batch_size=4, max_steps=12, learning_rate=3e-3, lr_scheduler="constant", max_seq_len=64)
    results = run(GaloreJob(llama, SETTINGS, hp, dataset))
    losses = [result.loss for result in results]
    assert all(result.grad_norm is not None and math.isfinite(result.grad_norm) for result in results)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_resumed_from_a_mid_run_checkpoint_ends_bitwise_equal(llama, dataset, tmp_path, dtype):
    uninterrupted = GaloreJob(llama, SETTINGS, HP, dataset, dtype=dtype)
    expected = [result.loss for result in run(uninterrupted)]

    first = GaloreJob(llama, SETTINGS, HP, dataset, dtype=dtype)
    # 7 micro-batches: mid-window (one micro-batch's gradients pending), and the projections refreshed at the third
    # step still in use by the fourth
    before = [result.loss for result in run(first, micro_batches=7)]
    first.checkpoint(tmp_path / "checkpoint")
    resumed = GaloreJob(llama, SETTINGS, HP, dataset, dtype=dtype, resume_from=tmp_path / "checkpoint")
    assert (resumed.steps_done, resumed.accumulated) == (3, 1)
    assert resumed.model.dtype == getattr(torch, dtype)
    assert {state["exp_avg"].dtype for state in resumed.optimizer.optimizer.state.values()} == {torch.float32}
    after = [result.loss for result in run(resumed)]

    assert before + after == expected
    for name, param in uninterrupted.model.named_parameters():
        assert torch.equal(param, resumed.model.get_parameter(name)), name


def test_a_checkpoint_does_not_resume_a_job_of_other_settings(llama, dataset, tmp_path):
    job = GaloreJob(llama, SETTINGS, HP, dataset)
    run(job, micro_batches=2)
    job.checkpoint(tmp_path / "checkpoint")
    other = GaloreSettings(rank=4, update_proj_gap=SETTINGS.update_proj_gap)
    with pytest.raises(ValueError, match="other GaLore settings"):
        GaloreJob(llama, other, HP, dataset, resume_from=tmp_path / "checkpoint")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_export_loads_with_from_pretrained_with_equal_logits(llama, dataset, tmp_path, dtype):
    job = GaloreJob(llama, SETTINGS, HP, dataset, dtype=dtype)
    run(job, micro_batches=4)
    directory = job.export(tmp_path / "export")

    assert "lorafleet" not in (directory / "config.json").read_text()  # no attention of ours named in the config
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert loaded.dtype == getattr(torch, dtype)  # the weights as trained, not widened
    tokenizer = AutoTokenizer.from_pretrained(directory)
    input_ids = tokenizer("write a short poem about the sea")["input_ids"]
    assert input_ids == AutoTokenizer.from_pretrained(llama)("write a short poem about the sea")["input_ids"]
    with torch.no_grad():
        logits = loaded(torch.tensor([input_ids])).logits[0]
        base_logits = AutoModelForCausalLM.from_pretrained(llama)(torch.tensor([input_ids])).logits[0]
    torch.testing.assert_close(logits.float(), job.logits(input_ids).float(), rtol=1e-5, atol=1e-5)
    assert (logits.float() - base_logits).abs().max() > 1e-3  # the export is the trained model, not the base


def test_a_bad_dataset_line_fails_the_job_with_an_error_naming_the_line(llama, tmp_path):
    rows = [json.dumps(row) for row in alpaca_rows(6)]
    rows[4] = '{"instruction": "cut short'
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("\n".join(rows) + "\n")
    job = GaloreJob(llama, SETTINGS, HP, dataset)
    results = run(job)

    assert results[-1].error is not None and "bad.jsonl line 5" in results[-1].error, results[-1].error
    # read ahead by the micro-batch before, the bad line still fails the micro-batch that draws it
    assert len(results) == epoch_order(6, HP.seed, 0).index(4) // HP.batch_size + 1
    assert not job.active and not job.done
    with pytest.raises(RuntimeError, match="failed"):
        job.step()


def poison_the_loss(job: GaloreJob) -> None:
    """The next forward's final hidden states become NaN, and so its loss."""
    job.model.model.norm.register_forward_hook(lambda module, args, output: output * float("nan"))


def poison_a_gradient(job: GaloreJob) -> None:
    """The next backward's gradient of the first layer's q_proj becomes inf; the loss stays finite."""
    job.model.model.layers[0].self_attn.q_proj.weight.register_hook(lambda grad: grad + float("inf"))


@pytest.mark.parametrize("poison, error", [(poison_the_loss, "loss is nan at step 2"),
                                           (poison_a_gradient, "gradient norm is inf at step 2")])
def test_a_non_finite_loss_or_gradient_fails_the_job_without_changing_its_weights(llama, dataset, poison, error):
    job = GaloreJob(llama, SETTINGS, HP, dataset)
    run(job, micro_batches=3)  # step 1 done, the first micro-batch of step 2 accumulated
    before = weights(job.model)
    moments = {id(param): state["exp_avg"].clone() for param, state in job.optimizer.optimizer.state.items()}
    poison(job)
    result = job.step()

    assert result.error is not None and error in result.error, result.error
    assert result.step == 1 and not job.active
    for name, param in job.model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
    for param, state in job.optimizer.optimizer.state.items():
        assert torch.equal(state["exp_avg"], moments[id(param)])


def test_a_window_without_target_tokens_leaves_the_weights_alone_and_counts_toward_the_schedule(llama, dataset):
    hp = Hyperparameters(batch_size=3, max_steps=2, learning_rate=1e-2, weight_decay=0.1, max_seq_len=8)
    job = GaloreJob(llama, SETTINGS, hp, dataset)  # alpaca prompts are longer than 8 tokens: no answer token is left
    before = weights(job.model)
    results = run(job)

    assert [(result.tokens, result.loss, result.grad_norm, result.step) for result in results] == [
        (0, None, None, 1), (0, None, None, 2)]
    assert results[-1].done and results[1].lr < results[0].lr  # the schedule went on
    for name, param in job.model.named_parameters():
        assert torch.equal(param, before[name]), name


def galore_cohort(llama, dataset, batch_size: int):
    """A GaLore cohort (executor/galore_cohort.py) running one job "g" on `dataset`, fp32."""
    from lorafleet.executor.galore_cohort import GaloreCohort
    from lorafleet.scheduler.spec import parse_spec

    spec = parse_spec({"base_model": str(llama), "dataset": "t/train.jsonl",
                       "adapter": {"type": "galore", "galore": {"rank": 8}},
                       "hyperparameters": {"batch_size": batch_size, "max_seq_len": 256, "max_steps": 2}})
    cohort = GaloreCohort(llama, dtype="float32")
    cohort.add_job("g", spec, dataset)
    return cohort


def test_a_galore_cohorts_validation_loss_is_the_mean_target_loss_of_the_hf_model(llama, dataset, tmp_path):
    cohort = galore_cohort(llama, dataset, batch_size=3)
    validation = write_jsonl(tmp_path / "valid.jsonl", alpaca_rows(7))  # 3 micro-batches, the last one short
    model, tokenizer = AutoModelForCausalLM.from_pretrained(llama), AutoTokenizer.from_pretrained(llama)
    total, count = 0.0, 0
    reference = JobData(validation, "auto", tokenizer, 256, 3, seed=0)
    for example in (e for _ in range(reference.steps_per_epoch) for e in reference.next_batch()[0]):
        labels = torch.tensor(example.labels[1:])
        total += F.cross_entropy(model(torch.tensor([example.input_ids])).logits[0, :-1], labels,
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())

    got = cohort.evaluate("g", JobData(validation, "auto", cohort.tokenizer, 256, 3, seed=0))
    assert got == pytest.approx(total / count, rel=1e-5)


def test_a_galore_validation_pass_joins_micro_batches_up_to_the_largest_training_pass(llama, dataset, tmp_path):
    cohort = galore_cohort(llama, dataset, batch_size=4)
    cohort.step()
    job, forwards = cohort.job, []
    loss_sum = job.loss_sum
    job.loss_sum = lambda examples: forwards.append(sum(len(e.input_ids) for e in examples)) or loss_sum(examples)
    validation = write_jsonl(tmp_path / "valid.jsonl", alpaca_rows(7))

    def evaluate():  # 7 micro-batches of one example each
        return cohort.evaluate("g", JobData(validation, "auto", cohort.tokenizer, 256, 1, seed=0))

    joined = evaluate()
    assert 1 < len(forwards) < 7 and max(forwards) <= cohort.largest_pass_tokens
    forwards.clear()
    cohort.largest_pass_tokens = 0  # nothing to join up to: one forward per micro-batch
    apart = evaluate()
    assert len(forwards) == 7
    assert joined == pytest.approx(apart, rel=1e-5), "the same mean loss however the micro-batches are grouped"
