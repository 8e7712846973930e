"""The request and response bodies of the gateway, in OpenAI's fine-tuning API shapes (what `/openapi.json` shows).

Requests are parsed here only as far as their shape goes (types, unknown fields); every bound is the internal
`JobSpec`'s (`lorafleet.scheduler.spec`), checked once, on the path the Celery API takes too.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.scheduler.spec import GaloreSpecSettings, LopaSpecSettings

Auto = Literal["auto"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HyperparametersRequest(_Request):
    """Each a value or "auto" (the default): the service chooses from the dataset (`scheduler.auto`)."""

    n_epochs: Union[Auto, int] = "auto"
    batch_size: Union[Auto, int] = "auto"
    learning_rate_multiplier: Union[Auto, float] = Field(
        "auto", description="times the adapter type's base learning rate (LoRA 2e-4, NOLA 1e-3)")


class SupervisedRequest(_Request):
    hyperparameters: HyperparametersRequest = HyperparametersRequest()


class DpoHyperparametersRequest(HyperparametersRequest):
    beta: Union[Auto, float] = Field("auto", description="DPO's beta (auto: 0.1)")


class DpoRequest(_Request):
    hyperparameters: DpoHyperparametersRequest = DpoHyperparametersRequest()


class MethodRequest(_Request):
    """OpenAI's `method`: supervised, or dpo on preference pairs (the frozen base is the reference model)."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Optional[SupervisedRequest] = None
    dpo: Optional[DpoRequest] = None


class LorafleetOptions(_Request):
    """lorafleet's own settings, beyond OpenAI's fields (each optional; the spec's defaults otherwise)."""

    adapter_type: Optional[str] = Field(None, description="'lora' (default), 'nola', 'vera', or 'galore' (a full "
                                        "fine-tune: its result is a whole model)")
    galore: Optional[GaloreSpecSettings] = Field(
        None, description="a 'galore' job's options: rank, update_proj_gap, scale, proj_type (galore-torch's names "
        "and defaults)")
    lopa: Optional[LopaSpecSettings] = Field(
        None, description="a 'lopa' job's options: num_virtual_tokens, rank, head_size (defaults 10, 1, 256)")
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    target_modules: Optional[Union[str, list[str]]] = Field(
        None, description="the base's linear layers to adapt, or \"all-linear\" (a string, as PEFT writes it, or in a "
        "list)")
    target_parameters: Optional[list[str]] = Field(
        None, description="a MoE base's fused expert parameters to adapt, e.g. [\"mlp.experts.gate_up_proj\", "
        "\"mlp.experts.down_proj\"] (PEFT's target_parameters)")
    use_rslora: Optional[bool] = Field(None, description="scale lora_alpha / sqrt(r) (PEFT's use_rslora)")
    loraplus_lr_ratio: Optional[float] = Field(None, description="LoRA+: B's learning rate over the job's")
    use_dora: Optional[bool] = Field(None, description="DoRA magnitudes (PEFT's use_dora); not on a quantized base")
    quantization: Optional[str] = Field(None, description="'none' (default), 'nf4' or 'int8' for the frozen base")
    dtype: Optional[str] = Field(None, description="'auto' (default), 'bfloat16' or 'float32'")
    priority: Optional[int] = Field(None, description="0 lowest, 9 highest (default 5)")
    max_seq_len: Optional[int] = None
    max_steps: Optional[int] = Field(None, description="stop after this many optimizer steps")
    checkpoint_every: Optional[int] = Field(None, description="optimizer steps between checkpoints")
    method: Optional[str] = Field(
        None, description="a preference loss OpenAI's API has no type for: 'simpo' or 'orpo' (reference-free), given "
        "with method.type 'dpo' (the same pairs; method.dpo.hyperparameters.beta is its beta, auto: 2.0 or 0.1)")
    simpo_gamma: Optional[float] = Field(None, description="SimPO's target reward margin (default 0.5)")
    eval_samples: Optional[list[str]] = Field(
        None, description="up to 8 prompts completed greedily with the job's adapter at each checkpoint (an "
        "eval_samples event; chat datasets: each one user message)")
    eval_max_tokens: Optional[int] = Field(None, description="most tokens generated for each of eval_samples "
                                           "(default 64)")


class CreateJobRequest(_Request):
    model: str = Field(..., description="the base model: a local directory or an id in the operator's model cache")
    training_file: str = Field(..., description="a file id from POST /v1/files (purpose fine-tune)")
    validation_file: Optional[str] = None
    suffix: Optional[str] = Field(None, description="the adapter's name, part of fine_tuned_model")
    seed: Optional[int] = None
    metadata: Optional[dict[str, str]] = None
    method: Optional[MethodRequest] = None
    hyperparameters: Optional[HyperparametersRequest] = Field(None, description="deprecated: use method")
    lorafleet: Optional[LorafleetOptions] = None


class Hyperparameters(BaseModel):
    """The values a job trains with (an "auto" asked for is shown as the value chosen)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class Supervised(BaseModel):
    hyperparameters: Hyperparameters


class DpoHyperparameters(Hyperparameters):
    beta: float


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters


class Method(BaseModel):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Optional[Supervised] = None
    dpo: Optional[Dpo] = None


class JobError(BaseModel):
    code: str
    message: str
    param: Optional[str] = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: Optional[int] = None
    model: str
    fine_tuned_model: Optional[str] = None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: Optional[str] = None
    hyperparameters: Hyperparameters
    method: Method
    result_files: list[str] = []
    trained_tokens: Optional[int] = None
    estimated_finish: Optional[int] = None
    error: Optional[JobError] = None
    seed: int
    metadata: Optional[dict[str, str]] = None
    suffix: Optional[str] = None
    integrations: list[Any] = []
    lorafleet: dict[str, Any] = Field(default_factory=dict, description="lorafleet's own view: step, total_steps, "
                                      "metrics, priority, adapter settings")


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] = {}


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float] = {}
    file_id: Optional[str] = Field(None, description="lorafleet: the checkpoint's PEFT adapter, packed as one file")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool
    first_id: Optional[str] = None
    last_id: Optional[str] = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    """A tenant's file: an uploaded dataset (`purpose` fine-tune) or a job's packed result (fine-tune-results)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: Optional[str] = None
    last_id: Optional[str] = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Model(BaseModel):
    """OpenAI's model object (`GET /v1/models`): a fine-tuned model of the tenant, or a base (`owned_by`
    `lorafleet`)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool
