"""Evaluation samples (issue 18), the parts without a model running: the spec's `eval_samples` and
`eval_max_tokens` (bounds, refusals naming the field, through Celery's submit task and the OpenAI client's
`extra_body`), how a prompt is rendered for each dataset format, and how an `eval_samples` event is shown (the
gateway's event view, `lorafleet jobs events`)."""

from __future__ import annotations

import json

import openai
import pytest
from click.testing import CliRunner

from helpers_models import build_tokenizer
from lorafleet.scheduler import eval_samples
from lorafleet.scheduler.cli import main
from lorafleet.scheduler.eval_samples import EvalSample
from lorafleet.scheduler.formats import ALPACA_PROMPT_NO_INPUT, Tokenizing
from lorafleet.scheduler.spec import MAX_EVAL_PROMPT_CHARS, MAX_EVAL_SAMPLES, SpecError, parse_spec
from test_gateway import SMALL, client, create, gateway  # noqa: F401  (gateway: the fixture, a real gateway process)

PROMPTS = ["What is two plus two?", "Write a short poem about the sea."]


def spec_with(**fields) -> dict:
    return {"base_model": "/models/base", "dataset": "t/train.jsonl", **fields}


def test_eval_samples_are_kept_in_order_with_a_default_length():
    spec = parse_spec(spec_with(eval_samples=PROMPTS))
    assert spec.eval_samples == tuple(PROMPTS) and spec.eval_max_tokens == 64
    assert parse_spec(spec.model_dump()) == spec, "a stored spec parses back to the same job"
    assert parse_spec(spec_with()).eval_samples == (), "none unless asked for"


@pytest.mark.parametrize("fields, named", [
    ({"eval_samples": ["q"] * (MAX_EVAL_SAMPLES + 1)}, "eval_samples: Tuple should have at most 8 items"),
    ({"eval_samples": ["fine", "  "]}, "eval_samples: Value error, prompt 1: empty"),
    ({"eval_samples": ["x" * (MAX_EVAL_PROMPT_CHARS + 1)]}, f"prompt 0: {MAX_EVAL_PROMPT_CHARS + 1} characters"),
    ({"eval_samples": ["a\x00b"]}, "prompt 0: holds a NUL character"),
    ({"eval_samples": ["ok", "a\udcffb"]}, "prompt 1: not valid Unicode"),
    ({"eval_samples": "one prompt"}, "eval_samples: Input should be a valid tuple"),
    ({"eval_samples": [{"role": "user", "content": "hi"}]}, "eval_samples.0: Input should be a valid string"),
    ({"eval_max_tokens": 0}, "eval_max_tokens: Input should be greater than or equal to 1"),
    ({"eval_max_tokens": 513}, "eval_max_tokens: Input should be less than or equal to 512"),
    ({"eval_samples": PROMPTS, "adapter": {"type": "galore"}}, "eval_samples: not offered for adapter.type 'galore'"),
])
def test_a_bad_eval_samples_field_is_refused_naming_it(fields, named):
    with pytest.raises(SpecError, match="invalid job spec: .*" + named.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec_with(**fields))


def test_a_prompt_is_rendered_as_the_jobs_dataset_renders_a_prompt():
    tokenizer = build_tokenizer()
    tokenizing = Tokenizing(tokenizer)
    bos = [tokenizer.bos_token_id]
    text = "name a colour"

    def tokens(rendered: str) -> list[int]:
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    assert tokenizing.prompt("alpaca", text) == bos + tokens(ALPACA_PROMPT_NO_INPUT.format(instruction=text))
    assert tokenizing.prompt("text", text) == tokenizing.prompt("preference", text) == bos + tokens(text)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|assistant|>")
    assert tokenizing.prompt("chat", text) == tokenizing.prompt("chat_preference", text) == tokens(chat)
    tokenizer.chat_template = None
    assert Tokenizing(tokenizer).prompt("chat", text) == bos + tokens(f"User:\n{text}\n\nAssistant:\n")


