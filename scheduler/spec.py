"""The job spec: what a tenant submits. The one place its fields, bounds and defaults are defined.

`lorafleet schema` prints `JobSpec.model_json_schema()`. Names follow PEFT (`r`, `lora_alpha`, `lora_dropout`,
`target_modules`) and the usual trainer hyperparameters so a LoRA user can write one without reading our code.
Dataset paths are checked against the operator's data root separately (`resolve_dataset`), because the root is
deployment configuration, not part of the spec.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.scheduler.formats import PREFERENCE_FORMATS

MAX_SPEC_BYTES = 64 * 1024
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
# Evaluation samples: greedy completions of the tenant's prompts with the job's adapter at each checkpoint
MAX_EVAL_SAMPLES, MAX_EVAL_PROMPT_CHARS, MAX_EVAL_TOKENS = 8, 4000, 512
NO_EVAL_SAMPLES = {  # adapter types the generation engine does not run, and why
    "galore": "a whole model of its own, trained on an executor without the generation engine",
    "lopa": "its live soft-prompt generator is not sampled at checkpoints (its exported model is served)",
}
# Bases (config model_type) the generation engine runs: the Llama-like decoders whose attention and rotary its own
# forward implements (executor/generate.py reads this list; submission refuses eval_samples on other bases).
GENERATION_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer of the decoder but the LM head

# The training methods, each with what it trains on and its loss: the one place they are listed (the spec's
# description, the README's table and the executor's dispatch all follow this).
Method = Literal["sft", "dpo", "simpo", "orpo"]
METHODS: dict[str, str] = {
    "sft": "supervised: the mean token loss of the targets, on alpaca, chat or text records",
    "dpo": "direct preference optimisation: the sigmoid loss -log σ(β((log π_c - log ref_c) - (log π_r - log ref_r))) "
           "on preference or chat_preference pairs, log-probs summed over each answer, the frozen base as reference",
    "simpo": "SimPO, reference-free: -log σ(β(log π_c / |y_c| - log π_r / |y_r|) - γ) on preference or "
             "chat_preference pairs, log-probs averaged over each answer's tokens (hyperparameters.beta, default 2.0, "
             "and simpo_gamma γ); no reference forward, so cheaper than DPO",
    "orpo": "ORPO, reference-free: the chosen sequence's NLL (prompt and answer, a mean over the micro-batch's chosen "
            "tokens) - β log σ(log odds_c - log odds_r), odds p / (1 - p) of each answer's average probability p, on "
            "preference or chat_preference pairs (hyperparameters.beta, default 0.1); no reference forward",
}
PREFERENCE_METHODS = ("dpo", "simpo", "orpo")  # trained on preference pairs
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}  # TRL's DPOConfig, CPOConfig(loss_type="simpo"), ORPOConfig

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NolaSettings(_Strict):
    num_basis: int = Field(64, ge=1, le=4096, description="random basis matrices per factor (k in NOLA)")
    basis_seed: int = Field(0, ge=0, le=2**31 - 1, description="seed that generates the fixed random bases")


class VeraSettings(_Strict):
    projection_prng_key: int = Field(0, ge=0, le=2**31 - 1, description="seed of the shared frozen random A and B")
    d_initial: float = Field(0.1, gt=0, le=10, description="initial value of every d vector")


class GaloreSpecSettings(_Strict):
    """GaLore's options, named and defaulted as galore-torch's (a full fine-tune: no adapter, the base's own weights
    train, the target projections' gradients projected to `rank`)."""

    rank: int = Field(128, ge=1, le=4096, description="rank of the gradient projection")
    update_proj_gap: int = Field(200, ge=1, le=1_000_000, description="optimizer steps between projection refreshes")
    scale: float = Field(0.25, gt=0, le=100, description="factor of the projected-back update")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field(
        "std", description="which side of a gradient is projected (galore-torch's proj_type)")


# Adapter fields that do not apply to a GaLore job (it trains the base's weights, no adapter).
_NOT_GALORE_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_parameters", "nola", "vera", "use_rslora",
                      "loraplus_lr_ratio", "use_dora")


