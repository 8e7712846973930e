"""Checks a submission against this deployment: the spec itself, the tenant's data areas and the local models.

Base models are never downloaded: `base_model` must be a local directory or an id already in the local Hugging Face
cache (`HF_HUB_CACHE`, layout `models--<org>--<name>/snapshots/<revision>/`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lorafleet.scheduler.datasets import AcceptedDataset, accept
from lorafleet.scheduler.spec import JobSpec, SpecError, is_inside, parse_spec, resolve_dataset

_REVISION_RE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def resolve_base_model(
    base_model: str, hub_cache: Path, revision: Optional[str] = None, model_roots: Sequence[Path] = ()
) -> Path:
    """The local directory holding `base_model`; SpecError if it is neither a directory nor in the cache.

    A local path must resolve inside one of `model_roots` (when given), checked before existence so a tenant cannot
    probe the server's file system with it.
    """
    if base_model.startswith(("/", ".", "~")) or base_model.startswith("file://"):
        path = Path(base_model.removeprefix("file://")).expanduser()
        if model_roots:
            resolved = path.resolve()
            roots = [Path(root).resolve() for root in model_roots]
            if not is_inside(resolved, roots):
                raise SpecError(
                    f"invalid job spec: base_model: {base_model!r} is not under the operator's model roots "
                    "(LORAFLEET_MODEL_ROOTS); use a path there, or an id in the local model cache"
                )
        if not path.is_dir():
            raise SpecError(f"invalid job spec: base_model: no such local directory {base_model!r}")
        return path
    if not _MODEL_ID_RE.fullmatch(base_model) or ".." in base_model:
        raise SpecError(f"invalid job spec: base_model: {base_model!r} is neither a local path nor a model id")
    snapshots = Path(hub_cache) / ("models--" + base_model.replace("/", "--")) / "snapshots"
    candidates = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    if revision is not None:
        if not _REVISION_RE.fullmatch(revision):
            raise SpecError(f"invalid job spec: base_model_revision: {revision!r} is not a branch, tag or commit name")
        ref = snapshots.parent / "refs" / revision
        wanted = ref.read_text().strip() if ref.is_file() else revision
        candidates = [p for p in candidates if p.name == wanted]
    if not candidates:
        raise SpecError(
            f"invalid job spec: base_model: {base_model!r}"
            + (f" at revision {revision!r}" if revision else "")
            + " is not in the local model cache (models are never downloaded; ask the operator)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def validate_submission(
    raw: object, tenant: str, data_root: Path, hub_cache: Path, model_roots: Sequence[Path] = ()
) -> JobSpec:
    """parse_spec, then check the datasets and the base model exist where this tenant may read them."""
    spec = parse_spec(raw)
    resolve_dataset(spec.dataset, data_root, tenant, field="dataset")
    if spec.validation_dataset is not None:
        resolve_dataset(spec.validation_dataset, data_root, tenant, field="validation_dataset")
    resolve_base_model(spec.base_model, hub_cache, spec.base_model_revision, model_roots)
    return spec


@dataclass(frozen=True)
class Submission:
    spec: JobSpec
    datasets: dict[str, AcceptedDataset]  # spec field ("dataset", "validation_dataset") -> its accepted copy


def accept_submission(
    raw: object, tenant: str, data_root: Path, hub_cache: Path, model_roots: Sequence[Path], dataset_store: Path
) -> Submission:
    """validate_submission, then copy each dataset into the dataset store: the job trains on those bytes only."""
    spec = validate_submission(raw, tenant, data_root, hub_cache, model_roots)
    root = Path(data_root).resolve()
    areas = [root / tenant, root / "shared"]
    datasets = {}
    for field in ("dataset", "validation_dataset"):
        uri = getattr(spec, field)
        if uri is not None:
            datasets[field] = accept(uri, resolve_dataset(uri, data_root, tenant, field), areas, dataset_store, field)
    return Submission(spec, datasets)
