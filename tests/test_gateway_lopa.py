"""LoPA jobs through the HTTP gateway with the real `openai` client: `lorafleet.lopa` carries LoPA's options
(num_virtual_tokens, rank, head_size) to the spec, the job shows them back, and options that do not fit are refused
naming their field."""

from __future__ import annotations

import openai
import pytest
from test_gateway import client, create, gateway  # noqa: F401 (fixtures)

LOPA = {"adapter_type": "lopa", "lopa": {"num_virtual_tokens": 4, "rank": 2, "head_size": 32}, "max_seq_len": 256}


def test_a_lopa_job_keeps_the_options_it_was_created_with(gateway, make_tenant, store):  # noqa: F811
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset, extra_body={"lorafleet": LOPA})
    adapter = job.lorafleet["adapter"]  # type: ignore[attr-defined]
    assert adapter["type"] == "lopa" and adapter["lopa"] == LOPA["lopa"]
    assert api.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    assert store.job(job.id).spec.adapter.lopa.model_dump() == LOPA["lopa"], "the spec the executor trains"


def test_a_lopa_job_without_options_gets_the_defaults(gateway, make_tenant):  # noqa: F811
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset,
                 extra_body={"lorafleet": {"adapter_type": "lopa", "max_seq_len": 256,
                                           "lopa": {"rank": 3}}})
    assert job.lorafleet["adapter"]["lopa"] == {"num_virtual_tokens": 10, "rank": 3,  # type: ignore[attr-defined]
                                                "head_size": 256}


@pytest.mark.parametrize("options, param, message", [
    ({**LOPA, "lopa": {"num_virtual_tokens": 0}}, "lorafleet.lopa.num_virtual_tokens", "greater than or equal to 1"),
    ({**LOPA, "lopa": {"rank": 65}}, "lorafleet.lopa.rank", "less than or equal to 64"),
    ({**LOPA, "lopa": {"head_size": "wide"}}, "lorafleet.lopa.head_size", "valid integer"),
    ({**LOPA, "lopa": {"virtual_tokens": 4}}, "lorafleet.lopa.virtual_tokens", "Extra inputs are not permitted"),
    ({**LOPA, "adapter_type": "lora"}, "lorafleet.adapter_type", "'lopa' settings are only allowed with type 'lopa'"),
    ({**LOPA, "adapter_type": None}, "lorafleet.adapter_type", "'lopa' settings are only allowed with type 'lopa'"),
    ({**LOPA, "r": 8}, "lorafleet.adapter_type", "type 'lopa' adapts no layer of the base"),
])
def test_lopa_options_that_do_not_fit_are_refused_naming_the_field(gateway, make_tenant, options, param,  # noqa: F811
                                                                   message):
    tenant = make_tenant()
    with pytest.raises(openai.BadRequestError) as refused:
        create(client(gateway, tenant.token), tenant.dataset, extra_body={"lorafleet": options})
    assert refused.value.param == param, refused.value.body
    assert message in refused.value.message
