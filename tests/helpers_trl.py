"""TRL's preference trainers run as a reference for lorafleet's: one PEFT model holding a job's initial LoRA weights,
fp32 on the CPU, the job's hyperparameters, every exact loss recorded (TRL logs them rounded)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def peft_model_holding(model_dir, spec, initial: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """A PEFT LoRA model of the base (lora_dropout 0, fp32, sdpa) whose factors are `initial` (layer -> (A, B))."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    config = LoraConfig(r=spec.adapter.r, lora_alpha=spec.adapter.lora_alpha, lora_dropout=0.0,
                        target_modules=list(spec.adapter.target_modules))
    model = get_peft_model(model, config)
    model.load_state_dict({f"base_model.model.{name}.lora_{f}.default.weight": t
                           for name, pair in initial.items() for f, t in zip("AB", pair)}, strict=False)
    return model


def trl_run(trainer_class, config_class, model_dir, spec, dataset, initial, output_dir, config=None, trainer=None):
    """`trainer_class` (TRL's DPOTrainer, CPOTrainer, ORPOTrainer, ...) trained as the job `spec` on the JSONL
    `dataset`, from `initial`; `config` and `trainer`: the method's own arguments of the config and the trainer.
    Returns its exact losses, the logged entries with rewards, the final LoRA weights and the tokenised dataset."""
    from datasets import Dataset

    hp = spec.hyperparameters
    model = peft_model_holding(model_dir, spec, initial)
    losses = []

    class Recording(trainer_class):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
            return loss

    args = config_class(
        output_dir=str(output_dir), per_device_train_batch_size=hp.batch_size, max_steps=hp.max_steps,
        learning_rate=hp.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=hp.weight_decay,
        adam_beta1=hp.adam_beta1, adam_beta2=hp.adam_beta2, adam_epsilon=hp.adam_epsilon, optim="adamw_torch",
        max_grad_norm=hp.max_grad_norm, beta=hp.beta, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, report_to="none", save_strategy="no", seed=hp.seed, dataloader_num_workers=0,
        dataset_num_proc=None, **(config or {}),
    )
    rows = [json.loads(line) for line in open(dataset)]
    run = Recording(model=model, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=AutoTokenizer.from_pretrained(model_dir), **(trainer or {}))
    run.train()
    logged = [entry for entry in run.state.log_history if "rewards/margins" in entry]
    state = model.state_dict()
    final = {name: tuple(state[f"base_model.model.{name}.lora_{f}.default.weight"] for f in "AB") for name in initial}
    return losses, logged, final, run.train_dataset


def assert_rewards_match(history, logged) -> None:
    """Each step's rewards (a StepResult's `rewards`) are the ones TRL logged for that step."""
    for result, entry in zip(history, logged):
        assert result.rewards.chosen == pytest.approx(entry["rewards/chosen"], rel=1e-4, abs=1e-6)
        assert result.rewards.rejected == pytest.approx(entry["rewards/rejected"], rel=1e-4, abs=1e-6)
        assert result.rewards.margin == pytest.approx(entry["rewards/margins"], rel=1e-4, abs=1e-6)
        assert result.rewards.accuracy == pytest.approx(entry["rewards/accuracies"])


def assert_weights_match(got, want, rel: float = 1e-4) -> None:
    """Every LoRA factor (layer -> (A, B)) within `rel` of TRL's, relative to its norm."""
    for name in want:
        for g, w in zip(got[name], want[name]):
            err = (g - w).norm() / w.norm()
            assert err <= rel, f"{name}: relative error {err:.2e}"
