"""Activation checkpointing of decoder layers: keep each layer's input, recompute the rest in backward.

On a frozen base the backward is only dX (about the forward's cost), so recomputing a layer adds about half of its
forward+backward; checkpointing every n-th layer recomputes 1/n of that, for the memory of the other layers.

The recomputation must see what the forward saw. The multi-adapter layers read the rows of each job, and the seeds
their dropout masks are hashed from, from the shared `RowRouting` (cleared once the forward is done), so each
checkpointed call remembers both and puts them back for its recomputation only. (Selective
checkpointing, which serves saved matmul outputs back to the recomputation, does not fit here: the multi-adapter
layer adds the LoRA delta into the base projection's output in place.)
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafleet.executor.multilora import RowRouting


def checkpoint_layers(layers: nn.ModuleList, routing: RowRouting, every: int = 1) -> None:
    """Make every `every`-th layer of `layers` (0: none) recompute its activations in backward, and the others not
    (a layer checkpointed before keeps the forward it had under the wrapper); names unchanged."""
    if not isinstance(every, int) or every < 0:  # True/False read as every layer / none
        raise ValueError(f"activation checkpointing {every!r}: expected 0 (off), 1 (every layer) or n (every n-th)")
    for layer in layers:
        if recomputes(layer):
            layer.forward = layer.forward.wrapped
    if every == 0:
        return
    for layer in layers[::every]:
        layer.forward = _checkpointed(layer.forward, routing)


def _checkpointed(forward, routing: RowRouting):
    def run(*args, **kwargs):
        segments, seeds = routing.segments, routing.dropout_seeds
        calls = 0

        def body(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*args, **kwargs)
            rows, now_seeds = routing.segments, routing.dropout_seeds
            routing.segments, routing.dropout_seeds = segments, seeds
            try:
                return forward(*args, **kwargs)
            finally:
                routing.segments, routing.dropout_seeds = rows, now_seeds

        return checkpoint(body, *args, use_reentrant=False, **kwargs)

    run.recomputes, run.wrapped = True, forward
    return run


def recomputes(layer: nn.Module) -> bool:
    """Whether `checkpoint_layers` made this layer recompute its activations in backward."""
    return getattr(layer.forward, "recomputes", False)
