"""Evaluation samples on the executor (issue 18): a job's prompts completed by its live adapter at a checkpoint equal
what PEFT greedily generates from that checkpoint's exported adapter, and sampling leaves the job's training bitwise
as it is without samples. Real cohort, real generation engine (executor/generate.py), tiny Llama on the CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.eval_samples import make_samples, record_eval_samples
from lorafleet.executor.serving import eos_token_ids
from lorafleet.scheduler.formats import Tokenizing
from lorafleet.scheduler.spec import parse_spec

pytest.importorskip("lorafleet.executor.generate")

PROMPTS = ("the quick brown fox", "write a short poem about the sea")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-samples")
    return build_tiny_model(root / "llama", "llama"), write_jsonl(root / "train.jsonl", alpaca_rows(16, seed=5))


def job_spec(model, eval_samples=PROMPTS):
    return parse_spec({"base_model": str(model), "dataset": "t/train.jsonl", "eval_samples": list(eval_samples),
                       "eval_max_tokens": 12,
                       "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
                       "hyperparameters": {"max_steps": 8, "batch_size": 2, "max_seq_len": 512,
                                           "learning_rate": 1e-2, "checkpoint_every": 4, "seed": 1}})


def generator_of(cohort):
    from lorafleet.executor.generate import Generator

    return Generator(cohort.model, cohort.routing, eos_token_ids=eos_token_ids(cohort.tokenizer, cohort.model))


def peft_greedy(model_dir, adapter_dir, prompt_ids: list[int], max_new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=eos[0])
    generated = out[0, len(prompt_ids):].tolist()
    return generated[:next((i for i, t in enumerate(generated) if t in eos), len(generated))]


def peft_greedy_base(model_dir, prompt_ids: list[int], max_new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(model_dir).eval().generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
            pad_token_id=eos[0])
    generated = out[0, len(prompt_ids):].tolist()
    return generated[:next((i for i, t in enumerate(generated) if t in eos), len(generated))]


def train(cohort: Cohort, job_id: str, at_checkpoint=lambda step: None) -> None:
    while cohort.active_jobs():
        for result in cohort.step().values():
            assert result.error is None, result.error
            if result.checkpoint_due:
                at_checkpoint(result.step)


def test_a_checkpoints_samples_are_what_peft_greedily_generates_from_its_adapter(setup, tmp_path):
    model, data = setup
    cohort = Cohort(model)
    cohort.add_job("job-a", job_spec(model), data)
    generator = generator_of(cohort)
    seen = []

    def at_checkpoint(step: int) -> None:
        samples = make_samples(generator, cohort, ["job-a"])["job-a"]
        seen.append((step, samples, cohort.export("job-a", tmp_path / f"adapter-{step}")))

    train(cohort, "job-a", at_checkpoint)
    assert [step for step, _, _ in seen] == [4, 8], "at each checkpoint and at the end"
    tokenizer, tokenizing = cohort.tokenizer, Tokenizing(cohort.tokenizer)
    eos = eos_token_ids(tokenizer, cohort.model)
    completions = set()
    for step, samples, adapter in seen:
        assert [sample.prompt for sample in samples] == list(PROMPTS)
        for sample in samples:
            want = peft_greedy(model, adapter, tokenizing.prompt("alpaca", sample.prompt), 12, eos)
            assert sample.completion == tokenizer.decode(want, skip_special_tokens=True), (step, sample)
            assert sample.finish_reason == ("length" if len(want) == 12 else "stop")
            completions.add((step, tuple(want)))
    base = {(step, tuple(peft_greedy_base(model, tokenizing.prompt("alpaca", prompt), 12, eos)))
            for step in (4, 8) for prompt in PROMPTS}
    assert completions != base, "the adapter changes what is generated: the comparison can tell adapters apart"


def test_sampling_at_checkpoints_leaves_the_jobs_training_bitwise_unchanged(setup, tmp_path):
    model, data = setup
    sampled, plain = Cohort(model), Cohort(model)
    sampled.add_job("job-a", job_spec(model), data)
    plain.add_job("job-a", job_spec(model, eval_samples=()), data)
    generator = generator_of(sampled)
    train(sampled, "job-a", lambda step: make_samples(generator, sampled, ["job-a"]))
    train(plain, "job-a")
    got = load_file(str(sampled.export("job-a", tmp_path / "sampled") / "adapter_model.safetensors"))
    want = load_file(str(plain.export("job-a", tmp_path / "plain") / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    assert any(name.endswith("lora_B.weight") and want[name].abs().sum() > 0 for name in want), "it trained"


class Events:
    def __init__(self):
        self.appended = []

    def append_event(self, job_id, type, **data):
        self.appended.append((job_id, type, data))


def test_a_failure_to_sample_is_an_event_per_job_and_never_an_exception(setup):
    model, data = setup
    cohort = Cohort(model)
    cohort.add_job("job-a", job_spec(model), data)
    cohort.add_job("job-b", job_spec(model, eval_samples=("hello",)), data)

    def broken(_cohort):
        raise RuntimeError("no pages left")

    events = Events()
    record_eval_samples(events, broken, cohort, {"job-a": 3, "job-b": 3})
    assert events.appended == [(job, "eval_samples", {"step": 3, "error": "RuntimeError: no pages left"})
                               for job in ("job-a", "job-b")]
    events = Events()
    record_eval_samples(events, generator_of, cohort, {"job-a": 0, "job-b": 0})  # both jobs in one batch
    assert [(job, len(data["samples"])) for job, _, data in events.appended] == [("job-a", 2), ("job-b", 1)]
