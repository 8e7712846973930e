"""A base model's linear layers by name, read from its safetensors headers: what `target_modules` may name.

The scheduler never imports torch, so it cannot build the model; the weight names and shapes in the headers (the
first few kilobytes of each shard, never the weights) say the same. A linear layer is a 2-D `<module>.weight` inside
the decoder's numbered layers, which leaves out the embeddings and the LM head, as PEFT's `all-linear` does. Two
kinds of 2-D weights there are no linear layer in transformers 5 and are left out too: a MoE block's experts (one
fused 3-D parameter in memory, saved per expert) and its router (`gate`, next to `experts`).
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
