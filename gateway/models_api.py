"""`/v1/models`: OpenAI's models API on `scheduler.catalogue` — what `client.models.list()` and `.retrieve()` show a
tenant: its fine-tuned models and the bases it may train on or generate with; `.delete()` removes a fine-tuned model
(`results.JobResults.delete_model`). A base's id may hold slashes (an
`org/name` cache id, a path under the model roots): the `openai` client sends them escaped (`%2F`), which the
route's path parameter takes as they are.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from lorafleet.gateway.app import ERROR_RESPONSES, State, Tenant
from lorafleet.gateway.errors import ApiError
from lorafleet.gateway.models import Model, ModelDeleted, ModelList
from lorafleet.scheduler import config
from lorafleet.scheduler.catalogue import ModelCatalogue, ModelEntry
from lorafleet.scheduler.generation import Generations


def model_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

    @router.get("", response_model=ModelList)
    def list_models(tenant: Tenant, request: Request) -> ModelList:
        """Your fine-tuned models (a succeeded job's `fine_tuned_model`), newest first, then the bases (`owned_by`
        lorafleet) by name."""
        return ModelList(data=[_view(entry) for entry in _catalogue(request).models(tenant)])

    @router.get("/{model:path}", response_model=Model)
    def retrieve_model(model: str, tenant: Tenant, request: Request) -> Model:
        """One model: a fine-tuned model of yours, one of its kept checkpoints (`<model>:ckpt-step-N`) or a base;
        404 for any other name (another tenant's model included)."""
        try:
            return _view(_catalogue(request).model(tenant, model))
        except LookupError as exc:
            raise ApiError(404, str(exc).removeprefix("model: "), param="model", code="model_not_found") from None

    @router.delete("/{model:path}", response_model=ModelDeleted)
    def delete_model(model: str, tenant: Tenant, gateway: State, request: Request) -> ModelDeleted:
        """Delete one of your fine-tuned models: its adapter and result file go, and the name answers 404 from then
        on; the job, its events and its kept checkpoints stay. A checkpoint or a base is not deleted (400)."""
        try:
            job_id = _catalogue(request).job_to_delete(tenant, model)
            gateway.results.delete_model(tenant, job_id)
        except LookupError as exc:
            raise ApiError(404, str(exc).removeprefix("model: "), param="model", code="model_not_found") from None
        except ValueError as exc:
            raise ApiError(400, str(exc).removeprefix("model: "), param="model", code="invalid_value") from None
        return ModelDeleted(id=model, deleted=True)

    return router


def _view(entry: ModelEntry) -> Model:
    return Model(id=entry.id, created=entry.created, owned_by=entry.owned_by)


def _catalogue(request: Request) -> ModelCatalogue:
    """One per gateway, on its store (made on first use)."""
    state = request.app.state
    if getattr(state, "catalogue", None) is None:
        generations = Generations(state.gateway.store, config.hf_hub_cache(), config.model_roots())
        state.catalogue = ModelCatalogue(generations)
    return state.catalogue
