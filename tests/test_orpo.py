"""ORPO jobs, fp32 on the CPU: the same training as TRL's ORPOTrainer (the chosen sequence's NLL over its prompt and
answer, plus β times the odds-ratio term), cohort invariance beside SFT, SimPO and DPO jobs, no reference forward."""

from __future__ import annotations

import pytest
import torch
from helpers_models import llama, single_torch_thread, train_cohort, write_jsonl  # noqa: F401 (fixtures)
from helpers_trl import assert_rewards_match, assert_weights_match, trl_run
from test_dpo import PAIRS, data, make_spec, weights  # noqa: F401 (data: a fixture)
from test_simpo import targets_of

from lorafleet.executor.cohort import Cohort


def trl_orpo_run(model_dir, spec, dataset, initial, output_dir):
    """TRL's ORPOTrainer from `initial`."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return trl_run(ORPOTrainer, ORPOConfig, model_dir, spec, dataset, initial, output_dir,
                   config={"max_length": spec.hyperparameters.max_seq_len})


def test_orpo_matches_trl_orpo_trainer(llama, data, tmp_path):
    """Four pairs, every step a batch of all four: the losses, the rewards and the LoRA weights after three AdamW
    steps are TRL's."""
    adapter = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    spec = make_spec(llama, "orpo", adapter=adapter, batch_size=4, max_steps=3, learning_rate=5e-2, beta=0.5, seed=3)
    cohort = Cohort(llama)
    cohort.add_job("orpo", spec, data["pairs"])
    initial = weights(cohort, "orpo")
    examples = [cohort.jobs["orpo"].data._example(index) for index in range(len(PAIRS))]
    history = train_cohort(cohort)["orpo"]
    want_losses, logged, want, tokenised = trl_orpo_run(llama, spec, data["pairs"], initial, tmp_path / "trl")

    for example, row in zip(examples, tokenised):  # the same sequences and answer targets
        assert example.input_ids == row["chosen_input_ids"] + row["rejected_input_ids"]
        assert example.chosen_length == len(row["chosen_input_ids"])
        assert example.num_targets == targets_of(row["chosen_labels"]) + targets_of(row["rejected_labels"])
    assert [r.loss for r in history] == pytest.approx(want_losses, rel=1e-5)
    assert history[-1].loss < history[0].loss - 0.05
    assert_rewards_match(history, logged)
    assert len(logged) == 3
    assert_weights_match(weights(cohort, "orpo"), want)


def test_orpo_learns_its_chosen_prompts_but_its_odds_cover_only_the_answers(llama, data):
    """The NLL of an untrained ORPO job (B = 0: the base) is the base's mean loss over the chosen sequences' every
    token after the first, prompts included, which an SFT job on prompt + chosen as plain text computes."""
    cohort = Cohort(llama)
    cohort.add_job("orpo", make_spec(llama, "orpo", batch_size=4, max_steps=1, beta=1e-6), data["pairs"])
    texts = write_jsonl(data["pairs"].parent / "chosen_texts.jsonl",
                        [{"text": pair["prompt"] + pair["chosen"]} for pair in PAIRS])
    cohort.add_job("sft", make_spec(llama, batch_size=4, max_steps=1), texts)
    results = cohort.step()
    assert results["orpo"].loss == pytest.approx(results["sft"].loss, rel=1e-4)  # β ≈ 0: the NLL alone
    assert results["orpo"].rewards.chosen < 0 and results["orpo"].rewards.rejected < 0


def run_orpo(model_dir, data, with_others: bool, max_pass_tokens=None):
    cohort = Cohort(model_dir, max_pass_tokens=max_pass_tokens)
    spec = make_spec(model_dir, "orpo", adapter={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, batch_size=2,
                     epochs=2, gradient_accumulation_steps=2, beta=0.3, seed=7)
    cohort.add_job("orpo", spec, data["pairs"])
    if with_others:
        cohort.add_job("sft", make_spec(model_dir, adapter={"r": 8, "target_modules": ["q_proj", "v_proj"]},
                                        batch_size=3, max_steps=3, seed=3), data["alpaca"])
        cohort.add_job("simpo", make_spec(model_dir, "simpo", batch_size=3, max_steps=2, seed=4), data["pairs"])
        nola = {"type": "nola", "r": 2, "target_modules": ["o_proj"], "nola": {"num_basis": 8}}
        cohort.add_job("chat-dpo", make_spec(model_dir, "dpo", adapter=nola, max_steps=2, beta=0.5, seed=5),
                       data["chat_pairs"])
    return cohort, train_cohort(cohort)


@pytest.mark.parametrize("max_pass_tokens", [None, 60])
def test_orpo_cohort_invariance_beside_sft_simpo_and_dpo_jobs(llama, data, max_pass_tokens):
    """An ORPO job trains bit for bit the same alone and beside SFT, SimPO and DPO jobs, in one pass or split into
    passes (its NLL weighted by its whole micro-batch's chosen tokens either way)."""
    alone, alone_history = run_orpo(llama, data, with_others=False, max_pass_tokens=max_pass_tokens)
    together, together_history = run_orpo(llama, data, with_others=True, max_pass_tokens=max_pass_tokens)
    assert set(together_history) == {"orpo", "sft", "simpo", "chat-dpo"}
    assert all(r.error is None for results in together_history.values() for r in results)
    assert len(alone_history["orpo"]) == 4 and alone_history["orpo"][-1].done
    numbers = lambda history: [(r.loss, r.rewards) for r in history["orpo"]]  # noqa: E731
    assert numbers(together_history) == numbers(alone_history)
    for name, (a, b) in weights(alone, "orpo").items():
        assert torch.equal(weights(together, "orpo")[name][0], a)
        assert torch.equal(weights(together, "orpo")[name][1], b)
    assert not all(torch.equal(b, torch.zeros_like(b)) for _, b in weights(alone, "orpo").values())


def test_an_orpo_step_split_into_passes_has_the_loss_of_one_pass(llama, data):
    """Its NLL is a mean over the whole micro-batch's chosen tokens, not each pass's: split or not, the same loss."""
    losses = {}
    for max_pass_tokens in (None, 60):  # 60: a pair (two sequences kept together) a pass
        cohort = Cohort(llama, max_pass_tokens=max_pass_tokens)
        cohort.add_job("orpo", make_spec(llama, "orpo", batch_size=4, max_steps=1, beta=0.5), data["pairs"])
        losses[max_pass_tokens] = cohort.step()["orpo"].loss
        assert (cohort.largest_pass_tokens < cohort.step_tokens) == (max_pass_tokens is not None)
    assert losses[60] == pytest.approx(losses[None], rel=1e-6)


def test_an_orpo_job_runs_no_reference_forward(llama, data, monkeypatch):
    referenced = []
    original = Cohort._reference_logps
    monkeypatch.setattr(Cohort, "_reference_logps",
                        lambda self, batch: referenced.append(set(batch.rows)) or original(self, batch))
    cohort = Cohort(llama)
    cohort.add_job("orpo", make_spec(llama, "orpo", max_steps=2), data["pairs"])
    cohort.add_job("dpo", make_spec(llama, "dpo", max_steps=2), data["pairs"])
    assert len(train_cohort(cohort)["orpo"]) == 2 and referenced == [{"dpo"}, {"dpo"}]
    assert cohort.jobs["orpo"].spec.hyperparameters.beta == 0.1  # TRL's ORPOConfig default
