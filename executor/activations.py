"""Activation checkpointing of decoder layers: keep each layer's input, recompute the rest in backward.

On a frozen base the backward is only dX (about the forward's cost), so recomputing a layer adds about half of its
forward+backward; checkpointing every n-th layer recomputes 1/n of that, for the memory of the other layers.

The recomputation must see what the forward saw. The multi-adapter layers read the rows of each job from the shared
`RowRouting` (cleared once the forward is done) and draw dropout masks from each job's own generator (advanced by
then), so each checkpointed call remembers both and puts them back for its recomputation only. (Selective
checkpointing, which serves saved matmul outputs back to the recomputation, does not fit here: the multi-adapter
layer adds the LoRA delta into the base projection's output in place.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafleet.executor.multilora import RowRouting


def checkpoint_layers(
    layers: nn.ModuleList, routing: RowRouting, generators: Callable[[], list[torch.Generator]], every: int = 1
) -> None:
    """Make every `every`-th layer of `layers` (0: none) recompute its activations in backward; names unchanged."""
    if not isinstance(every, int) or every < 0:  # True/False read as every layer / none
        raise ValueError(f"activation checkpointing {every!r}: expected 0 (off), 1 (every layer) or n (every n-th)")
    if every == 0:
        return
    for layer in layers[::every]:
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
