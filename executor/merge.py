"""Merge a job's exported adapter into its base: a full model directory that loads and serves as a plain model.

vLLM serves LoRA adapters but refuses DoRA ones (and VeRA ones), and some servers take no adapters at all. Merged,
each adapted layer's weight becomes W + ΔW (LoRA and rsLoRA: ΔW = scale · B A; VeRA: ΔW = Λb B Λd A; DoRA:
m · (W + ΔW) / ‖W + ΔW‖ per output feature), so the base's architecture computes the adapted model with no adapter.

The adapter directory is what a job exports (`checkpoint.save_peft_adapter`: a PEFT adapter of any kind lorafleet
trains, expert parameters' LoRA included), read by PEFT itself, which does the merge. The weights are merged in float32 and stored in the base's own
dtype, so each merged weight is rounded once; that takes 4 bytes of memory per base parameter while merging.
The output directory holds the model's safetensors and config, and the base's tokenizer files, if it has any; it
appears whole or not at all (written under another name, then renamed).

    lorafleet merge ADAPTER_DIR --base BASE_DIR --out OUT_DIR      (scheduler/cli.py)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lorafleet.executor.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# The tokenizer's files a base directory may hold, copied to the merged model as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# An adapter tensor's name: base_model.model.<module path>.<part>[.weight]; the parts that sit on one base layer.
_LAYER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "vera_lambda_d", "vera_lambda_b")


class MergeError(ValueError):
    """An adapter that cannot be merged into this base; the message is one line naming the problem."""


@dataclass(frozen=True)
class MergeResult:
    output: str  # the merged model's directory
    adapter_type: str  # lora, rslora, dora or vera
    layers: int  # base layers the adapter changed
    dtype: str  # the merged weights' dtype: the base's

    def to_json(self) -> dict:
        return asdict(self)


def merge_adapter(adapter_dir, base_dir, out_dir, device: str = "cpu") -> MergeResult:
    """Write base + adapter, merged, as a model directory `out_dir` (which must not exist or be empty)."""
    adapter_dir, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    adapter_config = _read_adapter(adapter_dir)
    base_dtype = _read_base(base_dir)
    _check_output(out_dir, adapter_dir, base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True).to(device)
    layers = _check_fits(model, adapter_dir, base_dir)
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).merge_and_unload(safe_merge=True)
    except (ValueError, RuntimeError, KeyError) as exc:  # what PEFT raises for an adapter it cannot apply
        raise MergeError(f"adapter {adapter_dir} cannot be merged into base {base_dir}: {_one_line(exc)}") from None
    _write_model(merged.to(base_dtype), base_dir, out_dir)
    return MergeResult(str(out_dir), _adapter_type(adapter_config), layers, str(base_dtype).removeprefix("torch."))


def _write_model(model: torch.nn.Module, base_dir: Path, out_dir: Path) -> None:
    """Save the model and the base's tokenizer files next to `out_dir` and rename them into place: a merge that
    fails part way leaves no half-written model under the name asked for."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, staging / name)
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked before the merge)
    staging.rename(out_dir)


def _read_adapter(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise MergeError(f"adapter {adapter_dir}: no such directory (expected a job's exported adapter: "
                         f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (adapter_dir / name).is_file()]
    if missing and (adapter_dir / "lopa_config.json").is_file():
        raise MergeError(f"adapter {adapter_dir}: is a LoPA job's soft-prompt generator, not a weight delta: there is "
                         f"nothing to merge into the base; load it with lorafleet.executor.lopa.load_lopa")
    if missing and (adapter_dir / "config.json").is_file():
        raise MergeError(f"adapter {adapter_dir}: is a whole model (a GaLore job's result), not an adapter: it needs "
                         f"no merge; load it with from_pretrained")
    if missing:
        raise MergeError(f"adapter {adapter_dir}: no {' or '.join(missing)} there (expected a job's exported adapter)")
    try:
        return json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"adapter {adapter_dir}: {ADAPTER_CONFIG} is not JSON: {exc}") from None


def _read_base(base_dir: Path) -> torch.dtype:
    """The dtype the base's weights are saved in (float32 when its config does not say)."""
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"base {base_dir}: no config.json there (expected a local model directory)")
    dtype = AutoConfig.from_pretrained(base_dir, local_files_only=True).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _check_output(out_dir: Path, *inputs: Path) -> None:
    if out_dir.resolve() in {path.resolve() for path in inputs}:
        raise MergeError(f"output {out_dir}: is an input directory; name a new one")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(f"output {out_dir}: exists and is not an empty directory; name a new one")


def _check_fits(model: torch.nn.Module, adapter_dir: Path, base_dir: Path) -> int:
    """Check that every layer the adapter names is in the base with the adapter's widths; return how many."""
    modules = dict(model.named_modules())
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as tensors:
        shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    layers = set()
    for key, shape in shapes.items():
        path, part = _layer_of(key)
        if part is None:
            continue  # VeRA's shared projections (base_model.vera_A/B)
        if path not in modules:
            raise MergeError(f"adapter {adapter_dir} does not fit base {base_dir}: the base has no layer {path} "
                             f"(was the adapter trained on another base?)")
        layers.add(path)
        widths = _linear_widths(modules[path])
        wanted = {"lora_A": (1, 0), "lora_B": (0, 1)}.get(part)  # (shape axis, widths index) to compare
        if widths and wanted and shape[wanted[0]] != widths[wanted[1]]:
            raise MergeError(f"adapter {adapter_dir} does not fit base {base_dir}: layer {path} takes "
                             f"{widths[0]} -> {widths[1]} features, the adapter's {part} is {list(shape)} "
                             f"(was the adapter trained on another base?)")
    return len(layers)


def _layer_of(key: str) -> tuple[str, str | None]:
    """(module path in the base, adapter part) of a saved adapter tensor's key; part None for a tensor of no layer."""
    path = key.removeprefix("base_model.model.").removesuffix(".weight")
    module, _, part = path.rpartition(".")
    if part not in _LAYER_PARTS:
        return path, None
    while module.endswith(".base_layer"):  # PEFT's second wrapper of one module (target_parameters: each parameter)
        module = module.removesuffix(".base_layer")
    return module, part


def _linear_widths(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer (Conv1D holds its weight transposed); None for another module."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return None


def _adapter_type(config: dict) -> str:
    if config.get("peft_type") == "VERA":
        return "vera"
    if config.get("use_dora"):
        return "dora"
    return "rslora" if config.get("use_rslora") else "lora"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
