"""The completion routes' refusals, as a tenant meets them: a real gateway process on a real Valkey, the real
`openai` client. (Answers by a real executor: tests/test_generation_fleet.py.)"""

from __future__ import annotations

import openai
import pytest

from test_gateway import client, gateway  # noqa: F401  (gateway: the fixture)
from test_generation_store import trained_job
from lorafleet.scheduler.generation import fine_tuned_model_name


def test_another_tenants_model_is_not_found_like_a_model_that_does_not_exist(gateway, store, make_tenant,
                                                                            base_model_dir):
    owner, other = make_tenant(), make_tenant()
    name = fine_tuned_model_name(trained_job(store, owner.name, base_model_dir))
    api = client(gateway, other.token)
    with pytest.raises(openai.NotFoundError) as foreign:
        api.completions.create(model=name, prompt="hi", max_tokens=4)
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="ft:tiny:nobody:bot:job-0123456789abcdef",
                                    messages=[{"role": "user", "content": "hi"}])
    for refused in (foreign.value, unknown.value):
        assert refused.code == "model_not_found" and refused.param == "model"
        assert "does not exist or you do not have access to it" in refused.message
    assert name in foreign.value.message and owner.name in name


@pytest.mark.parametrize("fields, param, words", [
    ({"n": 9}, "n", "less than or equal to 8"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
    ({"echo": True}, "echo", "not supported"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids are not supported"),
    ({"prompt": []}, "prompt", "a list of strings"),
    ({"prompt": ["hi"] * 9}, "prompt", "at most 8 prompts"),
    ({"prompt": ["hi", "there"], "stream": True}, "prompt", "unstreamed only"),
])
def test_a_completion_request_the_server_cannot_honour_is_refused_naming_the_field(gateway, make_tenant, fields,
                                                                                  param, words):
    api = client(gateway, make_tenant().token)
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model="test-org/tiny-model", **{"prompt": "hi", **fields})
    assert refused.value.param == param and words in refused.value.message


def test_a_chat_request_with_a_bad_message_is_refused_naming_the_message(gateway, make_tenant):
    api = client(gateway, make_tenant().token)
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="test-org/tiny-model", messages=[
            {"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert refused.value.param == "messages.1.tool_call_id"
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="test-org/tiny-model", messages=[{"role": ["user"], "content": "hi"}])
    assert refused.value.param == "messages.0.role"


def test_a_request_no_executor_answers_ends_in_time_naming_the_base(gateway, make_tenant):
    api = client(gateway, make_tenant().token)
    with pytest.raises(openai.APIStatusError) as silent:
        api.completions.create(model="test-org/tiny-model", prompt="hi", max_tokens=2,
                               extra_body={"lorafleet": {"timeout": 0.5}})
    assert silent.value.status_code == 504
    assert "no executor serving base 'test-org/tiny-model' answered within 0.5 s" in silent.value.message