class LopaSpecSettings(_Strict):
    """LoPA's options (executor/lopa.py): a per-input soft prompt Z = Z_S ∘ sigmoid(u vᵀ) of num_virtual_tokens rows
    prepended to each sequence; defaults as the authors' training script (10 virtual tokens, rank 1)."""

    num_virtual_tokens: int = Field(10, ge=1, le=256, description="m: prompt rows prepended to every sequence")
    rank: int = Field(1, ge=1, le=64, description="r: the rank of the instance-specific part u vᵀ")
    head_size: int = Field(256, ge=1, le=8192, description="h: hidden width of the two heads that map the input's "
                           "encoding to u and v")


# Adapter fields that do not apply to a LoPA job (no layer of the base is adapted: its prompts enter at the input).
_NOT_LOPA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "nola", "vera",
                    "use_rslora", "loraplus_lr_ratio", "use_dora")


class AdapterSpec(_Strict):
    type: Literal["lora", "nola", "vera", "galore", "lopa"] = Field(
        "lora", description="galore: full fine-tuning of the base's weights with GaLore's gradient low-rank "
        "projection on target_modules (others train with AdamW); run alone, exported as a full model. lopa: "
        "low-rank prompt adaptation, a soft prompt per input prepended to each sequence (options in 'lopa'), "
        "the base untouched; exported as lopa_config.json + lopa_model.safetensors")
    r: int = Field(16, ge=1, le=256)
    lora_alpha: float = Field(32.0, gt=0, le=4096)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = Field(
        ALL_PROJECTIONS, max_length=16,
        description="names of the base's linear layers (checked against the base at submission), or \"all-linear\"; "
                    "empty only beside target_parameters",
    )
    target_parameters: tuple[str, ...] = Field(
        (), max_length=16,
        description="a MoE base's fused expert parameters to adapt, per expert, as PEFT's target_parameters (e.g. "
                    "\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"; a name matches a parameter whose key is it "
                    "or ends with '.' + it; checked against the base at submission); lora only, without dropout or DoRA",
    )
    nola: Optional[NolaSettings] = None
    vera: Optional[VeraSettings] = None
    use_rslora: bool = Field(False, description="rank-stabilised scale lora_alpha / sqrt(r) instead of lora_alpha / r "
                             "(PEFT's use_rslora)")
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0, le=1024, description="LoRA+: B trains at this multiple of the job's learning rate (lora only)"
    )
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output feature times the direction of "
                           "W + scale·BA (lora only, unquantized bases; PEFT's use_dora)")
    galore: Optional[GaloreSpecSettings] = None
    lopa: Optional[LopaSpecSettings] = None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear(cls, value):
        if not isinstance(value, str):
            return value
        if value != ALL_LINEAR:  # PEFT would take it as a regular expression; we name modules
            raise ValueError(f"a single string must be {ALL_LINEAR!r}; give module names as a list, e.g. "
                             f"[{value[:64]!r}]")
        return (ALL_LINEAR,)  # PEFT writes it as a string

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if value == (ALL_LINEAR,):
            return value
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
                raise ValueError(f"not a module name: {name!r}")
        if len(set(value)) != len(value):
            raise ValueError("duplicate module names")
        return value

    @field_validator("target_parameters")
    @classmethod
    def _parameter_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,15}", name) or len(name) > 256:
                raise ValueError(f"not a parameter name: {name[:80]!r}")
        if len(set(value)) != len(value):
            raise ValueError("duplicate parameter names")
        return value

    @model_validator(mode="after")
    def _expert_parameters(self) -> "AdapterSpec":
        """What PEFT's ParamWrapper (target_parameters) supports, so that the export loads: plain LoRA, rsLoRA and
        LoRA+, without dropout (it cannot factor x out of a weight delta) or DoRA."""
        if not self.target_modules and not self.target_parameters:
            raise ValueError("target_modules: name at least one module (or set target_parameters)")
        if not self.target_parameters:
            return self
        if self.type != "lora":
            raise ValueError(f"target_parameters applies to type 'lora' (PEFT adapts parameters with LoRA only), "
                             f"not {self.type!r}")
        if self.use_dora:
            raise ValueError("target_parameters cannot be combined with use_dora (PEFT has no DoRA for parameters)")
        if self.lora_dropout:
            raise ValueError("target_parameters needs lora_dropout 0 (PEFT cannot apply dropout to a targeted "
                             "parameter's input)")
        return self

    @model_validator(mode="after")
    def _nola_settings(self) -> "AdapterSpec":
        if self.type == "lora" and self.nola is not None:
            raise ValueError("'nola' settings are only allowed with type 'nola'")
        if self.type == "nola" and self.nola is None:
            object.__setattr__(self, "nola", NolaSettings())
        return self

    @model_validator(mode="after")
    def _variants(self) -> "AdapterSpec":
        if self.loraplus_lr_ratio is not None and self.type != "lora":
            raise ValueError(f"loraplus_lr_ratio applies to type 'lora' (B's own learning rate), not {self.type!r}")
        if self.use_dora and self.type != "lora":
            raise ValueError(f"use_dora applies to type 'lora', not {self.type!r}")
        if self.use_rslora and self.type == "vera":
            raise ValueError("use_rslora does not apply to type 'vera' (VeRA has no alpha / r scale)")
        if self.type != "vera" and self.vera is not None:
            raise ValueError("'vera' settings are only allowed with type 'vera'")
        if self.type == "vera" and self.vera is None:
            object.__setattr__(self, "vera", VeraSettings())
        return self

    @model_validator(mode="after")
    def _galore_settings(self) -> "AdapterSpec":
        if self.type != "galore":
            if self.galore is not None:
                raise ValueError("'galore' settings are only allowed with type 'galore'")
            return self
        given = [name for name in _NOT_GALORE_FIELDS
                 if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default]
        if given:
            raise ValueError(f"type 'galore' trains the base's own weights, with no adapter: it takes no "
                             f"{', '.join(given)} (its options are galore.rank, update_proj_gap, scale, proj_type)")
        if self.galore is None:
            object.__setattr__(self, "galore", GaloreSpecSettings())
        return self

    @model_validator(mode="after")
    def _lopa_settings(self) -> "AdapterSpec":
        if self.type != "lopa":
            if self.lopa is not None:
                raise ValueError("'lopa' settings are only allowed with type 'lopa'")
            return self
        given = [name for name in _NOT_LOPA_FIELDS
                 if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default]
        if given:
            raise ValueError(f"type 'lopa' adapts no layer of the base (its soft prompts enter with the input): it "
                             f"takes no {', '.join(given)} (its options are lopa.num_virtual_tokens, rank, head_size)")
        if self.lopa is None:
            object.__setattr__(self, "lopa", LopaSpecSettings())
        return self

    @property
    def scale(self) -> float:
        """The factor of B·A in the layer's output, as PEFT computes it (VeRA's vectors are its only scale)."""
        if self.type == "vera":
            return 1.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class Hyperparameters(_Strict):
    epochs: int = Field(1, ge=1, le=100)
    max_steps: Optional[int] = Field(None, ge=1, le=1_000_000, description="stop after this many optimizer steps")
    batch_size: int = Field(4, ge=1, le=512, description="sequences per micro-batch")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024,
        description="micro-batches per optimizer step, their losses averaged; the run's last window may be shorter "
                    "and averages its own micro-batches; a window whose micro-batches have no target tokens leaves "
                    "the weights unchanged",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0, le=1e-2)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, le=1e6)
    max_seq_len: int = Field(512, ge=8, le=32768)
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(100, ge=1, le=1_000_000, description="optimizer steps between checkpoints")
    beta: Optional[float] = Field(
        None, gt=0, le=100, description="preference methods' beta (unset: the method's default, dpo 0.1, simpo "
        "2.0, orpo 0.1): for dpo how far from the base the adapter may move, for simpo the scale of the average "
        "log-probs, for orpo the weight of the odds-ratio term"
    )
    simpo_gamma: float = Field(0.5, ge=0, le=100, description="SimPO's target reward margin γ (TRL's simpo_gamma; "
                               "method simpo only)")


