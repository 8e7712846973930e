"""LM head + cross-entropy over row chunks: per-token losses without the [T, vocab] logits of the whole cohort.

With a 128k vocabulary the fp32 logits of a 32k-token cohort are 16 GB. `token_losses` multiplies the final hidden
states by the (frozen) head a chunk of rows at a time and keeps, per row, only its loss and the gradient of that loss
w.r.t. its hidden state, (softmax - onehot) · W, formed while the chunk's logits are at hand. The upstream gradient of
a per-token loss is one number per row (the job's 1 / targets), so the backward is a row scaling of that saved
[T, d] tensor: no second pass of logits. Logits are formed in the compute dtype; their loss and gradient are computed
in fp32 by `kernels.cross_entropy_rows` (one Triton kernel per chunk on a GPU), as the full-logits path
(`F.cross_entropy(logits.float())`) computes them, so the two agree. Without a gradient (evaluation) only the losses
are formed.

Gemma-2 caps its logits, cap * tanh(logits / cap) (`final_logit_softcapping`), in the compute dtype as its model does;
the chunk then takes the cap's derivative, 1 - tanh², into its gradient before the product with the head. So every
family with a plain head takes this path, and the memory model counts no [T, vocab] logits for any of them.
"""

from __future__ import annotations

import torch

from lorafleet.executor.data import IGNORE_INDEX
from lorafleet.kernels import cross_entropy_rows

LOGIT_CHUNK_ELEMENTS = 2**28  # fp32 logits of one chunk: 1 GiB


def chunk_rows(vocab_size: int) -> int:
    return max(1, LOGIT_CHUNK_ELEMENTS // vocab_size)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows_per_chunk, softcap):
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # d loss_t / d hidden_t
        for start in range(0, hidden.shape[0], rows_per_chunk):
            end = start + rows_per_chunk
            logits = hidden[start:end] @ weight.T
            tanh = None
            if softcap is not None:  # HF's order: / cap, tanh, * cap; in place, two chunks of logits at a time
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            # fp32 losses; with a gradient, the logits become softmax - onehot in place (one kernel on a GPU)
            losses[start:end] = cross_entropy_rows(logits, targets[start:end], IGNORE_INDEX, grad_rows is not None)
            if grad_rows is not None:
                if tanh is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh²
                    logits.mul_(tanh.mul_(tanh).neg_().add_(1))
                grad_rows[start:end] = logits @ weight
        ctx.save_for_backward(grad_rows)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_rows,) = ctx.saved_tensors
        return (grad_rows.float() * grad_losses[:, None]).to(grad_rows.dtype), None, None, None, None


def token_losses(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                 softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of each row of hidden [T, d] through the frozen head [vocab, d]: fp32 [T], 0 where ignored.
    `softcap`: the logits are cap * tanh(logits / cap) (the model's `logit_softcap`)."""
    if head_weight.requires_grad:
        raise ValueError("chunked head loss needs a frozen LM head (it computes no weight gradient)")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    return _ChunkedHeadLoss.apply(hidden, head_weight, targets, chunk_rows(head_weight.shape[0]), softcap)


def chunked_head_loss_applies(model) -> bool:
    """Whether the model's logits are just its frozen, bias-free linear head on the decoder's last hidden state."""
    head = getattr(model, "lm_head", None)
    config = model.config
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and getattr(config, "logit_scale", None) in (None, 1.0)
    )


def logit_softcap(model) -> float | None:
    """The cap of the model's logits, cap * tanh(logits / cap) (Gemma-2's `final_logit_softcapping`), or None."""
    return getattr(model.config, "final_logit_softcapping", None) or None
