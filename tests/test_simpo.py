"""SimPO jobs, fp32 on the CPU: the same training as TRL's CPOTrainer with loss_type simpo (and cpo_alpha 0, so no NLL
term), cohort invariance beside SFT and DPO jobs, no reference forward, and the spec's methods in one place."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import get_args

import pytest
import torch
from helpers_models import llama, single_torch_thread, train_cohort  # noqa: F401 (fixtures)
from helpers_trl import assert_rewards_match, assert_weights_match, trl_run
from test_dpo import PAIRS, data, make_spec, weights  # noqa: F401 (data: a fixture)

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import DEFAULT_BETA, METHODS, PREFERENCE_METHODS, Method, SpecError, parse_spec

README = Path(__file__).parent.parent / "README.md"


def trl_simpo_run(model_dir, spec, dataset, initial, output_dir):
    """TRL's CPOTrainer with loss_type simpo and cpo_alpha 0 (no NLL term), from `initial`."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    hp = spec.hyperparameters
    return trl_run(CPOTrainer, CPOConfig, model_dir, spec, dataset, initial, output_dir,
                   config={"loss_type": "simpo", "simpo_gamma": hp.simpo_gamma, "cpo_alpha": 0.0,
                           "max_length": hp.max_seq_len})


def targets_of(labels: list[int]) -> int:
    """Target tokens of a TRL sequence: labels are aligned with the inputs, the first position predicts nothing."""
    return sum(1 for label in labels[1:] if label != -100)


def test_simpo_matches_trl_cpo_trainer_with_loss_type_simpo(llama, data, tmp_path):
    """Four pairs, every step a batch of all four: the losses, the rewards and the LoRA weights after three AdamW
    steps are TRL's."""
    adapter = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    spec = make_spec(llama, "simpo", adapter=adapter, batch_size=4, max_steps=3, learning_rate=5e-2, beta=2.5,
                     simpo_gamma=0.3, seed=3)
    cohort = Cohort(llama)
    cohort.add_job("simpo", spec, data["pairs"])
    initial = weights(cohort, "simpo")
    examples = [cohort.jobs["simpo"].data._example(index) for index in range(len(PAIRS))]
    history = train_cohort(cohort)["simpo"]
    want_losses, logged, want, tokenised = trl_simpo_run(llama, spec, data["pairs"], initial, tmp_path / "trl")

    for example, row in zip(examples, tokenised):  # the same sequences and targets
        assert example.input_ids == row["chosen_input_ids"] + row["rejected_input_ids"]
        assert example.chosen_length == len(row["chosen_input_ids"])
        assert example.num_targets == targets_of(row["chosen_labels"]) + targets_of(row["rejected_labels"])
    # B = 0: the adapter is the base, whose average log-probs give the first loss; γ alone would give log(1 + e^γ)
    assert history[0].loss != pytest.approx(math.log1p(math.exp(0.3)))
    assert [r.loss for r in history] == pytest.approx(want_losses, rel=1e-5)
    assert history[-1].loss < history[0].loss - 0.05
    assert_rewards_match(history, logged)
    assert len(logged) == 3
    assert_weights_match(weights(cohort, "simpo"), want)


