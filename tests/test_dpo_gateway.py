"""DPO jobs through the HTTP gateway with the real `openai` client: OpenAI's `method: {"type": "dpo", "dpo":
{"hyperparameters": {"beta"}}}`, refusals naming the field, and (slow) a DPO job trained to the end by a real fleet
with its rewards in the metrics events."""

from __future__ import annotations

import openai
import pytest
from helpers_models import write_jsonl
from helpers_polling import wait_until
from test_dpo import CHAT_PAIRS, PAIRS
from test_gateway import SMALL, client, create, fleet, gateway  # noqa: F401 (fixtures)


def dpo_method(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_a_dpo_job_created_with_the_openai_client_keeps_its_beta(gateway, make_tenant):  # noqa: F811
    tenant = make_tenant()
    write_jsonl(tenant.area / "pairs.jsonl", CHAT_PAIRS)
    api = client(gateway, tenant.token)
    job = create(api, f"{tenant.name}/pairs.jsonl",
                 method=dpo_method(beta=0.25, n_epochs=2, batch_size=2, learning_rate_multiplier=0.5))
    assert job.method.type == "dpo" and job.method.supervised is None
    hp = job.method.dpo.hyperparameters
    assert (hp.beta, hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (0.25, 2, 2, 0.5)
    assert api.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    default = create(api, f"{tenant.name}/pairs.jsonl", method={"type": "dpo"})
    assert default.method.dpo.hyperparameters.beta == 0.1, "auto beta: the spec's default"


@pytest.mark.parametrize("method, dataset, param, message", [
    ({"type": "reinforcement"}, "pairs", "method.type", "supervised' or 'dpo'"),
    (dpo_method(), "train", "training_file", "method 'dpo' trains on preference pairs"),
    ({"type": "supervised"}, "pairs", "training_file", "preference records are preference pairs: set method 'dpo'"),
    ({"type": "dpo", "supervised": {}}, "pairs", "method.supervised", "settings for supervised in a dpo job"),
    (dpo_method(beta=-1), "pairs", "method.dpo.hyperparameters.beta", "greater than 0"),
])
def test_a_method_that_does_not_fit_is_refused_naming_its_field(gateway, make_tenant,  # noqa: F811
                                                                method, dataset, param, message):
    tenant = make_tenant()
    write_jsonl(tenant.area / "pairs.jsonl", PAIRS)
    with pytest.raises(openai.BadRequestError) as refused:
        create(client(gateway, tenant.token), f"{tenant.name}/{dataset}.jsonl", method=method)
    assert refused.value.param == param, refused.value.body
    assert message in refused.value.message


@pytest.mark.slow
def test_a_dpo_job_created_over_http_trains_to_the_end_reporting_its_rewards(fleet):  # noqa: F811
    _, token = fleet.store.create_tenant("dpo-e2e")
    api = client(fleet.url, token)
    with open(write_jsonl(fleet.root / "dpo-pairs.jsonl", PAIRS * 2), "rb") as source:
        training_file = api.files.create(file=source, purpose="fine-tune")
    job = api.fine_tuning.jobs.create(
        model=str(fleet.model), training_file=training_file.id, seed=3,
        method=dpo_method(beta=0.2, batch_size=4, learning_rate_multiplier=100),
        extra_body={"lorafleet": {**SMALL, "max_steps": 4}})
    done = wait_until(lambda: (found := api.fine_tuning.jobs.retrieve(job.id)).status in (
        "succeeded", "failed", "cancelled") and found, "the job to finish", timeout=240, details=fleet.logs)
    assert done.status == "succeeded", (done.error, fleet.logs())
    metrics = [event.data for event in api.fine_tuning.jobs.list_events(job.id, limit=100).data
               if event.type == "metrics"]
    assert sorted(data["step"] for data in metrics) == [1, 2, 3, 4]
    first, last = min(metrics, key=lambda data: data["step"]), max(metrics, key=lambda data: data["step"])
    assert first["reward_margin"] == 0.0 and first["loss"] == pytest.approx(0.6931, abs=1e-4)  # B = 0: the base
    assert last["reward_margin"] > 0 and last["reward_accuracy"] > 0.5 and last["loss"] < first["loss"]
    assert last["reward_margin"] == pytest.approx(last["rewards_chosen"] - last["rewards_rejected"])
