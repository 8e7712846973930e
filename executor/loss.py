"""LM head + cross-entropy over row chunks: per-token losses without the [T, vocab] logits of the whole cohort.

With a 128k vocabulary the fp32 logits of a 32k-token cohort are 16 GB. `token_losses` multiplies the final hidden
states by the (frozen) head a chunk of rows at a time, keeps only each row's log-sum-exp, and in backward recomputes
each chunk's logits to form (softmax - onehot) · W for the hidden-state gradient. Logits are formed in the compute
dtype and upcast to fp32 as the full-logits path (`F.cross_entropy(logits.float())`) does, so the two agree.
"""

from __future__ import annotations

import torch

from lorafleet.executor.data import IGNORE_INDEX

LOGIT_CHUNK_ELEMENTS = 2**28  # fp32 logits of one chunk: 1 GiB


def chunk_rows(vocab_size: int) -> int:
    return max(1, LOGIT_CHUNK_ELEMENTS // vocab_size)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows_per_chunk):
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logsumexp = torch.zeros_like(losses)
        for start in range(0, hidden.shape[0], rows_per_chunk):
            end = start + rows_per_chunk
            logits = (hidden[start:end] @ weight.T).float()
            lse = logits.logsumexp(-1)
            chunk_targets = targets[start:end]
            picked = logits.gather(1, chunk_targets.clamp(min=0).unsqueeze(1)).squeeze(1)
            losses[start:end] = torch.where(chunk_targets != IGNORE_INDEX, lse - picked, 0.0)
            logsumexp[start:end] = lse
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.rows_per_chunk = rows_per_chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], ctx.rows_per_chunk):
            end = start + ctx.rows_per_chunk
            chunk_targets = targets[start:end]
            valid = chunk_targets != IGNORE_INDEX
            probs = ((hidden[start:end] @ weight.T).float() - logsumexp[start:end, None]).exp_()
            # minus the one-hot of each valid row's target, without a host sync (no boolean indexing)
            probs.scatter_add_(1, chunk_targets.clamp(min=0)[:, None], -valid.to(probs.dtype)[:, None])
            probs *= torch.where(valid, grad_losses[start:end], 0.0)[:, None]
            grad_hidden[start:end] = probs.to(hidden.dtype) @ weight
        return grad_hidden, None, None, None


def token_losses(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of hidden [T, d] through the frozen head [vocab, d]: fp32 [T], 0 where ignored."""
    if head_weight.requires_grad:
        raise ValueError("chunked head loss needs a frozen LM head (it computes no weight gradient)")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    return _ChunkedHeadLoss.apply(hidden, head_weight, targets, chunk_rows(head_weight.shape[0]))


def chunked_head_loss_applies(model) -> bool:
    """Whether the model's logits are just its frozen, bias-free linear head on the decoder's last hidden state."""
    head = getattr(model, "lm_head", None)
    config = model.config
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) in (None, 1.0)
    )