def run_simpo(model_dir, data, with_others: bool, max_pass_tokens=None):
    cohort = Cohort(model_dir, max_pass_tokens=max_pass_tokens)
    spec = make_spec(model_dir, "simpo", adapter={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, batch_size=2,
                     epochs=2, gradient_accumulation_steps=2, seed=7)
    cohort.add_job("simpo", spec, data["pairs"])
    if with_others:
        cohort.add_job("sft", make_spec(model_dir, adapter={"r": 8, "target_modules": ["q_proj", "v_proj"]},
                                        batch_size=3, max_steps=3, seed=3), data["alpaca"])
        nola = {"type": "nola", "r": 2, "target_modules": ["o_proj"], "nola": {"num_basis": 8}}
        cohort.add_job("chat-dpo", make_spec(model_dir, "dpo", adapter=nola, max_steps=2, beta=0.5, seed=5),
                       data["chat_pairs"])
    return cohort, train_cohort(cohort)


@pytest.mark.parametrize("max_pass_tokens", [None, 60])
def test_simpo_cohort_invariance_beside_sft_and_dpo_jobs(llama, data, max_pass_tokens):
    """A SimPO job trains bit for bit the same alone and beside an SFT job and a DPO job (whose reference rows are
    packed without it), in one pass or split into passes."""
    alone, alone_history = run_simpo(llama, data, with_others=False, max_pass_tokens=max_pass_tokens)
    together, together_history = run_simpo(llama, data, with_others=True, max_pass_tokens=max_pass_tokens)
    assert set(together_history) == {"simpo", "sft", "chat-dpo"}
    assert all(r.error is None for results in together_history.values() for r in results)
    assert len(alone_history["simpo"]) == 4 and alone_history["simpo"][-1].done
    numbers = lambda history: [(r.loss, r.rewards) for r in history["simpo"]]  # noqa: E731
    assert numbers(together_history) == numbers(alone_history)
    assert together_history["sft"][0].rewards is None and together_history["chat-dpo"][0].rewards is not None
    for name, (a, b) in weights(alone, "simpo").items():
        assert torch.equal(weights(together, "simpo")[name][0], a)
        assert torch.equal(weights(together, "simpo")[name][1], b)
    assert not all(torch.equal(b, torch.zeros_like(b)) for _, b in weights(alone, "simpo").values())


def test_a_simpo_job_runs_no_reference_forward(llama, data, monkeypatch):
    """Only DPO's pairs go through the base alone: a cohort of a SimPO and an SFT job never runs that forward, one
    with a DPO job runs it every step, over the DPO job's rows only."""
    referenced = []
    original = Cohort._reference_logps
    monkeypatch.setattr(Cohort, "_reference_logps",
                        lambda self, batch: referenced.append(set(batch.rows)) or original(self, batch))
    _, history = run_simpo(llama, data, with_others=False)
    assert len(history["simpo"]) == 4 and referenced == []
    cohort = Cohort(llama)
    cohort.add_job("simpo", make_spec(llama, "simpo", max_steps=2), data["pairs"])
    cohort.add_job("dpo", make_spec(llama, "dpo", max_steps=2), data["pairs"])
    train_cohort(cohort)
    assert referenced == [{"dpo"}, {"dpo"}]


def test_the_methods_beta_defaults_and_a_simpo_job_on_sft_records_is_refused(llama, data):
    spec = lambda method, **hp: parse_spec({"base_model": "m", "dataset": "d", "method": method,  # noqa: E731
                                            "hyperparameters": hp}).hyperparameters
    assert (spec("simpo").beta, spec("simpo").simpo_gamma) == (2.0, 0.5)
    assert spec("dpo").beta == 0.1 and spec("sft").beta == 0.1  # as before beta's default depended on the method
    assert spec("simpo", beta=0.7, simpo_gamma=1.5).beta == 0.7
    assert parse_spec(parse_spec({"base_model": "m", "dataset": "d", "method": "simpo"}).model_dump()) == parse_spec(
        {"base_model": "m", "dataset": "d", "method": "simpo"})
    with pytest.raises(ValueError, match="method 'simpo' trains on preference pairs .* not alpaca"):
        Cohort(llama).add_job("a", make_spec(llama, "simpo"), data["alpaca"])
    with pytest.raises(SpecError, match="dataset_format: method 'simpo' trains on preference pairs"):
        parse_spec({"base_model": "m", "dataset": "d", "method": "simpo", "dataset_format": "text"})
    with pytest.raises(SpecError, match="hyperparameters.simpo_gamma: Input should be greater than or equal to 0"):
        parse_spec({"base_model": "m", "dataset": "d", "method": "simpo", "hyperparameters": {"simpo_gamma": -1}})
    with pytest.raises(SpecError, match="method: Input should be 'sft', 'dpo', 'simpo' or 'orpo'"):
        parse_spec({"base_model": "m", "dataset": "d", "method": "kto"})


def test_the_methods_are_listed_once_and_the_readme_table_names_each():
    assert list(METHODS) == list(get_args(Method))
    assert set(PREFERENCE_METHODS) == set(DEFAULT_BETA) and set(PREFERENCE_METHODS) < set(METHODS)
    table = README.read_text().split("| `method` |", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", table, re.M) == list(METHODS)
