"""Checks a submission against this deployment: the spec itself, the tenant's data areas and the local models.

Base models are never downloaded: `base_model` must be a local directory or an id already in the local Hugging Face
cache (`HF_HUB_CACHE`, layout `models--<org>--<name>/snapshots/<revision>/`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from lorafleet.scheduler.spec import JobSpec, SpecError, parse_spec, resolve_dataset

_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def resolve_base_model(base_model: str, hub_cache: Path, revision: Optional[str] = None) -> Path:
    """The local directory holding `base_model`; SpecError if it is neither a directory nor in the cache."""
    if base_model.startswith(("/", ".", "~")) or base_model.startswith("file://"):
        path = Path(base_model.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise SpecError(f"invalid job spec: base_model: no such local directory {base_model!r}")
        return path
    if not _MODEL_ID_RE.fullmatch(base_model) or ".." in base_model:
        raise SpecError(f"invalid job spec: base_model: {base_model!r} is neither a local path nor a model id")
    snapshots = Path(hub_cache) / ("models--" + base_model.replace("/", "--")) / "snapshots"
    candidates = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    if revision is not None:
        ref = snapshots.parent / "refs" / revision
        wanted = ref.read_text().strip() if ref.is_file() else revision
        candidates = [p for p in candidates if p.name == wanted]
    if not candidates:
        raise SpecError(
            f"invalid job spec: base_model: {base_model!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" is not in the local model cache {hub_cache} (models are never downloaded; ask the operator)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def validate_submission(raw: object, tenant: str, data_root: Path, hub_cache: Path) -> JobSpec:
    """parse_spec, then check the datasets and the base model exist where this tenant may read them."""
    spec = parse_spec(raw)
    resolve_dataset(spec.dataset, data_root, tenant, field="dataset")
    if spec.validation_dataset is not None:
        resolve_dataset(spec.validation_dataset, data_root, tenant, field="validation_dataset")
    resolve_base_model(spec.base_model, hub_cache, spec.base_model_revision)
    return spec
