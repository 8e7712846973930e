"""Generation through the whole service on the CPU: the e2e fleet (real Valkey, Celery worker, schedulers, two
executor processes) and a real `lorafleet gateway` process, called with the real `openai` client and by Celery task
name. A tiny Llama trains a job to success; its fine-tuned model, a checkpoint and the bare bases then answer as PEFT's
(or Hugging Face's) greedy `generate` does locally on the same weights."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from helpers_polling import wait_until
from lorafleet.scheduler.generation import Generations, Sampling, fine_tuned_model_name
from lorafleet.scheduler.redis_server import free_port
from lorafleet.scheduler import fleet
from test_fleet_e2e import fleet_env, make_tenant, metric_value, scrape, spec_for  # noqa: F401  (fleet_env: fixture)

pytestmark = pytest.mark.slow

PROMPT = "the quick brown fox"
CHAT = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "write a short poem"}]


@pytest.fixture(scope="module")
def gateway(fleet_env) -> str:
    port = free_port()
    process = fleet_env.start("gateway", "gateway", "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited:\n{fleet_env.logs()}")
        try:
            return urllib.request.urlopen(url + "/openapi.json", timeout=1).status == 200
        except OSError:
            return False

    wait_until(up, "the gateway to answer", timeout=60)
    return url


@pytest.fixture(scope="module")
def trained(fleet_env) -> dict:
    """A job trained to success (12 steps) with two kept checkpoints (steps 4 and 8), and its tenant's token."""
    tenant, token = make_tenant(fleet_env)
    job_id = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=12, checkpoint_every=4))
    job = fleet_env.wait_state(token, job_id, ("succeeded", "failed"))
    assert job["state"] == "succeeded", (job["error"], fleet_env.logs())
    return {"job": job, "token": token, "tenant": tenant}


def api(gateway: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=token, max_retries=0, timeout=120)


