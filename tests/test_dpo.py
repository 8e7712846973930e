"""DPO jobs, fp32 on the CPU: the same training as TRL's DPOTrainer, cohort invariance beside SFT jobs, preference
records checked at submission."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_models import alpaca_rows, llama, single_torch_thread, train_cohort, write_jsonl  # noqa: F401 (fixtures)
from helpers_trl import assert_rewards_match, assert_weights_match, trl_run

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler import datasets, submission
from lorafleet.scheduler.formats import DataError, RecordLines
from lorafleet.scheduler.spec import SpecError, parse_spec

# Each prompt ends on a word boundary, so tokenising prompt + answer whole splits where the prompt ends (TRL takes
# the answer from where the two tokenisations part: the same tokens).
PAIRS = [
    {"prompt": "question: what is two plus two? answer:", "chosen": " four", "rejected": " the lazy dog"},
    {"prompt": "write a short poem about the sea:", "chosen": " the sky and the sea", "rejected": " no"},
    {"prompt": "the quick brown fox jumps over the", "chosen": " lazy dog", "rejected": " quick fox fox"},
    {"prompt": "a cohort of adapters trains on one", "chosen": " frozen base model", "rejected": " output input"},
]
CHAT_PAIRS = [
    {"input": {"messages": [{"role": "system", "content": "answer briefly"},
                            {"role": "user", "content": f"what is {n} plus {n}?"}]},
     "preferred_output": [{"role": "assistant", "content": answer}],
     "non_preferred_output": [{"role": "assistant", "content": "the quick brown fox"}]}
    for n, answer in (("two", "four"), ("one", "two"), ("four", "eight"))
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", PAIRS),
        "chat_pairs": write_jsonl(root / "chat_pairs.jsonl", CHAT_PAIRS),
        "alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_rows(7, seed=2)),
    }


def make_spec(model_dir, method="sft", adapter=None, **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "method": method, "adapter": adapter or {}}
    raw["hyperparameters"] = {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant", **hyperparameters}
    return parse_spec(raw)


def weights(cohort: Cohort, job_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return cohort.jobs[job_id].adapter.lora_weights()


def trl_dpo_run(model_dir, spec, dataset, initial, output_dir):
    """TRL's DPOTrainer from `initial`; its reference is the base with the adapter disabled (ref_model=None)."""
    from trl import DPOConfig, DPOTrainer

    return trl_run(DPOTrainer, DPOConfig, model_dir, spec, dataset, initial, output_dir,
                   config={"loss_type": ["sigmoid"], "max_length": None}, trainer={"ref_model": None})


def test_dpo_matches_trl_dpo_trainer_with_the_base_as_reference(llama, data, tmp_path):
    """Four pairs, every step a batch of all four (so TRL's shuffling cannot reorder what a step sees): the loss,
    the rewards and the LoRA weights after three AdamW steps are TRL's."""
    adapter = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    spec = make_spec(llama, "dpo", adapter=adapter, batch_size=4, max_steps=3, learning_rate=5e-2, beta=0.2, seed=3)
    cohort = Cohort(llama)
    cohort.add_job("dpo", spec, data["pairs"])
    initial = weights(cohort, "dpo")
    examples = [cohort.jobs["dpo"].data._example(index) for index in range(len(PAIRS))]
    history = train_cohort(cohort)["dpo"]
    want_losses, logged, want, tokenised = trl_dpo_run(llama, spec, data["pairs"], initial, tmp_path / "trl")

    for example, row in zip(examples, tokenised):  # the same sequences and targets
        prompt = row["prompt_ids"]
        assert example.input_ids == prompt + row["chosen_ids"] + prompt + row["rejected_ids"]
        assert example.chosen_length == len(prompt) + len(row["chosen_ids"])
        assert example.num_targets == len(row["chosen_ids"]) + len(row["rejected_ids"])
    assert history[0].loss == pytest.approx(math.log(2), rel=1e-6)  # B = 0: the adapter is the reference
    assert [r.loss for r in history] == pytest.approx(want_losses, rel=1e-5)
    assert history[-1].loss < history[0].loss - 0.05
    assert_rewards_match(history, logged)
    assert len(logged) == 3 and history[-1].rewards.accuracy == 1.0
    # measured: 3.1e-5 on layer 1's q_proj, whose gradients are the smallest (AdamW divides each by its own size, so
    # rounding differences of TRL's padded batch and our packed row weigh most there), 1.5e-6 at most elsewhere
    assert_weights_match(weights(cohort, "dpo"), want)


