"""A base model's linear layers by name, read from its safetensors headers: what `target_modules` may name.

The scheduler never imports torch, so it cannot build the model; the weight names and shapes in the headers (the
first few kilobytes of each shard, never the weights) say the same. A linear layer is a 2-D `<module>.weight` inside
the decoder's numbered layers, which leaves out the embeddings and the LM head, as PEFT's `all-linear` does. Two
kinds of 2-D weights there are no linear layer in transformers 5 and are left out too: a MoE block's experts (one
fused 3-D parameter in memory, saved per expert) and its router (`gate`, next to `experts`).

Those fused expert parameters are what `target_parameters` may name (`expert_parameters`): their in-memory keys
(`model.layers.0.mlp.experts.gate_up_proj`, [E, 2I, H]) are read back from the per-expert tensors the headers hold
(`...experts.<e>.gate_proj.weight` and `up_proj`, or Mixtral's `block_sparse_moe.experts.<e>.w1`/`w3`; `down_proj`
or `w2`), as transformers 5 fuses them when it loads the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_LAYER_INDEX = re.compile(r"\.\d+\.")
_EXPERT = re.compile(r"\.experts\.\d+\.")
_PER_EXPERT_TENSOR = re.compile(r"(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight")
# The fused parameters of an experts module, and the per-expert projections saved for each (gate;up concatenated).
FUSED_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_FUSED_FROM = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
               "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}  # Qwen2-MoE's names, Mixtral's
_LOADED_BLOCK_NAMES = {"block_sparse_moe": "mlp"}  # Mixtral's MoE block, as transformers 5 names it in memory


def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name -> shape, from the headers of the base's safetensors files ({} when it has none)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    elif (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        return {}
    shapes = {}
    for name in files:
        shapes.update(_header_shapes(model_dir / name))
    return shapes


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file (header of {length} bytes)")
        header = json.loads(file.read(length))
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def linear_widths(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Linear layer name (the last part of its module path) -> in + out features summed over its instances."""
    expert_blocks = {name[:match.start()] for name in shapes if (match := _EXPERT.search(name))}
    widths: dict[str, int] = {}
    for name, shape in shapes.items():
        module, _, kind = name.rpartition(".")
        if kind != "weight" or len(shape) != 2 or not _LAYER_INDEX.search(name) or _EXPERT.search(name):
            continue
        parent, _, leaf = module.rpartition(".")
        if leaf == "gate" and parent in expert_blocks:
            continue
        widths[leaf] = widths.get(leaf, 0) + shape[0] + shape[1]
    return widths


def name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a plain-name target (`target_modules`, `target_parameters`): the name is the target or ends
    with '.' + target."""
    return name == target or name.endswith("." + target)


def expert_parameters(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int, int]]:
    """Fused expert parameter key (as the loaded model names it) -> (experts, d_in, d_out), from the per-expert
    tensors of the headers (or fused 3-D ones, [experts, d_out, d_in], where a base was saved so)."""
    parts: dict[str, dict[int, list[tuple[int, ...]]]] = {}
    fused: dict[str, tuple[int, int, int]] = {}
    for name, shape in shapes.items():
        leaf = name.rpartition(".")[2]
        if leaf in FUSED_EXPERT_PARAMETERS and len(shape) == 3 and name.endswith(f".experts.{leaf}"):
            fused[name] = (shape[0], shape[2], shape[1])
            continue
        match = _PER_EXPERT_TENSOR.fullmatch(name)
        if match is None or match["projection"] not in _FUSED_FROM or len(shape) != 2:
            continue
        block, _, block_leaf = match["block"].rpartition(".")
        key = f"{block}.{_LOADED_BLOCK_NAMES.get(block_leaf, block_leaf)}.experts.{_FUSED_FROM[match['projection']]}"
        parts.setdefault(key, {}).setdefault(int(match["expert"]), []).append(shape)
    for key, experts in parts.items():
        first = experts[min(experts)]  # every expert has the same shapes
        fused[key] = (len(experts), first[0][1], sum(shape[0] for shape in first))
    return dict(sorted(fused.items()))


def expert_parameter_suffixes(keys) -> list[str]:
    """The distinct names of expert parameters below their layer index (`mlp.experts.gate_up_proj`), for messages."""
    return sorted({_LAYER_INDEX.split(key, maxsplit=1)[-1] for key in keys})
