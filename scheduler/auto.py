"""`"auto"` hyperparameters: the values chosen for a job whose spec leaves `epochs`, `batch_size` or `learning_rate`
to us, decided once at submission from the dataset and the memory model and stored in the job's spec (so the job
shows what it trains with, and the executor reads concrete values only).

    epochs         about DEFAULT_EPOCHS passes, more for a small dataset (so it sees at least MIN_EXAMPLES records
                   in all) and fewer for a large one (at most MAX_EXAMPLES), within 1..MAX_EPOCHS
    batch_size     the largest power of two whose step holds about STEP_TOKENS tokens of this dataset, that leaves
                   at least MIN_STEPS_PER_EPOCH steps per epoch, and whose memory (`memory.estimate_job_bytes`, in the
                   widest dtype the job may compute in) stays within JOB_BYTES_BUDGET
    learning_rate  a base per adapter type (`base_learning_rate`); the gateway multiplies it by the tenant's
                   `learning_rate_multiplier`

Pure: no Redis, no files. `take_auto` takes the "auto" values out of a raw spec so the strict `JobSpec` can parse
the rest; `resolve` puts the chosen values back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from lorafleet.scheduler.memory import (
    ModelShape,
    estimate_activation_bytes,
    estimate_job_bytes,
    possible_dtypes,
    size_lopa_job,
)
from lorafleet.scheduler.spec import JobSpec, SpecError

AUTO = "auto"
AUTO_FIELDS = ("epochs", "batch_size", "learning_rate")  # hyperparameters that may be "auto"

DEFAULT_EPOCHS = 3
MAX_EPOCHS = 25
MIN_EXAMPLES = 100  # records a small dataset is shown in all (epochs x records)
MAX_EXAMPLES = 25_000  # records a large dataset is shown in all, at most
STEP_TOKENS = 8192  # tokens a step aims at
MIN_STEPS_PER_EPOCH = 8
MAX_BATCH_SIZE = 64
JOB_BYTES_BUDGET = 8 << 30  # what one auto-sized job may add to a cohort: several fit next to an 8B base on 80 GB

# Learning rates that train each adapter type well at the default rank (LoRA's usual 2e-4; NOLA trains only the
# mixing coefficients of fixed random bases, which take larger steps).
# VeRA trains only scaling vectors: its paper's instruction-tuning runs use rates about 20x LoRA's (4e-3)
# GaLore trains the base's own weights (a full fine-tune): its paper's fine-tuning rates are about 1e-5.
# LoPA trains a soft prompt and its generator, at prompt tuning's higher rates (the authors' scripts: 1e-3)
_BASE_LEARNING_RATE = {"lora": 2e-4, "nola": 1e-3, "vera": 4e-3, "galore": 1e-5, "lopa": 1e-3}


@dataclass(frozen=True)
class DatasetSample:
    """What submission learned of the training dataset."""

    records: int  # non-blank records in the whole file
    sample_records: int  # records read to count tokens (the first ones)
    sample_tokens: int  # their tokens at the job's max_seq_len


def base_learning_rate(adapter_type: str) -> float:
    """The learning rate of `learning_rate_multiplier` 1 for an adapter type."""
    try:
        return _BASE_LEARNING_RATE[adapter_type]
    except KeyError:
        raise SpecError(f"invalid job spec: adapter.type: no learning-rate base for {adapter_type!r}") from None


def auto_epochs(records: int) -> int:
    """Passes over a dataset of `records` records."""
    if records < 1:
        raise ValueError(f"records must be >= 1, got {records}")
    if records * DEFAULT_EPOCHS < MIN_EXAMPLES:
        return min(MAX_EPOCHS, math.ceil(MIN_EXAMPLES / records))
    if records * DEFAULT_EPOCHS > MAX_EXAMPLES:
        return max(1, MAX_EXAMPLES // records)
    return DEFAULT_EPOCHS


def auto_batch_size(spec: JobSpec, shape: ModelShape, sample: DatasetSample,
                    bytes_budget: int = JOB_BYTES_BUDGET) -> int:
    """Sequences per micro-batch for `spec` on a base of `shape` (see the module's rule). Always >= 1: a job whose
    batch of one exceeds the budget is still sized 1 and left to the scheduler's own check."""
    mean_tokens = max(1.0, sample.sample_tokens / max(1, sample.sample_records))
    wanted = min(MAX_BATCH_SIZE, max(1, int(STEP_TOKENS / mean_tokens)),
                 max(1, sample.records // MIN_STEPS_PER_EPOCH))
    size = 1 << (wanted.bit_length() - 1)  # the power of two at or below
    while size > 1 and _job_bytes(spec, shape, size) > bytes_budget:
        size //= 2
    return size


def _job_bytes(spec: JobSpec, shape: ModelShape, batch_size: int) -> int:
    if spec.adapter.type == "galore":  # alone on its executor: of its bytes only the activations grow with the batch
        return max(estimate_activation_bytes(shape, batch_size, spec.hyperparameters.max_seq_len, dtype)
                   for dtype in possible_dtypes(spec.dtype))
    if spec.adapter.type == "lopa":
        lopa = spec.adapter.lopa
        return max(size_lopa_job(shape, lopa.num_virtual_tokens, lopa.rank, lopa.head_size, batch_size,
                                 spec.hyperparameters.max_seq_len, spec.quantization, dtype).job_bytes
                   for dtype in possible_dtypes(spec.dtype))
    return max(estimate_job_bytes(shape, spec.adapter.r, spec.adapter.target_modules, batch_size,
                                  spec.hyperparameters.max_seq_len, dtype, spec.adapter.use_dora,
                                  spec.adapter.target_parameters)
               for dtype in possible_dtypes(spec.dtype))


def take_auto(raw: Mapping[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """A copy of the raw spec without its "auto" hyperparameters (so the spec's defaults stand in while it is
    validated), and the names of those taken out."""
    hyperparameters = raw.get("hyperparameters")
    if not isinstance(hyperparameters, Mapping):
        return dict(raw), frozenset()
    taken = frozenset(name for name in AUTO_FIELDS if hyperparameters.get(name) == AUTO)
    if not taken:
        return dict(raw), taken
    kept = {name: value for name, value in hyperparameters.items() if name not in taken}
    return {**raw, "hyperparameters": kept}, taken


def resolve(spec: JobSpec, auto_fields: frozenset[str], shape: ModelShape, sample: DatasetSample) -> JobSpec:
    """`spec` with each of `auto_fields` set to its chosen value (validated again: the result is a strict spec)."""
    if not auto_fields:
        return spec
    chosen: dict[str, Any] = {}
    if "epochs" in auto_fields:
        chosen["epochs"] = auto_epochs(sample.records)
    if "batch_size" in auto_fields:
        chosen["batch_size"] = auto_batch_size(spec, shape, sample)
    if "learning_rate" in auto_fields:
        chosen["learning_rate"] = base_learning_rate(spec.adapter.type)
    raw = spec.model_dump()
    raw["hyperparameters"].update(chosen)
    return JobSpec.model_validate(raw)