class JobSpec(_Strict):
    name: str = Field("adapter", description="human name (PEFT-style suffix) of the adapter")
    base_model: str = Field(..., min_length=1, max_length=512, description="local path or local-cache model id")
    base_model_revision: Optional[str] = Field(None, max_length=128)
    dataset: str = Field(..., min_length=1, max_length=1024, description="file:// URI or path under the data root")
    validation_dataset: Optional[str] = Field(None, min_length=1, max_length=1024)
    method: Method = Field("sft", description="; ".join(f"{name}: {text}" for name, text in METHODS.items()))
    dataset_format: Literal["auto", "alpaca", "chat", "text", "preference", "chat_preference"] = "auto"
    adapter: AdapterSpec = AdapterSpec()
    quantization: Literal["none", "nf4", "int8"] = "none"
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on a GPU that computes it natively (Ampere on), else "
        "float32, and float32 on a CPU; bfloat16 jobs go only to executors that compute it natively (float16 is not "
        "offered: it would need loss scaling)"
    )
    hyperparameters: Hyperparameters = Hyperparameters()
    priority: int = Field(5, ge=0, le=9, description="0 lowest, 9 highest")
    metadata: dict[str, str] = Field(
        default_factory=dict, max_length=MAX_METADATA_PAIRS,
        description="the tenant's own labels, kept with the job (OpenAI's limits: 16 pairs, keys up to 64 characters, "
                    "values up to 512)",
    )
    eval_samples: tuple[str, ...] = Field(
        (), max_length=MAX_EVAL_SAMPLES,
        description=f"up to {MAX_EVAL_SAMPLES} prompts (each 1-{MAX_EVAL_PROMPT_CHARS} characters) completed greedily "
                    "with the job's adapter at each checkpoint and at the end (an eval_samples event); rendered as "
                    "the dataset's records render a prompt: alpaca an instruction without input, chat one user "
                    "message through the chat template, text and preference the text itself; not for adapter types "
                    "galore and lopa",
    )
    eval_max_tokens: int = Field(64, ge=1, le=MAX_EVAL_TOKENS, description="most tokens generated for each of "
                                 "eval_samples")

    @field_validator("eval_samples")
    @classmethod
    def _eval_prompts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for number, prompt in enumerate(value):
            if not prompt.strip():
                raise ValueError(f"prompt {number}: empty")
            if len(prompt) > MAX_EVAL_PROMPT_CHARS:
                raise ValueError(f"prompt {number}: {len(prompt)} characters, at most {MAX_EVAL_PROMPT_CHARS}")
            if "\x00" in prompt:
                raise ValueError(f"prompt {number}: holds a NUL character")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"prompt {number}: not valid Unicode (a lone surrogate)") from None
        return value

    @model_validator(mode="after")
    def _eval_samples_adapter(self) -> "JobSpec":
        if self.eval_samples and self.adapter.type in NO_EVAL_SAMPLES:
            raise ValueError(f"eval_samples: not offered for adapter.type {self.adapter.type!r} "
                             f"({NO_EVAL_SAMPLES[self.adapter.type]})")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("base_model", "dataset", "validation_dataset", "base_model_revision")
    @classmethod
    def _printable(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value.isprintable() or "\x00" in value):
            raise ValueError("must be printable text")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS:
                raise ValueError(f"key {key[:70]!r}: use 1-{MAX_METADATA_KEY_CHARS} characters")
            if len(text) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"value of {key!r}: at most {MAX_METADATA_VALUE_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _method_format(self) -> "JobSpec":
        if self.dataset_format != "auto":
            check_method_format(self.method, self.dataset_format, "dataset_format")
        return self

    @model_validator(mode="after")
    def _method_beta(self) -> "JobSpec":
        """An unset beta becomes the method's default (0.1 for sft, where it is unused, as it always was)."""
        if self.hyperparameters.beta is None:
            beta = DEFAULT_BETA.get(self.method, DEFAULT_BETA["dpo"])
            object.__setattr__(self, "hyperparameters", self.hyperparameters.model_copy(update={"beta": beta}))
        return self

    @model_validator(mode="after")
    def _dora_unquantized(self) -> "JobSpec":
        if self.adapter.use_dora and self.quantization != "none":
            raise ValueError(f"adapter.use_dora: DoRA is not offered on a quantized base (quantization "
                             f"{self.quantization!r}): its weight norm needs the full-precision base weights")
        return self

    @model_validator(mode="after")
    def _expert_parameters_unquantized(self) -> "JobSpec":
        if self.adapter.target_parameters and self.quantization != "none":
            raise ValueError(f"adapter.target_parameters: not offered on a quantized base (quantization "
                             f"{self.quantization!r}; its expert parameters are only tested unquantized)")
        return self

    @model_validator(mode="after")
    def _galore_job(self) -> "JobSpec":
        if self.adapter.type != "galore":
            return self
        if self.quantization != "none":
            raise ValueError(f"adapter.type 'galore' trains every weight of the base: not offered on a quantized base "
                             f"(quantization {self.quantization!r})")
        if self.method != "sft":
            raise ValueError(f"adapter.type 'galore' trains with method 'sft' only, not {self.method!r}")
        return self

    @model_validator(mode="after")
    def _lopa_job(self) -> "JobSpec":
        if self.adapter.type == "lopa" and self.method != "sft":
            raise ValueError(f"adapter.type 'lopa' trains with method 'sft' only, not {self.method!r} (a preference "
                             f"pair's prompts and its reference forward are not built for LoPA)")
        return self

    def compatibility_key(self) -> str:
        """Jobs with equal keys can share one frozen base in one cohort."""
        return "|".join((self.base_model, self.base_model_revision or "", self.quantization, self.dtype))


