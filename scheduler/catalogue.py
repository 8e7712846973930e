"""The models a tenant can name, as OpenAI's models API lists them (`GET /v1/models`, `GET /v1/models/{model}`): its
fine-tuned models (each SUCCEEDED job's `fine_tuned_model`, owned by the tenant) and the bases the operator offers
(owned by `BASE_OWNER`): the models of the local cache (`HF_HUB_CACHE`, listed by id) and the model directories
one or two levels under the model roots (`LORAFLEET_MODEL_ROOTS`: `<root>/name`, `<root>/org/name`; listed by path),
the names a job spec or a completion may give. A kept checkpoint's name (`<fine_tuned_model>:ckpt-step-N`) is not listed, as OpenAI does not list them, but it
can be retrieved. Another tenant's model is answered as one that does not exist (`generation.not_found`).

    catalogue = ModelCatalogue(Generations(store, config.hf_hub_cache(), config.model_roots()))
    catalogue.models(tenant)               # the tenant's fine-tuned models, newest first, then the bases by name
    catalogue.model(tenant, "ft:...")      # one of them; LookupError naming the model otherwise
    catalogue.job_to_delete(tenant, "ft:...")   # whose model `results.JobResults.delete_model` deletes
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.scheduler.generation import Generations, fine_tuned_model_name, not_found
from lorafleet.scheduler.records import JobRecord, JobState
from lorafleet.scheduler.spec import SpecError
from lorafleet.scheduler.store import MAX_LIST_LIMIT
from lorafleet.scheduler.submission import resolve_base_model

BASE_OWNER = "lorafleet"  # who owns a base, as OpenAI writes "openai" or "system" for its own models
_HUB_PREFIX = "models--"  # the cache's layout: models--<org>--<name>/snapshots/<revision>/


@dataclass(frozen=True)
class ModelEntry:
    """One model as OpenAI's model object shows it."""

    id: str
    created: int  # Unix seconds: a fine-tuned model's job end, a checkpoint's save, a base directory's last change
    owned_by: str  # the tenant for its own models, BASE_OWNER for the bases


class ModelCatalogue:
    def __init__(self, generations: Generations):
        self.generations = generations
        self.store = generations.store

    def models(self, tenant: str) -> list[ModelEntry]:
        """The tenant's fine-tuned models (newest first), then every base (by name)."""
        return self.fine_tuned(tenant) + self.bases()

    def fine_tuned(self, tenant: str) -> list[ModelEntry]:
        records = self.store.tenant_jobs_in(tenant, JobState.SUCCEEDED)
        return [_fine_tuned_entry(record) for record in records
                if record.adapter_uri and record.model_deleted_at is None]

    def bases(self) -> list[ModelEntry]:
        found: dict[str, ModelEntry] = {}
        for name in _cached_model_ids(self.generations.hub_cache):
            entry = self._base_entry(name)
            if entry is not None:
                found[name] = entry
        for root in self.generations.model_roots:
            for config_file in sorted([*Path(root).glob("*/config.json"), *Path(root).glob("*/*/config.json")]):
                entry = self._base_entry(str(config_file.parent))
                if entry is not None:
                    found[entry.id] = entry
        return [found[name] for name in sorted(found)]

    def model(self, tenant: str, model: str) -> ModelEntry:
        """`model` as the tenant may name it; LookupError (`generation.not_found`, or why it is not ready yet)."""
        if not isinstance(model, str) or not model:
            raise not_found(str(model))
        if model.startswith("ft:"):
            record, adapter_uri = self.generations.adapter_of(tenant, model)
            if model == fine_tuned_model_name(record):  # else a kept checkpoint's name
                return _fine_tuned_entry(record)
            return ModelEntry(id=model, created=self._saved_at(record, adapter_uri), owned_by=tenant)
        entry = self._base_entry(model)
        if entry is None:
            raise not_found(model)
        return entry

    def job_to_delete(self, tenant: str, model: str) -> str:
        """The job whose fine-tuned model `model` is, for deleting it: LookupError as `model`; ValueError for a
        checkpoint or a base, which are not deleted this way."""
        if not isinstance(model, str) or not model.startswith("ft:"):
            if isinstance(model, str) and self._base_entry(model) is not None:
                raise ValueError(f"model: {model!r} is a base model, the operator's: only your fine-tuned models can "
                                 "be deleted")
            raise not_found(str(model))
        record, _ = self.generations.adapter_of(tenant, model)
        if model != fine_tuned_model_name(record):
            raise ValueError(f"model: {model!r} is a checkpoint: it goes when its job's checkpoints rotate or the job "
                             "is purged; delete the fine-tuned model instead")
        return record.job_id

    def _base_entry(self, name: str) -> ModelEntry | None:
        """The base a job spec may name `name`, None when it names none (or a directory outside the model roots)."""
        try:
            directory = resolve_base_model(name, self.generations.hub_cache, None, self.generations.model_roots)
            if not (directory / "config.json").is_file():
                return None
            return ModelEntry(id=name, created=int(directory.stat().st_mtime), owned_by=BASE_OWNER)
        except (SpecError, OSError, ValueError):  # ValueError: a name no path can hold (a NUL byte)
            return None

    def _saved_at(self, record: JobRecord, checkpoint_uri: str) -> int:
        """When the job recorded the checkpoint (its `checkpoint` event, among its first MAX_LIST_LIMIT events), else
        when the job last changed."""
        for event in self.store.events(record.job_id, None, MAX_LIST_LIMIT):
            if event["type"] == "checkpoint" and event.get("checkpoint_uri") == checkpoint_uri:
                return int(event["ts"])
        return int(record.updated_at or 0)


def _fine_tuned_entry(record: JobRecord) -> ModelEntry:
    return ModelEntry(id=fine_tuned_model_name(record), created=int(record.finished_at or record.updated_at or 0),
                      owned_by=record.tenant)


def _cached_model_ids(hub_cache: Path) -> list[str]:
    """The model ids of the local cache's entries (`models--org--name` is `org/name`)."""
    if not Path(hub_cache).is_dir():
        return []
    return sorted(entry.name.removeprefix(_HUB_PREFIX).replace("--", "/")
                  for entry in Path(hub_cache).glob(_HUB_PREFIX + "*") if entry.is_dir())
