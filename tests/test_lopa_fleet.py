"""A LoPA job (issue 18) through the whole service on the CPU: submitted through the Celery task beside a LoRA job of
the same base, trained by an executor process to the end with checkpoints and validation, and published as its own
export (lopa_config.json + lopa_model.safetensors) that `load_lopa` loads on a plain Hugging Face base and that the
service's generation serves. The fleet
(real Redis, Celery worker, schedulers, two executors) is test_fleet_e2e's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_models import single_torch_thread  # noqa: F401
from lorafleet.scheduler.generation import fine_tuned_model_name
from test_fleet_e2e import fleet_env, make_tenant, spec_for  # noqa: F401  (the fleet fixture)
from test_generate_lopa import reference_greedy
from test_generation_fleet import PROMPT, tokenizer_of

pytestmark = pytest.mark.slow


def test_a_lopa_job_beside_a_lora_job_trains_to_the_end_and_publishes_its_export_which_is_served(fleet_env):
    from transformers import AutoModelForCausalLM

    from lorafleet.executor.lopa import LOPA_CONFIG, LOPA_WEIGHTS, load_lopa, lopa_logits

    tenant, token = make_tenant(fleet_env)
    spec = spec_for(fleet_env, tenant, max_steps=6, checkpoint_every=3, learning_rate=1e-2)
    spec["adapter"] = {"type": "lopa", "lopa": {"num_virtual_tokens": 4, "rank": 2, "head_size": 16}}
    spec["validation_dataset"] = f"{tenant}/train.jsonl"
    lopa_id = fleet_env.submit(token, spec)
    lora_id = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=6))  # the same base: one cohort
    lopa = fleet_env.wait_state(token, lopa_id, ("succeeded", "failed"), timeout=240)
    lora = fleet_env.wait_state(token, lora_id, ("succeeded", "failed"), timeout=240)
    assert (lopa["state"], lora["state"]) == ("succeeded", "succeeded"), (lopa["error"], lora["error"],
                                                                          fleet_env.logs())
    assert lopa["progress"] == {"step": 6, "total_steps": 6}
    assert 0 < lopa["metrics"]["eval_loss"] < 20, "the final step reports the validation loss"
    assert lopa["metrics"]["trained_tokens"] > 0
    assert lopa["checkpoint_uri"] and (Path(lopa["checkpoint_uri"]) / "training_state.pt").is_file()

    published = Path(lopa["adapter_uri"])
    assert {path.name for path in published.iterdir()} == {LOPA_CONFIG, LOPA_WEIGHTS}
    prompt = load_lopa(published)
    base = AutoModelForCausalLM.from_pretrained(fleet_env.models["llama"], dtype=torch.float32)
    ids = [1, 5, 9, 12, 40, 41]
    logits = lopa_logits(base, prompt, ids, 3)
    with torch.no_grad():
        bare = base(torch.tensor([ids])).logits[0]
    assert torch.isfinite(logits).all() and logits.shape == bare.shape
    assert not torch.allclose(logits, bare, atol=1e-4), "the trained prompt moves the logits"

    # its fine-tuned model answers completions: the executor places the prompt's soft prompt before it
    name = fine_tuned_model_name(fleet_env.store.job(lopa_id))
    base_dir = fleet_env.models["llama"]
    prompt_ids = tokenizer_of(base_dir)(PROMPT)["input_ids"]
    want = reference_greedy(base_dir, published, tuple(prompt_ids), 6)
    answer = fleet_env.call("lorafleet.generate", token, {"model": name, "prompt": PROMPT, "max_tokens": 6,
                                                          "temperature": 0, "timeout": 25})
    assert answer["text"] == tokenizer_of(base_dir).decode(want, skip_special_tokens=True)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids), "the soft prompt's positions are not prompt tokens"


def test_a_killed_lopa_job_resumes_on_another_executor_with_the_weights_of_an_uninterrupted_run(fleet_env):
    from safetensors.torch import load_file

    from lorafleet.executor.cohort import Cohort
    from lorafleet.executor.lopa import LOPA_WEIGHTS
    from lorafleet.scheduler.spec import parse_spec

    tenant, token = make_tenant(fleet_env)
    spec = spec_for(fleet_env, tenant, max_steps=40, checkpoint_every=5, learning_rate=1e-2)
    spec["adapter"] = {"type": "lopa", "lopa": {"num_virtual_tokens": 4, "rank": 2, "head_size": 16}}
    job_id = fleet_env.submit(token, spec)
    victim = fleet_env.kill_holder_after_a_checkpoint(token, job_id)
    try:
        done = fleet_env.wait_state(token, job_id, ("succeeded", "failed"), timeout=240)
    finally:
        fleet_env.start_executor(victim)  # back to two executors for the tests after this one
    assert done["state"] == "succeeded", done["error"]
    assert done["attempt"] == 2 and done["executor_id"] != victim

    reference = Cohort(fleet_env.models["llama"])
    reference.add_job("job", parse_spec(spec), fleet_env.root / "data" / tenant / "train.jsonl")
    while reference.active_jobs():
        reference.step()
    want = reference.jobs["job"].adapter.prompt.state_dict()
    got = load_file(str(Path(done["adapter_uri"]) / LOPA_WEIGHTS))
    assert got.keys() == want.keys()
    for name, tensor in got.items():  # the executor's threads may sum in another order than this process's one
        rel = (tensor - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
