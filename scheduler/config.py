"""Deployment configuration, read from the environment at call time (so tests and `lorafleet up` can set it).

| variable | default | meaning |
|---|---|---|
| `REDIS_URL` | the URL in `<state dir>/redis/redis.url` written by `lorafleet redis` / `lorafleet up` | Redis for jobs, tenants and Celery |
| `LORAFLEET_STATE_DIR` | `./.lorafleet` | embedded Redis data, its URL file |
| `LORAFLEET_DATA_ROOT` | `<state dir>/data` | datasets: `<root>/<tenant>/...` and `<root>/shared/...` |
| `LORAFLEET_ARTIFACT_DIR` | `<state dir>/artifacts` | adapters and checkpoints written by executors |
| `LORAFLEET_ARTIFACT_URI` | the artifact dir | any fsspec URI (e.g. `s3://bucket/lorafleet`) instead of a local directory |
| `LORAFLEET_MODEL_ROOTS` | `<state dir>/models` | directories (separated by `:`) that local `base_model` paths must be inside |
| `LORAFLEET_DATASET_DIR` | `<state dir>/datasets` | accepted datasets, content-addressed (operator-only; every executor must see it) |
| `LORAFLEET_MAX_RECORD_BYTES` | 1 MiB | longest dataset line accepted |
| `LORAFLEET_MAX_DATASET_BYTES` | 1 GiB | largest dataset file accepted |
| `LORAFLEET_MAX_RECORDS` | 5,000,000 | most records (non-blank lines) in one dataset file |
| `LORAFLEET_FILE_QUOTA_BYTES` | 10 GiB | bytes of uploaded files one tenant may keep (`files.FileStore`; one file is capped by `LORAFLEET_MAX_DATASET_BYTES`) |
| `LORAFLEET_FILE_QUOTA_COUNT` | 100 | uploaded files one tenant may keep |
| `LORAFLEET_MAX_GENERATIONS_PER_TENANT` | 32 | generation requests (completions, streams) one tenant may have in progress in the whole service, all gateways together (`generation_slots`: slots in Redis); more get 429. Give every gateway the same value |
| `LORAFLEET_JOB_RETENTION_DAYS` | 30 | finished jobs older than this are expired by the scheduler, with their artifacts; 0 keeps them for ever |
| `LORAFLEET_KEEP_CHECKPOINTS` | 2 | checkpoints kept per job (older ones are deleted when a newer one is recorded) |
| `HF_HUB_CACHE` | `$HF_HOME/hub` or `~/.cache/huggingface/hub` | local model cache searched for base model ids |
"""

from __future__ import annotations

import os
from pathlib import Path


class ConfigError(RuntimeError):
    """The deployment is not configured well enough to go on; the message says what to set."""


def state_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_STATE_DIR", ".lorafleet")).absolute()


def data_root() -> Path:
    return Path(os.environ.get("LORAFLEET_DATA_ROOT") or state_dir() / "data").absolute()


def artifact_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_ARTIFACT_DIR") or state_dir() / "artifacts").absolute()


def artifact_root() -> str:
    """Where executors publish checkpoints and adapters: an fsspec URI or a local directory."""
    return os.environ.get("LORAFLEET_ARTIFACT_URI") or str(artifact_dir())


def dataset_store() -> Path:
    return Path(os.environ.get("LORAFLEET_DATASET_DIR") or state_dir() / "datasets").absolute()


def job_retention_seconds() -> float | None:
    """How long finished jobs are kept (None: for ever)."""
    raw = os.environ.get("LORAFLEET_JOB_RETENTION_DAYS", "30")
    try:
        days = float(raw)
    except ValueError:
        raise ConfigError(f"LORAFLEET_JOB_RETENTION_DAYS: not a number of days: {raw!r}") from None
    if days < 0:
        raise ConfigError(f"LORAFLEET_JOB_RETENTION_DAYS: must be >= 0, got {raw!r}")
    return days * 86400 if days else None


def keep_checkpoints() -> int:
    raw = os.environ.get("LORAFLEET_KEEP_CHECKPOINTS", "2")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"LORAFLEET_KEEP_CHECKPOINTS: must be a whole number >= 1, got {raw!r}")
    return int(raw)


def _whole_number(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    if not raw.isdigit():
        raise ConfigError(f"{name}: must be a whole number, got {raw!r}")
    return int(raw)


def file_quota_bytes() -> int:
    return _whole_number("LORAFLEET_FILE_QUOTA_BYTES", 10 << 30)


def file_quota_count() -> int:
    return _whole_number("LORAFLEET_FILE_QUOTA_COUNT", 100)


def max_generations_per_tenant() -> int:
    """The cap on one tenant's generation requests in progress at once in the service, which every gateway checks
    against the slots in Redis (its other tenants' stay served)."""
    limit = _whole_number("LORAFLEET_MAX_GENERATIONS_PER_TENANT", 32)
    if limit < 1:
        raise ConfigError(f"LORAFLEET_MAX_GENERATIONS_PER_TENANT: must be >= 1, got {limit}")
    return limit


def embedded_redis_dir() -> Path:
    return state_dir() / "redis"


def redis_url_file() -> Path:
    return embedded_redis_dir() / "redis.url"


def model_roots() -> list[Path]:
    raw = os.environ.get("LORAFLEET_MODEL_ROOTS")
    if raw:
        return [Path(part).absolute() for part in raw.split(os.pathsep) if part]
    return [state_dir() / "models"]


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home) / "hub"


def redis_url() -> str:
    """REDIS_URL, else the URL of the embedded Redis started by `lorafleet redis` or `lorafleet up`."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    url_file = redis_url_file()
    if url_file.is_file():
        return url_file.read_text().strip()
    raise ConfigError(f"no Redis configured: set REDIS_URL or start one with `lorafleet redis` (looked for {url_file})")
