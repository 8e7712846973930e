"""Evaluation samples through the whole service on the CPU (issue 18): a job submitted through the Celery task with
`eval_samples` gets an `eval_samples` event at each checkpoint, and each completion is what PEFT greedily generates
from that checkpoint's adapter (the published one at the end). The fleet (real Redis, Celery worker, schedulers, two
executor processes) is test_fleet_e2e's."""

from __future__ import annotations

import pytest
import torch

from helpers_models import single_torch_thread  # noqa: F401
from lorafleet.scheduler.formats import Tokenizing
from lorafleet.scheduler.results import checkpoint_step
from test_fleet_e2e import fleet_env, make_tenant, spec_for  # noqa: F401  (the fleet fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("lorafleet.executor.generate")

PROMPTS = ["the quick brown fox", "write a short poem about the sea"]
MAX_TOKENS = 10


def peft_greedy(base, adapter, prompt_ids: list[int], eos: tuple[int, ...]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=eos[0])
    generated = out[0, len(prompt_ids):].tolist()
    return generated[:next((i for i, t in enumerate(generated) if t in eos), len(generated))]


def test_a_jobs_samples_at_each_checkpoint_are_what_peft_generates_from_that_checkpoint(fleet_env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.executor.serving import eos_token_ids

    tenant, token = make_tenant(fleet_env)
    spec = {**spec_for(fleet_env, tenant, max_steps=8, checkpoint_every=4), "eval_samples": PROMPTS,
            "eval_max_tokens": MAX_TOKENS}
    job_id = fleet_env.submit(token, spec)
    job = fleet_env.wait_state(token, job_id, ("succeeded", "failed"), timeout=240)
    assert job["state"] == "succeeded", (job["error"], fleet_env.logs())
    events = fleet_env.call("lorafleet.job_events", token, job_id, None, 1000)
    sampled = {event["step"]: event for event in events if event["type"] == "eval_samples"}
    assert sorted(sampled) == [4, 8], (sampled, fleet_env.logs())

    base = fleet_env.models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = eos_token_ids(tokenizer, AutoModelForCausalLM.from_pretrained(base))
    adapters = {4: next(uri for uri in job["checkpoints"] if checkpoint_step(uri) == 4), 8: job["adapter_uri"]}
    for step, adapter in adapters.items():
        samples = sampled[step]["samples"]
        assert [sample["prompt"] for sample in samples] == PROMPTS
        for sample in samples:
            want = peft_greedy(base, adapter, Tokenizing(tokenizer).prompt("alpaca", sample["prompt"]), eos)
            assert sample["completion"] == tokenizer.decode(want, skip_special_tokens=True), (step, sample)
            assert sample["finish_reason"] == ("length" if len(want) == MAX_TOKENS else "stop")
    ordered = [event["type"] for event in events if event["type"] in ("eval_samples", "checkpoint")]
    assert ordered[:2] == ["eval_samples", "checkpoint"], "a checkpoint's samples come before it is recorded"
