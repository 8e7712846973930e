"""Checks a submission against this deployment: the spec itself, the tenant's data areas and the local models.

Base models are never downloaded: `base_model` must be a local directory or an id already in the local Hugging Face
cache (`HF_HUB_CACHE`, layout `models--<org>--<name>/snapshots/<revision>/`).

Each accepted dataset is then read as the executor will read it (`formats`, with the base model's own tokenizer,
at the job's `max_seq_len`), up to `SAMPLE_RECORDS` records: a bad record there is refused naming its line, and a
dataset with no target token in them (every prompt longer than `max_seq_len`, say) is refused naming the cause.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lorafleet.scheduler import auto
from lorafleet.scheduler.base_modules import (
    expert_parameter_suffixes,
    expert_parameters,
    linear_widths,
    name_matches,
    weight_shapes,
)
from lorafleet.scheduler.datasets import AcceptedDataset, accept, accepted_path
from lorafleet.scheduler.files import FileStore, accepted_file, is_file_id
from lorafleet.scheduler.memory import (
    JobPlan,
    ModelShape,
    micro_batch_sequences,
    plan_galore_job,
    plan_job,
    plan_lopa_job,
)
from lorafleet.scheduler.formats import IGNORE_INDEX, DataError, Tokenizing, detect_format, parse_record, tokenise_record
from lorafleet.scheduler.spec import (
    ALL_LINEAR, GENERATION_FAMILIES, JobSpec, SpecError, check_method_format, is_inside, parse_spec, resolve_dataset,
    spec_object,
)

SAMPLE_RECORDS = 2000  # records of each dataset read and counted at submission
BYTES_PER_TOKEN_GUESS = 4  # dataset bytes per token, to size a job submitted without a token count

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


@dataclass(frozen=True)
class Submission:
    spec: JobSpec
    datasets: dict[str, AcceptedDataset]  # spec field ("dataset", "validation_dataset") -> its accepted copy
    target_tokens: dict[str, int]  # spec field -> target tokens in its first SAMPLE_RECORDS records, at max_seq_len
    plan: JobPlan  # its size for the memory model, with the base snapshot pinned


@functools.lru_cache(maxsize=256)
def model_shape(model_dir: str) -> ModelShape:
    """The memory model's view of a base: its config's sizes and its linear layers by name, from its safetensors
    headers (`base_modules`; a base without safetensors files keeps Llama's names). SpecError when it cannot be read."""
    try:
        shape = ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
        shapes = weight_shapes(Path(model_dir))
        widths = linear_widths(shapes)
        experts = tuple((key, e * (d_in + d_out)) for key, (e, d_in, d_out) in expert_parameters(shapes).items())
        shape = dataclasses.replace(shape, expert_parameters=experts)
        return dataclasses.replace(shape, modules=tuple(sorted(widths.items()))) if widths else shape
    except (OSError, ValueError) as exc:
        raise SpecError(f"invalid job spec: base_model: the memory model cannot size this base: {exc}") from None


def compat_key(base_snapshot: str, quantization: str, dtype: str) -> str:
    """The cohort key of a base as loaded: jobs (and generation requests) of one key share an executor's base."""
    return "|".join((base_snapshot, quantization, dtype))


def plan_for(spec: JobSpec, model_dir: Path, dataset_tokens: int) -> JobPlan:
    """The job's size, decided once: `model_dir` (resolved) is the pinned base snapshot; `dataset_tokens` the tokens
    of one epoch of its dataset, used when it has no `max_steps`."""
    hp = spec.hyperparameters
    snapshot = str(Path(model_dir).resolve())
    if hp.max_steps is not None:
        sequences = micro_batch_sequences(spec.method, hp.batch_size)
        tokens = hp.max_steps * hp.gradient_accumulation_steps * sequences * hp.max_seq_len
    else:
        tokens = hp.epochs * min(dataset_tokens, 10**12)
    if spec.adapter.type == "galore":
        return _plan_galore(spec, snapshot, tokens)
    if spec.adapter.type == "lopa":  # its prompt rows are not in `tokens`: the run's are its data's
        lopa = spec.adapter.lopa
        return plan_lopa_job(compat_key(snapshot, spec.quantization, spec.dtype), snapshot, model_shape(snapshot),
                             lopa.num_virtual_tokens, lopa.rank, lopa.head_size, hp.batch_size, hp.max_seq_len,
                             spec.quantization, spec.dtype, tokens)
    return plan_job(compat_key(snapshot, spec.quantization, spec.dtype), snapshot, model_shape(snapshot),
                    spec.adapter.r, spec.adapter.target_modules, hp.batch_size, hp.max_seq_len, spec.quantization,
                    spec.dtype, tokens, dora=spec.adapter.use_dora, target_parameters=spec.adapter.target_parameters,
                    method=spec.method)


def _plan_galore(spec: JobSpec, snapshot: str, tokens: int) -> JobPlan:
    """A GaLore job trains its own copy of the base: it never shares a cohort, so its compatibility key is its own
    (a fresh id, decided once with the rest of the plan)."""
    galore, hp = spec.adapter.galore, spec.hyperparameters
    key = "|".join((f"galore-{uuid.uuid4().hex}", snapshot, spec.dtype))
    try:
        return plan_galore_job(key, snapshot, model_shape(snapshot), galore.rank, galore.proj_type,
                               spec.adapter.target_modules, hp.batch_size, hp.max_seq_len, spec.dtype, tokens)
    except ValueError as exc:
        raise SpecError(f"invalid job spec: adapter.type 'galore': {exc}") from None


def plan_from_files(spec: JobSpec, tenant: str, data_root: Path, hub_cache: Path, model_roots: Sequence[Path]
                    ) -> JobPlan:
    """`plan_for` a job stored without a plan (schema version 1, operator tools): its base resolved now, its tokens
    guessed from the dataset's size."""
    model_dir = resolve_base_model(spec.base_model, hub_cache, spec.base_model_revision, model_roots)
    size = resolve_dataset(spec.dataset, data_root, tenant).stat().st_size
    return plan_for(spec, model_dir, size // BYTES_PER_TOKEN_GUESS + 1)


@functools.lru_cache(maxsize=8)
def tokenizing_for(model_dir: str) -> Tokenizing:
    """The base model's own tokenizer, as the executor loads it (transformers, local files only; no torch)."""
    from transformers import AutoTokenizer

    try:
        return Tokenizing(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    except (OSError, ValueError, TypeError) as exc:
        raise SpecError(f"invalid job spec: base_model: its tokenizer cannot be used: {exc}") from None


@dataclass(frozen=True)
class SampleCount:
    records: int  # records read (at most SAMPLE_RECORDS)
    tokens: int  # their tokens at max_seq_len (`formats.tokenise_record`: prompt and target)
    targets: int  # of them, target tokens (the ones the loss is taken on)


def count_targets(path: Path, uri: str, field: str, fmt: str, tokenizing: Tokenizing, max_seq_len: int
                  ) -> SampleCount:
    """Tokens in the first SAMPLE_RECORDS records of `path`; SpecError naming the line of a bad record, or the cause
    when there is no target token."""
    targets = records = tokens = 0
    with open(path, "rb") as source:
        for line_number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, first_line=line_number == 1)
                fmt = detect_format(record) if fmt == "auto" else fmt
                _, labels = tokenise_record(tokenizing, fmt, record, max_seq_len)
            except DataError as exc:
                raise SpecError(f"invalid job spec: {field}: {uri!r} line {line_number}: {exc}") from None
            targets += sum(1 for label in labels if label != IGNORE_INDEX)
            tokens += len(labels)
            records += 1
            if records == SAMPLE_RECORDS:
                break
    if targets == 0:
        checked = f"in its first {records} records" if records == SAMPLE_RECORDS else "in any record"
        raise SpecError(f"invalid job spec: {field}: {uri!r} has no target token within max_seq_len={max_seq_len} "
                        f"{checked}: every prompt is longer than that (shorten them or raise max_seq_len)")
    return SampleCount(records, tokens, targets)


def _check_eval_prompts(spec: JobSpec, tokenizing: Tokenizing, fmt: str) -> None:
    """Each of eval_samples, rendered as the job's records render a prompt, fits in max_seq_len: the longest sequence
    its adapter trains on."""
    fmt = fmt or spec.dataset_format  # '' only for datasets accepted before formats were recorded
    max_seq_len = spec.hyperparameters.max_seq_len
    for number, text in enumerate(spec.eval_samples):
        try:
            tokens = len(tokenizing.prompt(fmt, text))
        except DataError as exc:
            raise SpecError(f"invalid job spec: eval_samples.{number}: {exc}") from None
        if tokens > max_seq_len:
            raise SpecError(f"invalid job spec: eval_samples.{number}: {tokens} tokens in the {fmt} prompt format, "
                            f"more than hyperparameters.max_seq_len={max_seq_len}")


def _check_eval_base(spec: JobSpec, shape: ModelShape) -> None:
    """eval_samples only on a base the generation engine runs: elsewhere every checkpoint would write an error event
    instead of samples, so the job is refused at once, naming the field and the base's family."""
    if spec.eval_samples and shape.family not in GENERATION_FAMILIES:
        raise SpecError(f"invalid job spec: eval_samples: not offered on this base: its family "
                        f"{shape.family or 'unknown'!r} is not one the generation engine runs "
                        f"({', '.join(GENERATION_FAMILIES)}); leave eval_samples out")


def _check_target_modules(spec: JobSpec, shape: ModelShape) -> None:
    """Refuse target modules that name no linear layer of the base (the memory model could not size them either)."""
    if spec.adapter.type == "lopa":  # adapts no layer: its target_modules are the unused default
        return
    known = shape.module_widths()
    unknown = [name for name in spec.adapter.target_modules if name not in known and name != ALL_LINEAR]
    if unknown:
        raise SpecError(f"invalid job spec: adapter.target_modules: this base has no linear layer named "
                        f"{', '.join(unknown)}; its linear layers are {', '.join(sorted(known))} (or \"{ALL_LINEAR}\")")


def _check_target_parameters(spec: JobSpec, shape: ModelShape) -> None:
    """Refuse target parameters that name no fused expert parameter of the base (PEFT's matching rule)."""
    keys = [key for key, _ in shape.expert_parameters]
    unknown = [t for t in spec.adapter.target_parameters if not any(name_matches(key, t) for key in keys)]
    if not unknown:
        return
    if not keys:
        raise SpecError(f"invalid job spec: adapter.target_parameters: this base has no expert parameters "
                        f"(target_parameters adapts a MoE base's fused experts, e.g. Qwen2-MoE's or Mixtral's)")
    raise SpecError(f"invalid job spec: adapter.target_parameters: this base has no expert parameter named "
                    f"{', '.join(unknown)}; its 3-D expert parameters are "
                    f"{', '.join(expert_parameter_suffixes(keys))}")


_sample_counts: OrderedDict[tuple[str, str, str, int], SampleCount] = OrderedDict()
_REMEMBERED_COUNTS = 4096


def sample_count(dataset_store: Path, accepted: AcceptedDataset, field: str, fmt: str, model_dir: str,
                 max_seq_len: int) -> SampleCount:
    """`count_targets` of an accepted copy, remembered by what decides it: the copy's bytes (its digest), the
    format, the base snapshot (whose tokenizer `tokenizing_for` also keeps) and max_seq_len. A refusal is not
    remembered: the next submission reads the records again and names the same line."""
    key = (accepted.sha256, fmt, model_dir, max_seq_len)
    count = _sample_counts.get(key)
    if count is None:
        count = count_targets(accepted_path(dataset_store, accepted.sha256), accepted.uri, field, fmt,
                              tokenizing_for(model_dir), max_seq_len)
        _sample_counts[key] = count
        if len(_sample_counts) > _REMEMBERED_COUNTS:
            _sample_counts.popitem(last=False)
    return count


def _check_format(spec: JobSpec, accepted: AcceptedDataset, field: str) -> None:
    """An explicit dataset_format other than the format every record of the dataset is in would fail them all; so
    would records the job's method does not train on."""
    wanted = spec.dataset_format
    if wanted != "auto" and accepted.format and accepted.format != wanted:
        raise SpecError(f"invalid job spec: dataset_format: {wanted!r}, but {field} {accepted.uri!r} holds "
                        f"{accepted.format} records (use {accepted.format!r} or 'auto')")
    if accepted.format:
        try:
            check_method_format(spec.method, accepted.format, field)
        except ValueError as exc:
            raise SpecError(f"invalid job spec: {exc}") from None


def accept_submission(
    raw: object, tenant: str, data_root: Path, hub_cache: Path, model_roots: Sequence[Path], dataset_store: Path,
    files: Optional[FileStore] = None,
) -> Submission:
    """parse_spec; check the datasets and the base model exist where this tenant may read them; then copy each dataset
    into the dataset store (the job trains on those bytes only) and read its first records as the executor will.
    Hyperparameters given as "auto" are chosen then, from what was read (`auto.resolve`), and stored in the spec."""
    raw, auto_fields = auto.take_auto(spec_object(raw))
    spec = parse_spec(raw)
    fields = [field for field in ("dataset", "validation_dataset") if getattr(spec, field) is not None]
    paths = {field: resolve_dataset(getattr(spec, field), data_root, tenant, field) for field in fields
             if not is_file_id(getattr(spec, field))}  # an uploaded file's id: `files` has its accepted bytes
    model_dir = resolve_base_model(spec.base_model, hub_cache, spec.base_model_revision, model_roots)
    root = Path(data_root).resolve()
    areas = [root / tenant, root / "shared"]
    datasets, samples = {}, {}
    for field in fields:
        uri = getattr(spec, field)
        datasets[field] = (accept(uri, paths[field], areas, dataset_store, field) if field in paths
                           else accepted_file(files, tenant, uri, field))
        _check_format(spec, datasets[field], field)
        samples[field] = sample_count(dataset_store, datasets[field], field, spec.dataset_format,
                                      str(model_dir.resolve()), spec.hyperparameters.max_seq_len)
    train = samples["dataset"]
    _check_eval_prompts(spec, tokenizing_for(str(model_dir.resolve())), datasets["dataset"].format)
    _check_eval_base(spec, model_shape(str(model_dir.resolve())))
    _check_target_modules(spec, model_shape(str(model_dir.resolve())))
    _check_target_parameters(spec, model_shape(str(model_dir.resolve())))
    spec = auto.resolve(spec, auto_fields, model_shape(str(model_dir.resolve())),
                        auto.DatasetSample(datasets["dataset"].records, train.records, train.tokens))
    epoch_tokens = train.tokens * datasets["dataset"].records // max(1, train.records)  # the sample, scaled
    return Submission(spec, datasets, {field: count.targets for field, count in samples.items()},
                      plan_for(spec, model_dir, epoch_tokens))
