"""lorafleet.kernels: the batched multi-adapter LoRA math, pure functions with PyTorch references.

`lora_delta` is the one entry point the executor calls; it picks the Triton kernels on a GPU and the PyTorch
reference elsewhere. `lora_delta_multi` serves projections that share their input (q/k/v, gate/up) with one shrink.
`pooled_lora_delta` is generation's: adapters read in place from a page pool through a per-forward table
(kernels/pooled.py). Within `GradSinks.active()` the LoRA backward adds the adapters' gradients into their own .grad
(kernels/grad_sink.py).
Setting LORAFLEET_TRITON=1 together with TRITON_INTERPRET=1 (before triton is first imported) runs the Triton kernels
on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import os

import torch

from lorafleet.kernels.frozen import DenseOnDemand, FrozenWeight, dense
from lorafleet.kernels.grad_sink import GradSinks
from lorafleet.kernels.pooled import (
    PooledLoraTable,
    check_pooled_inputs,
    pooled_lora_delta_torch,
    pooled_lora_table,
)
from lorafleet.kernels.reference import (
    LoraDropout,
    add_rms_norm_reference,
    check_add_rms_norm_inputs,
    check_lora_inputs,
    check_rms_norm_inputs,
    check_rotary_inputs,
    check_silu_mul_inputs,
    cross_entropy_rows_reference,
    dropout_keep_reference,
    dropout_reference,
    lora_delta_reference,
    pooled_lora_delta_reference,
    rms_norm_reference,
    rotary_reference,
    silu_mul_reference,
)

try:
    from lorafleet.kernels import cross_entropy, elementwise
    from lorafleet.kernels.baselines import grouped_mm_wins, lora_delta_grouped_mm
    from lorafleet.kernels.segmented import (
        lora_delta_multi_triton,
        lora_delta_triton,
        lora_linear_multi_triton,
        lora_linear_triton,
    )
    from lorafleet.kernels.triton_pooled import pooled_lora_delta_triton
except ImportError:  # no triton: the reference serves every device
    lora_delta_triton = lora_delta_multi_triton = lora_linear_triton = elementwise = cross_entropy = None
    pooled_lora_delta_triton = None


def triton_enabled(x: torch.Tensor) -> bool:
    if lora_delta_triton is None:
        return False
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LORAFLEET_TRITON") == "1"


def lora_delta(x, segments, lora_a, lora_b, scales, out=None, dropout=None):
    """Segmented multi-adapter LoRA delta (contract in reference.py); with `out`, added into `out` in place; with
    `dropout` (a `LoraDropout`), of the dropped x.

    On CUDA: torch._grouped_mm for the shapes where it measured faster (without dropout), the Triton kernels
    otherwise."""
    if triton_enabled(x):
        if dropout is None and grouped_mm_wins(x, segments, lora_a):
            check_lora_inputs(x, segments, lora_a, lora_b, scales)
            delta = lora_delta_grouped_mm(x, segments, lora_a, lora_b, scales)
            return delta if out is None else out.add_(delta)
        if out is not None and out._is_view() and out.requires_grad:
            # autograd replays an in-place change of a view through the op's first input; ours is not `out`.
            return out.add_(lora_delta_triton(x, segments, lora_a, lora_b, scales, dropout=dropout))
        return lora_delta_triton(x, segments, lora_a, lora_b, scales, out=out, dropout=dropout)
    check_lora_inputs(x, segments, lora_a, lora_b, scales)
    dropped = x if dropout is None else dropout_reference(x, segments, dropout)
    delta = lora_delta_reference(dropped, segments, lora_a, lora_b, scales)
    return delta if out is None else out.add_(delta)


def lora_delta_multi(x, segments, lora_as, lora_bs, scales, outs=None):
    """One delta per projection p from lora_as[p] / lora_bs[p], all reading the same x (see segmented.py)."""
    if triton_enabled(x):
        return lora_delta_multi_triton(x, segments, lora_as, lora_bs, scales, outs=outs)
    for lora_a, lora_b in zip(lora_as, lora_bs, strict=True):
        check_lora_inputs(x, segments, lora_a, lora_b, scales)
    deltas = [lora_delta_reference(x, segments, lora_a, lora_b, scales) for lora_a, lora_b in zip(lora_as, lora_bs)]
    return deltas if outs is None else [out.add_(delta) for out, delta in zip(outs, deltas)]


def pooled_lora_delta(x: torch.Tensor, pool: torch.Tensor, table: PooledLoraTable, layer: int,
                      out: torch.Tensor) -> torch.Tensor:
    """Adds into out [T, d_out] in place, and returns it, layer `layer`'s deltas of the adapters of `table`, their
    factors read from the flat `pool` (contract: `pooled_lora_delta_reference`). Forward only, for generation: no
    autograd. Elsewhere (the CPU) a loop over the segments reading the same offsets."""
    check_pooled_inputs(x, pool, table, layer, out)
    if triton_enabled(x):
        return pooled_lora_delta_triton(x, pool, table, layer, out)
    return pooled_lora_delta_torch(x, pool, table, layer, out)


def lora_linear(x, weight: FrozenWeight, bias, segments, lora_a, lora_b, scales, dropout=None):
    """A frozen linear layer plus its adapters' deltas, y = x Wᵀ + bias + lora_delta(x, ..., dropout), x [T, d_in];
    W a tensor [d_out, d_in] or a `DenseOnDemand` (on the Triton path materialised for each GEMM and never kept for the
    backward; the reference's F.linear keeps what it materialised, as autograd does).

    On the Triton path one autograd node forms the base output and the delta in one tensor, and the base dX and the
    LoRA dX in another, saving two passes over [T, d] tensors next to `F.linear(...) + lora_delta(...)`."""
    if triton_enabled(x):
        return lora_linear_triton(x, weight, bias, segments, lora_a, lora_b, scales, dropout=dropout)
    check_lora_inputs(x, segments, lora_a, lora_b, scales)
    dropped = x if dropout is None else dropout_reference(x, segments, dropout)
    delta = lora_delta_reference(dropped, segments, lora_a, lora_b, scales)
    return torch.nn.functional.linear(x, dense(weight), bias) + delta



def lora_linear_multi(x, weights, biases, segments, lora_as, lora_bs, scales):
    """Frozen linear layers that read the same x (q/k/v; gate/up), each plus its adapters' deltas: outputs
    [x W_pᵀ + biases[p] + lora_delta(x, segments, lora_as[p], lora_bs[p], scales) for each p]; each W_p a tensor or a
    `DenseOnDemand`.

    On the Triton path one autograd node reads x once for every projection's shrink and forms one input gradient that
    the base GEMMs accumulate into and the LoRA dX is added into in place."""
    if triton_enabled(x):
        return lora_linear_multi_triton(x, weights, biases, segments, lora_as, lora_bs, scales)
    outputs = []
    for weight, bias, lora_a, lora_b in zip(weights, biases, lora_as, lora_bs, strict=True):
        check_lora_inputs(x, segments, lora_a, lora_b, scales)
        delta = lora_delta_reference(x, segments, lora_a, lora_b, scales)
        outputs.append(torch.nn.functional.linear(x, dense(weight), bias) + delta)
    return outputs

# The frozen Llama layer's elementwise ops (contracts and Hugging Face formulas in reference.py). The Triton versions
# are looked up on the `elementwise` module at each call, so a test that re-imports it for the interpreter is served.

def rms_norm(x, weight, eps):
    """LlamaRMSNorm of x [..., d] with a frozen weight [d]; differentiable w.r.t. x."""
    if triton_enabled(x):
        return elementwise.rms_norm_triton(x, weight, eps)
    check_rms_norm_inputs(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(residual, delta, weight, eps):
    """(residual + delta, LlamaRMSNorm of it): a decoder's residual add and the norm that reads its sum, one kernel
    forward and one backward on the Triton path; differentiable w.r.t. residual and delta."""
    if triton_enabled(residual):
        return elementwise.add_rms_norm_triton(residual, delta, weight, eps)
    check_add_rms_norm_inputs(residual, delta, weight, eps)
    return add_rms_norm_reference(residual, delta, weight, eps)


def silu_mul(gate, up):
    """silu(gate) * up, both of one shape; differentiable w.r.t. both."""
    if triton_enabled(gate):
        return elementwise.silu_mul_triton(gate, up)
    check_silu_mul_inputs(gate, up)
    return silu_mul_reference(gate, up)


def rotary(x, cos, sin):
    """Rotary embedding of x [T, H, D] (may be a strided view) with cos/sin [T, D]; differentiable w.r.t. x."""
    if triton_enabled(x):
        return elementwise.rotary_triton(x, cos, sin)
    check_rotary_inputs(x, cos, sin)
    return rotary_reference(x, cos, sin)


def cross_entropy_rows(logits, targets, ignore_index, write_grad):
    """fp32 cross-entropy of each row of logits [R, V] (0 where the target is ignore_index); with write_grad, logits
    overwritten in place by softmax - onehot (the LM-head loss's gradient w.r.t. its logits)."""
    if triton_enabled(logits):
        return cross_entropy.cross_entropy_rows_triton(logits, targets, ignore_index, write_grad)
    return cross_entropy_rows_reference(logits, targets, ignore_index, write_grad)


__all__ = [
    "DenseOnDemand",
    "FrozenWeight",
    "GradSinks",
    "LoraDropout",
    "add_rms_norm",
    "add_rms_norm_reference",
    "check_lora_inputs",
    "cross_entropy_rows",
    "cross_entropy_rows_reference",
    "dropout_keep_reference",
    "dropout_reference",
    "lora_delta",
    "lora_delta_multi",
    "lora_delta_reference",
    "lora_delta_triton",
    "lora_linear",
    "lora_linear_multi",
    "pooled_lora_delta",
    "pooled_lora_delta_reference",
    "pooled_lora_table",
    "PooledLoraTable",
    "rms_norm",
    "rms_norm_reference",
    "rotary",
    "rotary_reference",
    "silu_mul",
    "silu_mul_reference",
    "triton_enabled",
]
