"""The LM-head cross-entropy kernel (kernels/cross_entropy.py) under TRITON_INTERPRET=1 against a float64 evaluation
of F.cross_entropy, and its dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers_triton import interpreted
from lorafleet.kernels import cross_entropy_rows, cross_entropy_rows_reference

cross_entropy = pytest.importorskip("lorafleet.kernels.cross_entropy")

IGNORE = -100


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted(cross_entropy):
        yield


def problem(rows, vocab, dtype, seed, scale=4.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::3] = IGNORE
    return logits, targets


def float64_truth(logits, targets):
    """Losses and d(sum of losses)/d logits of F.cross_entropy in float64 on the same (rounded) logits."""
    upcast = logits.double().requires_grad_()
    losses = F.cross_entropy(upcast, targets, ignore_index=IGNORE, reduction="none")
    losses.sum().backward()
    return losses.detach(), upcast.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [37, 5000, 9000])  # under one block, a partial last block, several blocks
def test_losses_and_gradient_match_float64(dtype, vocab):
    logits, targets = problem(6, vocab, dtype, seed=vocab)
    want_losses, want_grad = float64_truth(logits, targets)
    grad = logits.clone()
    losses = cross_entropy.cross_entropy_rows_triton(grad, targets, IGNORE, write_grad=True)
    assert losses.dtype == torch.float32 and not torch.isnan(losses).any()
    torch.testing.assert_close(losses.double(), want_losses, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one rounding to the dtype
    assert ((grad.double() - want_grad).norm() / want_grad.norm()).item() < tolerance


def test_an_ignored_row_has_zero_loss_and_zero_gradient_everywhere():
    logits, targets = problem(4, 300, torch.bfloat16, seed=1)
    targets[:] = IGNORE
    grad = logits.clone()
    losses = cross_entropy.cross_entropy_rows_triton(grad, targets, IGNORE, write_grad=True)
    assert losses.abs().max().item() == 0 and grad.abs().max().item() == 0


def test_without_a_gradient_the_logits_are_left_as_they_are():
    logits, targets = problem(3, 700, torch.bfloat16, seed=2)
    kept = logits.clone()
    losses = cross_entropy.cross_entropy_rows_triton(logits, targets, IGNORE, write_grad=False)
    assert torch.equal(logits, kept)
    torch.testing.assert_close(losses.double(), float64_truth(kept, targets)[0], rtol=1e-5, atol=1e-5)


def test_dispatch_runs_the_reference_on_cpu_unless_asked(monkeypatch):
    logits, targets = problem(5, 400, torch.bfloat16, seed=3)
    monkeypatch.delenv("LORAFLEET_TRITON", raising=False)
    got, want = logits.clone(), logits.clone()
    assert torch.equal(cross_entropy_rows(got, targets, IGNORE, True), cross_entropy_rows_reference(want, targets, IGNORE, True))
    assert torch.equal(got, want)


@pytest.mark.parametrize("call, match", [
    (lambda: cross_entropy_rows(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), IGNORE, True), r"\[rows, vocab\]"),
    (lambda: cross_entropy_rows(torch.zeros(4, 3).T, torch.zeros(3, dtype=torch.long), IGNORE, True), "contiguous rows"),
    (lambda: cross_entropy_rows(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32), IGNORE, True), "int64"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()