class SpecError(ValueError):
    """A spec that cannot be accepted; the message names the offending field."""



def check_method_format(method: str, fmt: str, field: str) -> None:
    """DPO, SimPO and ORPO train on preference pairs only, SFT on anything else (ValueError naming `field`)."""
    if method in PREFERENCE_METHODS and fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"{field}: method {method!r} trains on preference pairs ({' or '.join(PREFERENCE_FORMATS)} "
                         f"records), not {fmt}")
    if method == "sft" and fmt in PREFERENCE_FORMATS:
        raise ValueError(f"{field}: {fmt} records are preference pairs: set method 'dpo' (or 'simpo', 'orpo') to "
                         "train on them")


# A check across fields (a model validator: no location) names the field it refuses first in its message
_NAMED_REFUSAL_RE = re.compile(r"^Value error, ([A-Za-z_][A-Za-z0-9_.]*: .*)$", re.DOTALL)


def _first_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        named = None if err["loc"] else _NAMED_REFUSAL_RE.match(msg)
        parts.append(named.group(1) if named else f"{field}: {msg}")
    return "invalid job spec: " + "; ".join(parts)


def parse_spec(raw: object) -> JobSpec:
    """Validate a spec given as a dict, JSON text or bytes; raise SpecError naming the field."""
    try:
        return JobSpec.model_validate(spec_object(raw))
    except ValidationError as exc:
        raise SpecError(_first_error(exc)) from None


