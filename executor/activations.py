"""Activation checkpointing of decoder layers: keep each layer's input, recompute the rest in backward.

The recomputation must see what the forward saw. The multi-adapter layers read the rows of each job from the shared
`RowRouting` (cleared once the forward is done) and draw dropout masks from each job's own generator (advanced by
then), so each checkpointed call remembers both and puts them back for its recomputation only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafleet.executor.multilora import RowRouting


def checkpoint_layers(
    layers: nn.ModuleList, routing: RowRouting, generators: Callable[[], list[torch.Generator]]
) -> None:
    """Make every layer in `layers` recompute its activations in backward (its registered name is unchanged)."""
    for layer in layers:
        layer.forward = _checkpointed(layer.forward, routing, generators)


def _checkpointed(forward, routing: RowRouting, generators):
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

        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run