def run_dpo(model_dir, data, with_others: bool, max_pass_tokens=None):
    cohort = Cohort(model_dir, max_pass_tokens=max_pass_tokens)
    spec = make_spec(model_dir, "dpo", adapter={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, batch_size=2, epochs=2,
                     gradient_accumulation_steps=2, beta=0.3, seed=7)
    cohort.add_job("dpo", spec, data["pairs"])
    if with_others:
        cohort.add_job("sft", make_spec(model_dir, adapter={"r": 8, "target_modules": ["q_proj", "v_proj"]},
                                        batch_size=3, max_steps=3, seed=3), data["alpaca"])
        nola = {"type": "nola", "r": 2, "target_modules": ["o_proj"], "nola": {"num_basis": 8}}
        cohort.add_job("chat-dpo", make_spec(model_dir, "dpo", adapter=nola, max_steps=2, beta=0.5, seed=5),
                       data["chat_pairs"])
    return cohort, train_cohort(cohort)


@pytest.mark.parametrize("max_pass_tokens", [None, 60])
def test_dpo_cohort_invariance_beside_sft_and_dpo_jobs(llama, data, max_pass_tokens):
    """A DPO job trains bit for bit the same alone and beside an SFT job and a NOLA DPO job (its reference rows packed
    with theirs), in one pass or split into passes."""
    alone, alone_history = run_dpo(llama, data, with_others=False, max_pass_tokens=max_pass_tokens)
    together, together_history = run_dpo(llama, data, with_others=True, max_pass_tokens=max_pass_tokens)
    assert set(together_history) == {"dpo", "sft", "chat-dpo"}
    assert all(r.error is None for results in together_history.values() for r in results)
    assert len(alone_history["dpo"]) == 4 and alone_history["dpo"][-1].done  # 4 pairs / 2 = 2 a epoch, x2
    numbers = lambda history: [(r.loss, r.rewards) for r in history["dpo"]]  # noqa: E731
    assert numbers(together_history) == numbers(alone_history)
    assert together_history["sft"][0].rewards is None and together_history["chat-dpo"][0].rewards is not None
    for name, (a, b) in weights(alone, "dpo").items():
        assert torch.equal(weights(together, "dpo")[name][0], a) and torch.equal(weights(together, "dpo")[name][1], b)
    assert not all(torch.equal(b, torch.zeros_like(b)) for _, b in weights(alone, "dpo").values())


def test_chat_pairs_learn_only_the_outputs_turns(llama, data):
    cohort = Cohort(llama)
    cohort.add_job("chat", make_spec(llama, "dpo", max_steps=1), data["chat_pairs"])
    tokenizer = cohort.tokenizer
    example = cohort.jobs["chat"].data._example(0)
    chosen, rejected = (example.labels[begin:end] for begin, end in example.sequences())
    learned = lambda labels: tokenizer.decode([t for t in labels if t != -100])  # noqa: E731
    assert learned(chosen) == "four</s>" and learned(rejected) == "the quick brown fox</s>"
    assert cohort.evaluate("chat", cohort.jobs["chat"].data) == pytest.approx(math.log(2))  # untrained: the base


def test_a_dpo_job_on_sft_records_and_an_sft_job_on_pairs_are_refused(llama, data):
    cohort = Cohort(llama)
    with pytest.raises(ValueError, match="method 'dpo' trains on preference pairs .* not alpaca"):
        cohort.add_job("a", make_spec(llama, "dpo"), data["alpaca"])
    with pytest.raises(ValueError, match="preference records are preference pairs: set method 'dpo'"):
        cohort.add_job("b", make_spec(llama), data["pairs"])
    with pytest.raises(SpecError, match="dataset_format: method 'dpo' trains on preference pairs"):
        parse_spec({"base_model": "m", "dataset": "d", "method": "dpo", "dataset_format": "chat"})
    with pytest.raises(SpecError, match="hyperparameters.beta: Input should be greater than 0"):
        parse_spec({"base_model": "m", "dataset": "d", "method": "dpo", "hyperparameters": {"beta": 0}})


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "c"}, "line 2: missing 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "line 2: 'chosen' must be a string, got number"),
    ({**CHAT_PAIRS[0], "input": [{"role": "user", "content": "hi"}]},
     "line 2: 'input' must be an object with 'messages', got array"),
    ({**CHAT_PAIRS[0], "preferred_output": [{"role": "user", "content": "hi"}]},
     "line 2: preferred_output: message 1: unknown role 'user' \\(use only assistant\\)"),
    ({**CHAT_PAIRS[0], "non_preferred_output": []}, "line 2: 'non_preferred_output' is empty"),
    ({"input": {"messages": [{"role": "user"}]}, "preferred_output": [], "non_preferred_output": []},
     "line 2: input.messages: message 1: missing 'content'"),
])
def test_a_bad_preference_record_is_refused_naming_its_line_and_field(record, message):
    good = PAIRS[0] if "prompt" in record else CHAT_PAIRS[0]
    lines = RecordLines(1 << 20, 100)
    with pytest.raises(DataError, match=message):
        lines.feed((json.dumps(good) + "\n" + json.dumps(record) + "\n").encode())
        lines.finish()


