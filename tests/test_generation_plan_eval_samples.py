"""eval_samples are refused at submission where the generation engine cannot make them (issue 18), instead of an
error event at every checkpoint: on a base whose family the engine does not run (`spec.GENERATION_FAMILIES`, the one
list the engine reads too), through Celery's submit task (the CLI's and the Python client's path) and the gateway's
`extra_body.lorafleet.eval_samples` with the real openai client; the adapter types it does not run are refused by the
spec itself (tests/test_eval_samples_spec.py). Jobs on a base the engine runs, quantized ones included
(tests/test_generate_quantized.py), keep their eval_samples."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers_models import build_tiny_model
from lorafleet.executor.generate import Generator
from lorafleet.executor.multilora import RowRouting
from lorafleet.scheduler.spec import GENERATION_FAMILIES
from test_gateway import SMALL, client, create, gateway  # noqa: F401  (gateway: the fixture, a real gateway process)

PROMPTS = ["What is two plus two?"]
REFUSAL = (r"eval_samples: not offered on this base: its family 'gemma' is not one the generation engine runs "
           r"\(llama, mistral, qwen2, qwen3\)")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny Gemma (a family the engine does not run), under the operator's model roots (the session's temp dir)."""
    return build_tiny_model(tmp_path_factory.mktemp("gemma") / "gemma", "gemma")


def spec_on(base, tenant, **fields) -> dict:
    return {"base_model": str(base), "dataset": tenant.dataset, "hyperparameters": {"max_seq_len": 256},
            "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, **fields}


def test_the_engine_refuses_exactly_the_families_submission_refuses(gemma_dir, base_model_dir):
    """One list: the engine's refusal and submission's are the same fact (a Gemma base is refused by both, a Llama
    one by neither)."""
    assert AutoModelForCausalLM.from_pretrained(base_model_dir).config.model_type in GENERATION_FAMILIES
    gemma = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    assert gemma.config.model_type not in GENERATION_FAMILIES
    with pytest.raises(ValueError, match="generation supports the Llama-like decoders"):
        Generator(gemma, RowRouting())


def test_eval_samples_on_a_base_the_engine_does_not_run_are_refused_through_celery(call, make_tenant, gemma_dir,
                                                                                   base_model_dir):
    tenant = make_tenant()
    with pytest.raises(ValueError, match="invalid job spec: " + REFUSAL):
        call("lorafleet.submit_job", tenant.token, spec_on(gemma_dir, tenant, eval_samples=PROMPTS))
    assert call("lorafleet.list_jobs", tenant.token) == [], "a refused submission leaves nothing behind"
    trains = call("lorafleet.submit_job", tenant.token, spec_on(gemma_dir, tenant))
    assert trains["state"] == "queued", "the same job without eval_samples is accepted"
    sampled = call("lorafleet.submit_job", tenant.token, spec_on(base_model_dir, tenant, eval_samples=PROMPTS,
                                                                 quantization="nf4"))
    assert sampled["spec"]["eval_samples"] == PROMPTS, "a Llama base, quantized too, keeps its eval_samples"


def test_eval_samples_on_a_base_the_engine_does_not_run_are_refused_by_the_gateway_naming_the_param(
        gateway, make_tenant, gemma_dir):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    with pytest.raises(openai.BadRequestError) as refused:
        api.fine_tuning.jobs.create(model=str(gemma_dir), training_file=tenant.dataset,
                                    extra_body={"lorafleet": {**SMALL, "eval_samples": PROMPTS}})
    assert refused.value.param == "lorafleet.eval_samples", refused.value.body
    assert "its family 'gemma' is not one the generation engine runs" in refused.value.message
    job = api.fine_tuning.jobs.create(model=str(gemma_dir), training_file=tenant.dataset,
                                      extra_body={"lorafleet": SMALL})
    assert job.status == "queued"


@pytest.mark.parametrize("adapter, kind", [({"adapter_type": "lopa"}, "lopa"), ({"adapter_type": "galore"}, "galore")])
def test_eval_samples_of_an_adapter_type_the_engine_does_not_run_name_the_param(gateway, make_tenant, adapter, kind):
    """The spec's own refusal (a check across fields) reaches the gateway naming lorafleet.eval_samples."""
    tenant = make_tenant()
    options = {"max_seq_len": 256, **adapter, "eval_samples": PROMPTS}
    with pytest.raises(openai.BadRequestError) as refused:
        create(client(gateway, tenant.token), tenant.dataset, extra_body={"lorafleet": options})
    assert refused.value.param == "lorafleet.eval_samples", refused.value.body
    assert f"eval_samples: not offered for adapter.type '{kind}'" in refused.value.message
