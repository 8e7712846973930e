"""Cross-entropy of LM-head logits, one Triton kernel per chunk of rows: the loss, and the gradient in place.

The chunked head loss (executor/loss.py) forms a chunk's logits [R, V] in the compute dtype, then needs each row's
loss and softmax - onehot. In eager PyTorch that is an fp32 upcast, logsumexp, a gather, a subtraction, exp, a scatter,
a mask and a cast back: eight passes over R x V elements, most of them in fp32 (45 ms of the 8B 8 x 4x512 step on the
H200, docs/BENCHMARKS.md). Here one program per row reads the row twice (a running max and sum of exponentials, then
the gradient) and writes the gradient once over the logits, in the logits' dtype: 3 x 2 bytes per element in bf16.
The math is the reference's (`cross_entropy_rows_reference`), fp32 inside; only the order of the exponential sums
differs.

Like elementwise.py, the kernel calls only Triton builtins and tl.reduce with combine functions of this module, so
the tests can re-import it under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafleet.kernels.reference import check_cross_entropy_inputs

BLOCK = 4096


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, losses_ptr, n_cols, stride_row, ignore_index,
                               WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    columns = tl.arange(0, BLOCK)
    # the running max starts at -1e30, not -inf: exp(-inf - -inf) would be NaN on lanes past the row's end
    running_max = tl.full((BLOCK,), -1.0e30, tl.float32)
    running_sum = tl.full((BLOCK,), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + columns < n_cols
        x = tl.load(base + start + columns, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max)
        running_max = new_max
    row_max = tl.reduce(running_max, 0, _max)
    lse = row_max + tl.log(tl.reduce(running_sum * tl.exp(running_max - row_max), 0, _add))
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    target_logit = tl.load(base + safe_target).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK):
            mask = start + columns < n_cols
            x = tl.load(base + start + columns, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + columns == safe_target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(base + start + columns, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              write_grad: bool) -> torch.Tensor:
    """`cross_entropy_rows_reference`'s contract (reference.py): fp32 losses [R]; with write_grad, logits overwritten
    with softmax - onehot."""
    check_cross_entropy_inputs(logits, targets)
    rows, n_cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(BLOCK, triton.next_power_of_2(n_cols))
        _cross_entropy_rows_kernel[(rows,)](logits, targets, losses, n_cols, logits.stride(0), ignore_index,
                                            WRITE_GRAD=write_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return losses


INTERPRETED = type(_cross_entropy_rows_kernel).__name__ == "InterpretedFunction"