def local_greedy(model_dir: Path, adapter_dir: str | None, prompt_ids: list[int], max_new_tokens: int
                 ) -> tuple[list[int], bool]:
    """Greedy tokens of PEFT's (or, with no adapter, Hugging Face's) `generate` here, and whether it stopped at EOS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    new = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    stopped = eos in new
    return (new[:new.index(eos)] if stopped else new), stopped


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def expected_completion(model_dir: Path, adapter_dir: str | None, prompt_ids: list[int], max_tokens: int
                        ) -> tuple[str, str, int]:
    tokens, stopped = local_greedy(model_dir, adapter_dir, prompt_ids, max_tokens)
    text = tokenizer_of(model_dir).decode(tokens, skip_special_tokens=True)
    return text, "stop" if stopped else "length", len(tokens)


def fine_tuned_model(gateway: str, trained: dict) -> str:
    name = api(gateway, trained["token"]).fine_tuning.jobs.retrieve(trained["job"]["job_id"]).fine_tuned_model
    assert name and name.endswith(trained["job"]["job_id"])
    return name


def test_a_fine_tuned_model_completes_as_peft_generates_with_its_adapter(fleet_env, gateway, trained):
    llama = fleet_env.models["llama"]
    prompt_ids = tokenizer_of(llama)(PROMPT)["input_ids"]
    text, reason, generated = expected_completion(llama, trained["job"]["adapter_uri"], prompt_ids, 8)
    answer = api(gateway, trained["token"]).completions.create(
        model=fine_tuned_model(gateway, trained), prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.created > 0
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == reason
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt_ids), generated)
    assert answer.usage.total_tokens == len(prompt_ids) + generated
    base_text, _, _ = expected_completion(llama, None, prompt_ids, 8)
    assert text != base_text, "the adapter changes the answer (else this test could not tell adapter from base)"


def test_a_list_of_prompts_answers_each_prompt_as_alone_indexed_prompt_by_prompt(fleet_env, gateway, trained):
    """OpenAI's list prompt: prompt i's choice j at index i·n + j, usage summed over the prompts."""
    llama = fleet_env.models["llama"]
    prompts = [PROMPT, "once upon a time"]
    ids = [tokenizer_of(llama)(prompt)["input_ids"] for prompt in prompts]
    expected = [expected_completion(llama, trained["job"]["adapter_uri"], prompt_ids, 6) for prompt_ids in ids]
    assert expected[0][0] != expected[1][0], "the prompts' answers differ (else the order could not be told)"
    answer = api(gateway, trained["token"]).completions.create(
        model=fine_tuned_model(gateway, trained), prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    assert [choice.text for choice in answer.choices] == [expected[0][0]] * 2 + [expected[1][0]] * 2
    assert answer.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert answer.usage.completion_tokens == 2 * (expected[0][2] + expected[1][2])


def test_a_chat_completion_renders_the_bases_chat_template(fleet_env, gateway, trained):
    llama = fleet_env.models["llama"]
    prompt_ids = tokenizer_of(llama).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]
    text, reason, generated = expected_completion(llama, trained["job"]["adapter_uri"], prompt_ids, 6)
    answer = api(gateway, trained["token"]).chat.completions.create(
        model=fine_tuned_model(gateway, trained), messages=CHAT, max_completion_tokens=6, temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == reason and answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == generated


def test_the_celery_task_answers_as_the_gateway_does(fleet_env, gateway, trained):
    model = fine_tuned_model(gateway, trained)
    by_gateway = api(gateway, trained["token"]).completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                                                   temperature=0)
    by_celery = fleet_env.call("lorafleet.generate", trained["token"],
                               {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert by_celery["text"] == by_gateway.choices[0].text and by_celery["model"] == model
    assert by_celery["usage"] == by_gateway.usage.model_dump(exclude_none=True) and by_celery["id"].startswith("gen-")


def test_a_checkpoint_model_completes_with_that_checkpoints_adapter(fleet_env, gateway, trained):
    llama = fleet_env.models["llama"]
    checkpoint = next(uri for uri in trained["job"]["checkpoints"] if "/checkpoint-4-" in uri)
    prompt_ids = tokenizer_of(llama)(PROMPT)["input_ids"]
    text, _, _ = expected_completion(llama, checkpoint, prompt_ids, 8)
    answer = api(gateway, trained["token"]).completions.create(
        model=fine_tuned_model(gateway, trained) + ":ckpt-step-4", prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == text


def test_a_base_no_executor_has_loaded_is_loaded_by_an_idle_one_and_answers(fleet_env, gateway, trained):
    qwen2 = fleet_env.models["qwen2"]
    prompt_ids = tokenizer_of(qwen2)(PROMPT)["input_ids"]
    text, reason, _ = expected_completion(qwen2, None, prompt_ids, 5)
    answer = api(gateway, trained["token"]).completions.create(
        model=str(qwen2), prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"lorafleet": {"timeout": 120}})
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == reason


def test_a_stop_string_cuts_the_text_before_it(fleet_env, gateway, trained):
    model = fine_tuned_model(gateway, trained)
    full = api(gateway, trained["token"]).completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    text = full.choices[0].text
    stop = text.strip()[len(text.strip()) // 2:][:2] if len(text.strip()) >= 2 else None
    if stop is None:
        pytest.skip(f"the greedy answer {text!r} is too short to cut")
    cut = api(gateway, trained["token"]).completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                            stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_in_a_batch_fail_alone(fleet_env, trained):
    """Three requests taken together: one whose prompt does not fit the base's context, one whose adapter is gone
    from the artifact store; the third is answered."""
    generations = Generations(fleet_env.store, Path(fleet_env.env["HF_HUB_CACHE"]),
                              [Path(fleet_env.env["LORAFLEET_MODEL_ROOTS"])])
    job, tenant = trained["job"], trained["tenant"]
    gone = next(uri for uri in job["checkpoints"] if "/checkpoint-8-" in uri)
    moved = Path(gone).with_name("moved-away")
    shutil.move(gone, moved)
    try:
        name = fine_tuned_model_name(fleet_env.store.job(job["job_id"]))
        requests = [
            generations.submit(tenant, name, prompt="fox " * 1100, sampling=Sampling(max_tokens=4, temperature=0)),
            generations.submit(tenant, name + ":ckpt-step-8", prompt=PROMPT, sampling=Sampling(max_tokens=4)),
            generations.submit(tenant, name, prompt=PROMPT, sampling=Sampling(max_tokens=4, temperature=0)),
        ]
        too_long, no_adapter, fine = (generations.wait_result(request) for request in requests)
    finally:
        shutil.move(moved, gone)
    assert too_long.error and "than the base's context of 1024 tokens" in too_long.error
    assert no_adapter.error and "adapter could not be loaded" in no_adapter.error
    assert fine.error is None and fine.completion_tokens >= 1

    def counted() -> tuple[float, float]:
        """(failed requests, generated tokens) the executors' metrics count; they count after answering."""
        text = "".join(scrape(beat.metrics_port) for beat in fleet.executors(fleet_env.store.r)[0])
        failed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("lorafleet_generation_requests_total{") and 'outcome="failed"' in line)
        return failed, metric_value(text, "lorafleet_generation_tokens_total")

    def counted_both() -> bool:
        failed, tokens = counted()  # one scrape per poll: both numbers from the same reading
        return failed >= 2 and tokens >= fine.completion_tokens

    wait_until(counted_both, "the executors to count the requests that failed alone and the tokens generated",
               timeout=15, details=lambda: f"(failed, tokens) = {counted()}")



def test_a_deleted_model_answers_404_and_its_checkpoint_still_completes(fleet_env, gateway, trained):
    """Last in this file: it deletes the shared job's fine-tuned model. A model an executor has answered with is
    refused at the gateway once deleted; its kept checkpoint is still served by the executor."""
    client, model = api(gateway, trained["token"]), fine_tuned_model(gateway, trained)
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0).choices
    assert model in [listed.id for listed in client.models.list()]
    assert client.models.delete(model).deleted
    with pytest.raises(openai.NotFoundError) as gone:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert "was deleted" in gone.value.message
    assert not Path(trained["job"]["adapter_uri"]).exists()
    assert model not in [listed.id for listed in client.models.list()]
    assert client.completions.create(model=model + ":ckpt-step-4", prompt=PROMPT, max_tokens=2,
                                     temperature=0).choices
