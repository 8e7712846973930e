"""`lorafleet.generate` through a real Celery worker on a real Valkey, called by task name as a tenant without
lorafleet installed calls it: its refusals arrive as built-in exceptions. (Answered by a real executor:
tests/test_generation_fleet.py.)"""

from __future__ import annotations

import pytest

from test_generation_store import trained_job
from lorafleet.scheduler.generation import fine_tuned_model_name


def test_another_tenants_model_is_a_lookup_error_like_one_that_does_not_exist(call, store, make_tenant,
                                                                             base_model_dir):
    owner, other = make_tenant(), make_tenant()
    name = fine_tuned_model_name(trained_job(store, owner.name, base_model_dir))
    with pytest.raises(LookupError, match="does not exist or you do not have access to it"):
        call("lorafleet.generate", other.token, {"model": name, "prompt": "hi"})


def test_a_bad_request_is_a_value_error_naming_the_field(call, make_tenant):
    tenant = make_tenant()
    with pytest.raises(ValueError, match="^max_tokens: "):
        call("lorafleet.generate", tenant.token, {"model": "test-org/tiny-model", "prompt": "hi", "max_tokens": 0})
    with pytest.raises(ValueError, match="^n: "):
        call("lorafleet.generate", tenant.token, {"model": "test-org/tiny-model", "prompt": "hi", "n": 9})


def test_a_request_no_executor_answers_is_a_timeout_error_naming_the_base(call, make_tenant):
    with pytest.raises(TimeoutError, match="no executor serving base 'test-org/tiny-model' answered within 0.5 s"):
        call("lorafleet.generate", make_tenant().token, {"model": "test-org/tiny-model", "prompt": "hi",
                                                         "timeout": 0.5})
