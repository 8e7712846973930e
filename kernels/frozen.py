"""The frozen base weight of the one-node LoRA layers (`lora_linear`, `lora_linear_multi`): a dense tensor, or a weight
held in another form that materialises as a dense one on demand (a 4-bit quantized weight, say: executor/multilora.py
wraps bitsandbytes' Linear4bit so; kernels stay pure math and import no quantization library)."""

from __future__ import annotations

from typing import Protocol, Union

import torch


class DenseOnDemand(Protocol):
    """A frozen weight of `shape` (d_out, d_in) that `dense()` materialises as a [d_out, d_in] tensor in the compute
    dtype. The layers call `dense()` for the forward GEMM and again for the input gradient, and keep the result past
    neither: a quantized base is there to save memory, and a bf16 copy of every layer held until the backward would
    undo that. Such a weight never gets a gradient."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def dense(self) -> torch.Tensor: ...


FrozenWeight = Union[torch.Tensor, DenseOnDemand]


def dense(weight: FrozenWeight) -> torch.Tensor:
    """The weight as a tensor: a tensor itself, or what a `DenseOnDemand` materialises now."""
    return weight if isinstance(weight, torch.Tensor) else weight.dense()