def test_a_bad_preference_record_is_refused_at_submission(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SETTLED_SECONDS", 0.0)
    area = tmp_path / "data" / "alice"
    area.mkdir(parents=True)
    write_jsonl(area / "pairs.jsonl", PAIRS + [{"prompt": "p", "chosen": "c", "rejected": None}] + PAIRS)
    write_jsonl(area / "good.jsonl", PAIRS)

    def accept(dataset, **spec):
        raw = {"base_model": str(llama), "dataset": f"alice/{dataset}", "hyperparameters": {"batch_size": 2}, **spec}
        return submission.accept_submission(raw, "alice", tmp_path / "data", tmp_path / "hub", [llama.parent],
                                            tmp_path / "store")

    with pytest.raises(SpecError, match="'alice/pairs.jsonl' line 5: 'rejected' must be a string, got null"):
        accept("pairs.jsonl", method="dpo")
    with pytest.raises(SpecError, match="dataset: preference records are preference pairs: set method 'dpo'"):
        accept("good.jsonl")
    accepted = accept("good.jsonl", method="dpo", hyperparameters={"batch_size": 2, "beta": 0.25})
    assert accepted.spec.method == "dpo" and accepted.spec.hyperparameters.beta == 0.25


def test_a_dpo_job_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(llama, data, tmp_path):
    """Stopped half-way through an accumulation window in its second epoch, with dropout: the same losses, rewards
    and weights as the run that never stopped."""
    spec = make_spec(llama, "dpo", adapter={"r": 4, "lora_dropout": 0.1}, batch_size=1, epochs=2,
                     gradient_accumulation_steps=2, beta=0.2, seed=4)
    uninterrupted = Cohort(llama)
    uninterrupted.add_job("dpo", spec, data["pairs"])
    want = train_cohort(uninterrupted)["dpo"]
    first = Cohort(llama)
    first.add_job("dpo", spec, data["pairs"])
    before = [first.step()["dpo"] for _ in range(5)]
    first.checkpoint("dpo", tmp_path / "partial")
    resumed = Cohort(llama)
    resumed.add_job("dpo", spec, data["pairs"], resume_from=tmp_path / "partial")
    after = train_cohort(resumed)["dpo"]
    assert len(want) == 8 and [(r.loss, r.rewards) for r in before + after] == [(r.loss, r.rewards) for r in want]
    for name, (a, b) in weights(uninterrupted, "dpo").items():
        assert torch.equal(weights(resumed, "dpo")[name][0], a) and torch.equal(weights(resumed, "dpo")[name][1], b)