def spec_object(raw: object) -> dict:
    """The spec given as a dict, JSON text or bytes, as a dict within MAX_SPEC_BYTES (not validated yet)."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"invalid job spec: spec is {len(raw)} bytes, the limit is {MAX_SPEC_BYTES}")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"invalid job spec: not UTF-8 (byte {exc.start})") from None
    if isinstance(raw, str):
        if len(raw.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
            raise SpecError(f"invalid job spec: spec is larger than {MAX_SPEC_BYTES} bytes")
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SpecError(f"invalid job spec: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"invalid job spec: expected a JSON object, got {type(raw).__name__}")
    size = len(json.dumps(raw, default=str).encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"invalid job spec: spec is {size} bytes, the limit is {MAX_SPEC_BYTES}")
    return raw


def is_inside(path: Path, areas: list[Path]) -> bool:
    """Whether the resolved `path` is one of `areas` or below one (areas resolved too)."""
    return any(path == area or area in path.parents for area in areas)


def resolve_dataset(uri: str, data_root: str | os.PathLike, tenant: str, field: str = "dataset") -> Path:
    """Map a dataset URI to a real file inside `data_root`, refusing anything that escapes it.

    A tenant may read `data_root/<tenant>/...` and `data_root/shared/...`, never another tenant's area. The check is
    done on the fully resolved path, so `..` and symlinks that point outside are both refused.
    """
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise SpecError(f"invalid job spec: {field}: scheme {parsed.scheme!r} not supported (use file:// or a path)")
    raw_path = unquote(parsed.path) if parsed.scheme == "file" else uri
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise SpecError(f"invalid job spec: {field}: file:// URIs must not name a host")
    if ".." in Path(raw_path).parts:
        raise SpecError(f"invalid job spec: {field}: '..' is not allowed in dataset paths")
    root = Path(data_root).resolve()
    candidate = Path(raw_path)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        resolved = candidate.resolve()
        allowed = [root / tenant, root / "shared"]
        if not is_inside(resolved, allowed):  # named as the tenant names them, never by the server's paths
            raise SpecError(
                f"invalid job spec: {field}: {uri!r} is outside your data areas ({tenant}/... or shared/...)"
            )
        if not resolved.is_file():
            raise SpecError(f"invalid job spec: {field}: no such file {uri!r}")
    except OSError as exc:  # a name too long, a loop of links, ...
        raise SpecError(f"invalid job spec: {field}: {uri!r} cannot be read ({exc.strerror})") from None
    return resolved