def test_a_job_submitted_through_celery_keeps_its_eval_samples(call, make_tenant, base_model_dir):
    tenant = make_tenant()
    spec = spec_with(base_model=str(base_model_dir), dataset=tenant.dataset, eval_samples=PROMPTS, eval_max_tokens=9)
    job = call("lorafleet.submit_job", tenant.token, spec)
    stored = call("lorafleet.get_job", tenant.token, job["job_id"])["spec"]
    assert (stored["eval_samples"], stored["eval_max_tokens"]) == (PROMPTS, 9)


def test_a_prompt_longer_than_max_seq_len_is_refused_at_submission_naming_it(call, make_tenant, base_model_dir):
    tenant = make_tenant()
    spec = spec_with(base_model=str(base_model_dir), dataset=tenant.dataset, hyperparameters={"max_seq_len": 256},
                     eval_samples=["short", "the quick brown fox " * 60])
    with pytest.raises(ValueError, match=r"eval_samples\.1: \d+ tokens in the alpaca prompt format, more than "
                                         r"hyperparameters\.max_seq_len=256"):
        call("lorafleet.submit_job", tenant.token, spec)
    assert call("lorafleet.list_jobs", tenant.token) == [], "a refused submission leaves nothing behind"


def test_eval_samples_are_a_lorafleet_option_of_the_openai_create_call(gateway, make_tenant):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, "eval_samples": PROMPTS,
                                                                "eval_max_tokens": 16}})
    assert job.lorafleet["eval_samples"] == PROMPTS and job.lorafleet["eval_max_tokens"] == 16  # type: ignore
    for options, param in (({"eval_samples": [""]}, "lorafleet.eval_samples"),
                           ({"eval_max_tokens": 10_000}, "lorafleet.eval_max_tokens")):
        with pytest.raises(openai.BadRequestError) as refused:
            create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, "eval_samples": PROMPTS, **options}})
        assert refused.value.param == param, refused.value.body


def sample_event(store, job_id: str) -> None:
    samples = [EvalSample(PROMPTS[0], "four", "stop"), EvalSample(PROMPTS[1], "waves <b>and</b>\nsky", "length")]
    store.append_event(job_id, eval_samples.EVENT, **eval_samples.event_data(4, samples))
    store.append_event(job_id, eval_samples.EVENT, **eval_samples.event_data(8, error="out of memory"))


def test_an_eval_samples_event_shows_each_prompt_and_completion_in_the_openai_events(gateway, make_tenant, store):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset)
    sample_event(store, job.id)
    shown = [event for event in api.fine_tuning.jobs.list_events(job.id) if event.data["kind"] == "eval_samples"]
    assert [event.message for event in shown] == [
        f'Samples at step 4:\n"{PROMPTS[0]}" -> "four"\n"{PROMPTS[1]}" -> "waves <b>and</b>\\nsky"',
        "Samples at step 8 not made: out of memory"]
    assert [event.level for event in shown] == ["info", "warn"]
    assert shown[0].data["samples"][1] == {"prompt": PROMPTS[1], "completion": "waves <b>and</b>\nsky",
                                           "finish_reason": "length"}, "the structure is in the event's data"


def test_lorafleet_jobs_events_prints_the_samples_and_json_carries_them(worker_env, make_tenant, store, call,
                                                                         base_model_dir):
    tenant = make_tenant()
    job_id = call("lorafleet.submit_job", tenant.token, spec_with(base_model=str(base_model_dir),
                                                                   dataset=tenant.dataset))["job_id"]
    sample_event(store, job_id)
    runner = CliRunner()
    env = {**worker_env, "COLUMNS": "200"}
    table = runner.invoke(main, ["jobs", "events", job_id, "--token", tenant.token], env=env, catch_exceptions=False)
    assert table.exit_code == 0, table.stderr
    assert f'"{PROMPTS[0]}" -> "four"' in table.stdout and "Samples at step 8 not made: out of memory" in table.stdout
    raw = runner.invoke(main, ["jobs", "events", job_id, "--token", tenant.token, "--json"], env=env,
                        catch_exceptions=False)
    events = [event for event in json.loads(raw.stdout) if event["type"] == "eval_samples"]
    assert events[0]["step"] == 4 and events[0]["samples"][0] == {"prompt": PROMPTS[0], "completion": "four",
                                                                  "finish_reason": "stop"}
    assert events[1] == {**events[1], "step": 8, "error": "out of memory"}
