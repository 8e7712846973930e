"""lorafleet's own training options through the HTTP gateway with the real `openai` client: SimPO and ORPO asked for
as `lorafleet.method` beside OpenAI's `method.type` "dpo" (OpenAI's API has no type for them), and `target_modules`
given as PEFT's bare string "all-linear" or as a list."""

from __future__ import annotations

import openai
import pytest
from helpers_models import write_jsonl
from test_dpo import PAIRS
from test_dpo_gateway import dpo_method
from test_gateway import SMALL, client, create, gateway  # noqa: F401 (fixtures)


def test_all_linear_is_accepted_as_a_bare_string_as_peft_writes_it_or_in_a_list(gateway, make_tenant):  # noqa: F811
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    for target_modules in ("all-linear", ["all-linear"]):
        job = create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, "target_modules": target_modules}})
        assert job.lorafleet["adapter"]["target_modules"] == ["all-linear"]  # type: ignore[attr-defined]
        assert api.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    with pytest.raises(openai.BadRequestError) as refused:
        create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, "target_modules": "q_proj"}})
    assert refused.value.param == "lorafleet.target_modules", refused.value.body
    assert "a single string must be 'all-linear'; give module names as a list, e.g. ['q_proj']" in refused.value.message


def test_simpo_and_orpo_jobs_are_a_dpo_method_with_a_lorafleet_method(gateway, make_tenant):  # noqa: F811
    tenant = make_tenant()
    write_jsonl(tenant.area / "pairs.jsonl", PAIRS)
    api = client(gateway, tenant.token)
    simpo = {**SMALL, "method": "simpo", "simpo_gamma": 0.8}
    job = create(api, f"{tenant.name}/pairs.jsonl", method=dpo_method(batch_size=2), extra_body={"lorafleet": simpo})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 2.0, "auto beta: SimPO's default"
    assert (job.lorafleet["method"], job.lorafleet["simpo_gamma"]) == ("simpo", 0.8)  # type: ignore[attr-defined]
    assert api.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    tuned = create(api, f"{tenant.name}/pairs.jsonl", method=dpo_method(beta=1.5), extra_body={"lorafleet": simpo})
    assert tuned.method.dpo.hyperparameters.beta == 1.5
    dpo = create(api, f"{tenant.name}/pairs.jsonl", method=dpo_method())
    assert dpo.lorafleet["method"] == "dpo" and "simpo_gamma" not in dpo.lorafleet  # type: ignore[attr-defined]
    assert dpo.method.dpo.hyperparameters.beta == 0.1
    orpo = create(api, f"{tenant.name}/pairs.jsonl", method=dpo_method(),
                  extra_body={"lorafleet": {**SMALL, "method": "orpo"}})
    assert orpo.lorafleet["method"] == "orpo"  # type: ignore[attr-defined]
    assert orpo.method.dpo.hyperparameters.beta == 0.1, "auto beta: ORPO's default"


@pytest.mark.parametrize("method, options, dataset, param, message", [
    ({"type": "supervised"}, {"method": "simpo"}, "pairs", "lorafleet.method",
     "'simpo' trains on preference pairs: give it with method.type 'dpo'"),
    (None, {"method": "simpo"}, "pairs", "lorafleet.method", "give it with method.type 'dpo'"),
    (dpo_method(), {"method": "kto"}, "pairs", "lorafleet.method", "'kto' is not one of 'simpo', 'orpo'"),
    (dpo_method(), {"method": "dpo"}, "pairs", "lorafleet.method", "supervised and dpo are OpenAI's method.type"),
    (dpo_method(), {"method": "simpo", "simpo_gamma": -1}, "pairs", "lorafleet.simpo_gamma",
     "greater than or equal to 0"),
    (dpo_method(), {"method": "simpo"}, "train", "training_file", "method 'simpo' trains on preference pairs"),
])
def test_a_lorafleet_method_that_does_not_fit_is_refused_naming_its_field(gateway, make_tenant,  # noqa: F811
                                                                          method, options, dataset, param, message):
    tenant = make_tenant()
    write_jsonl(tenant.area / "pairs.jsonl", PAIRS)
    fields = {"extra_body": {"lorafleet": {**SMALL, **options}}} | ({"method": method} if method else {})
    with pytest.raises(openai.BadRequestError) as refused:
        create(client(gateway, tenant.token), f"{tenant.name}/{dataset}.jsonl", **fields)
    assert refused.value.param == param, refused.value.body
    assert message in refused.value.message


def test_target_parameters_reach_the_submission_check_and_a_refusal_names_the_field(gateway, make_tenant):  # noqa: F811
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    with pytest.raises(openai.BadRequestError) as refused:  # the gateway's test base is a dense Llama
        create(api, tenant.dataset,
               extra_body={"lorafleet": {**SMALL, "target_parameters": ["mlp.experts.gate_up_proj"]}})
    assert refused.value.param == "lorafleet.target_parameters", refused.value.body
    assert "this base has no expert parameters" in refused.value.message


GALORE = {"adapter_type": "galore", "galore": {"rank": 8, "update_proj_gap": 50}, "max_seq_len": 256,
          "target_modules": ["q_proj", "v_proj"]}


def test_a_galore_job_is_created_through_the_openai_client_and_its_result_is_a_model(gateway, make_tenant):  # noqa: F811
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset, extra_body={"lorafleet": GALORE})
    adapter = job.lorafleet["adapter"]  # type: ignore[attr-defined]
    assert adapter["type"] == "galore" and adapter["galore"] == {"rank": 8, "update_proj_gap": 50, "scale": 0.25,
                                                                 "proj_type": "std"}
    assert job.lorafleet["result"] == "model", "a full fine-tune publishes a whole model"  # type: ignore[attr-defined]
    assert job.hyperparameters.learning_rate_multiplier == 1.0  # of GaLore's own base rate (auto)
    assert api.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    lora = create(api, tenant.dataset)
    assert lora.lorafleet["result"] == "adapter"  # type: ignore[attr-defined]


@pytest.mark.parametrize("options, param, message", [
    ({**GALORE, "galore": {"rank": 0}}, "lorafleet.galore.rank", "greater than or equal to 1"),
    ({**GALORE, "galore": {"ranks": 8}}, "lorafleet.galore.ranks", "Extra inputs are not permitted"),
    ({**GALORE, "r": 8}, "lorafleet.adapter_type", "type 'galore' trains the base's own weights, with no adapter"),
    ({**GALORE, "adapter_type": "lora"}, "lorafleet.adapter_type", "'galore' settings are only allowed with type 'galore'"),
])
def test_galore_options_that_do_not_fit_are_refused_naming_the_field(gateway, make_tenant, options, param,  # noqa: F811
                                                                     message):
    tenant = make_tenant()
    with pytest.raises(openai.BadRequestError) as refused:
        create(client(gateway, tenant.token), tenant.dataset, extra_body={"lorafleet": options})
    assert refused.value.param == param, refused.value.body
    assert message in refused.value.message
