"""The LoRA backward adding the adapters' gradients straight into their own .grad (kernels/grad_sink.py), on Triton's
interpreter (CPU) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from helpers_triton import interpreted
from lorafleet.kernels import GradSinks, lora_delta_reference

triton_lora = pytest.importorskip("lorafleet.kernels.triton_lora")
from lorafleet.kernels.segmented import lora_delta_multi_triton  # noqa: E402

SEGMENTS = [(0, 20), (25, 45)]
SCALES = [2.0, 0.5]
WIDTHS = [32, 16, 8]  # q/k/v-like: three projections of one input, their own output widths
RANKS = [[4, 16], [2, 8], [1, 1]]  # per projection, per adapter: padded to 16 each, the A stack to 64 rows


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted(triton_lora):
        yield


def make_case(seed: int):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator).requires_grad_()
    x = randn(45, 32)
    lora_as = [[randn(r, 32) for r in ranks] for ranks in RANKS]
    lora_bs = [[randn(width, r) for r in ranks] for width, ranks in zip(WIDTHS, RANKS)]
    grads_out = [torch.randn(45, width, generator=generator) for width in WIDTHS]
    return x, lora_as, lora_bs, grads_out


def reference_grads(x, lora_as, lora_bs, grads_out) -> list[torch.Tensor]:
    """Float64 gradients of every adapter leaf (A's projection-major, then B's)."""
    leaves = [t.detach().double().requires_grad_() for group in lora_as + lora_bs for t in group]
    n = len(leaves) // 2
    per_projection = lambda flat: [flat[2 * p:2 * p + 2] for p in range(len(WIDTHS))]
    deltas = [lora_delta_reference(x.detach().double(), SEGMENTS, a, b, SCALES)
              for a, b in zip(per_projection(leaves[:n]), per_projection(leaves[n:]))]
    return list(torch.autograd.grad(deltas, leaves, [g.double() for g in grads_out]))


def backward(x, lora_as, lora_bs, grads_out, sinks: GradSinks | None, frozen: bool = False) -> list[str]:
    """One forward and backward; returns the leaves autograd handed a gradient to (their hooks saw one)."""
    leaves = [t for group in lora_as + lora_bs for t in group]
    handed = []
    for i, leaf in enumerate(leaves):
        if leaf.requires_grad:
            leaf.register_hook(lambda grad, i=i: None if grad is None else handed.append(i))
    if sinks is None:
        torch.autograd.backward(lora_delta_multi_triton(x, SEGMENTS, lora_as, lora_bs, SCALES), grads_out)
    else:
        with sinks.active(frozen=frozen):
            torch.autograd.backward(lora_delta_multi_triton(x, SEGMENTS, lora_as, lora_bs, SCALES), grads_out)
    return handed


def test_in_a_sink_the_backward_adds_each_adapters_gradients_into_its_own_grad():
    x, lora_as, lora_bs, grads_out = make_case(seed=1)
    lora_as[1][0].requires_grad_(False)  # a leaf that takes no gradient: its rows are skipped
    leaves = [t for group in lora_as + lora_bs for t in group]
    pending = [torch.randn(leaf.shape) if leaf.requires_grad else None for leaf in leaves]
    for leaf, grad in zip(leaves, pending):
        leaf.grad = None if grad is None else grad.clone()  # a window's earlier micro-batch
    handed = backward(x, lora_as, lora_bs, grads_out, GradSinks())
    assert handed == [], "autograd added gradients of its own"
    want = reference_grads(x, lora_as, lora_bs, grads_out)
    for i, (leaf, before, grad) in enumerate(zip(leaves, pending, want)):
        if before is None:
            assert leaf.grad is None
            continue
        error = (leaf.grad.double() - before.double() - grad).norm() / grad.norm()
        assert error < 1e-5, (i, error.item())
    assert x.grad is not None  # the input's gradient is autograd's as ever


def test_a_node_with_a_leaf_whose_grad_cannot_take_the_adds_keeps_autograds_way():
    x, lora_as, lora_bs, grads_out = make_case(seed=2)
    leaves = [t for group in lora_as + lora_bs for t in group]
    for leaf in leaves[1:]:
        leaf.grad = torch.zeros(leaf.shape)
    # leaves[0] has no .grad: nothing for the kernel to add into
    handed = backward(x, lora_as, lora_bs, grads_out, GradSinks())
    assert sorted(handed) == list(range(len(leaves)))
    for leaf, grad in zip(leaves, reference_grads(x, lora_as, lora_bs, grads_out)):
        assert (leaf.grad.double() - grad).norm() / grad.norm() < 1e-5


def test_a_frozen_sink_adds_through_the_tables_built_before_and_builds_none():
    x, lora_as, lora_bs, grads_out = make_case(seed=3)
    leaves = [t for group in lora_as + lora_bs for t in group]
    for leaf in leaves:
        leaf.grad = torch.zeros(leaf.shape)
    with pytest.raises(RuntimeError, match="not built before the CUDA graph capture"):
        backward(x, lora_as, lora_bs, grads_out, GradSinks(), frozen=True)
    for leaf in leaves:
        leaf.grad.zero_()
    sinks = GradSinks()
    backward(x, lora_as, lora_bs, grads_out, sinks)  # the warm-up: builds the tables
    handed = backward(x, lora_as, lora_bs, grads_out, sinks, frozen=True)  # the capture: finds them
    assert handed == []
    for leaf, grad in zip(leaves, reference_grads(x, lora_as, lora_bs, grads_out)):
        assert (leaf.grad.double() - 2 * grad).norm() / grad.norm() < 1e-5


def test_the_backward_adds_through_the_sink_its_forward_ran_in_whatever_thread_runs_it():
    """On a GPU autograd runs a backward in a thread of its own, outside the forward's `active()` context."""
    import threading

    x, lora_as, lora_bs, grads_out = make_case(seed=4)
    leaves = [t for group in lora_as + lora_bs for t in group]
    for leaf in leaves:
        leaf.grad = torch.zeros(leaf.shape)
    sinks = GradSinks()
    with sinks.active():
        deltas = lora_delta_multi_triton(x, SEGMENTS, lora_as, lora_bs, SCALES)
    thread = threading.Thread(target=torch.autograd.backward, args=(deltas, grads_out))
    thread.start()
    thread.join()
    assert len(sinks) == 1 + len(WIDTHS)  # one dA table and a dB table per projection
    for leaf, grad in zip(leaves, reference_grads(x, lora_as, lora_bs, grads_out)):
        assert (leaf.grad.double() - grad).norm() / grad.norm() < 1e-5
