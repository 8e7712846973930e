"""Activation checkpointing of decoder layers: keep less in forward, recompute the rest in backward.

"full" keeps only each layer's input and recomputes the whole layer (about half the frozen-base forward+backward
again). "selective" keeps the outputs of the matrix products and attention and recomputes only the cheap elementwise
work (norms, rotary, SiLU, products, casts), which is where much of a Llama layer's activation memory sits (fp32 norm
inputs, the MLP's SiLU and gated product).

The recomputation must see what the forward saw. The multi-adapter layers read the rows of each job from the shared
`RowRouting` (cleared once the forward is done) and draw dropout masks from each job's own generator (advanced by
then), so each checkpointed call remembers both and puts them back for its recomputation only.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lorafleet.executor.multilora import RowRouting

MODES = ("off", "selective", "full")
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED_OPS or "attn" in str(op) or "attention" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_layers(
    layers: nn.ModuleList, routing: RowRouting, generators: Callable[[], list[torch.Generator]], mode: str = "full"
) -> None:
    """Make every layer in `layers` recompute (some of) its activations in backward; names are unchanged."""
    if mode not in MODES:
        raise ValueError(f"unknown activation checkpointing {mode!r}; expected one of {MODES}")
    if mode == "off":
        return
    for layer in layers:
        layer.forward = _checkpointed(layer.forward, routing, generators, selective=mode == "selective")


def _checkpointed(forward, routing: RowRouting, generators, selective: bool):
    options = {"use_reentrant": False}
    if selective:
        options["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention)

    def run(*args, **kwargs):
        segments = routing.segments
        rngs = generators()
        states = [rng.get_state() for rng in rngs]
        calls = 0

        def body(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*args, **kwargs)
            now, rows = [rng.get_state() for rng in rngs], routing.segments
            routing.segments = segments
            for rng, state in zip(rngs, states):
                rng.set_state(state)
            try:
                return forward(*args, **kwargs)
            finally:
                routing.segments = rows
                for rng, state in zip(rngs, now):
                    rng.set_state(state)

        return checkpoint(body, *args, **options, **kwargs)

    return run
