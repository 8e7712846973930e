"""The adapters' weight gradients added by the LoRA backward's own kernels straight into each adapter's `.grad`.

Autograd adds each leaf's gradient into its `.grad` with a kernel of its own (AccumulateGrad). The segmented LoRA
backward (segmented.py) forms every adapter's dA and dB of a layer in one stacked fp32 tensor, which autograd then
adds adapter by adapter: on a graphed 1B cohort of 8 jobs 1,801 small adds a step, 2.9 ms of GPU time besides their
launches and the stacks' zeroing (run P13's trace, docs/BENCHMARKS.md). Within `GradSinks.active()` the backward's
kernels add into the `.grad` tensors themselves, through a table of row addresses per gradient stack, and the node
returns no gradient for those leaves: 4.8 ms off that step on an H100 (run H23), 2,274 kernels instead of 4,242.

A table (int64 [n_adapters, R + 1]): entry [j, r] the address of row r of adapter j's gradient as the kernel writes
it (0: a padding row of the rank, or a leaf that takes no gradient: nothing is written), entry [j, R] the stride
between that row's columns, in elements (dA's rows are contiguous: its kernel is passed the stride 1 instead, which
the compiler can vectorise). Tables are built on the first backward that needs them and kept as long as
the `GradSinks` object: a CUDA graph captured with them reads them on every replay. A frozen `GradSinks` (the capture
itself) builds none: copying a new table to the device inside a capture would replay a copy of freed host memory.

A leaf takes part only where its `.grad` exists as an fp32, contiguous tensor of its shape (a step graph's gradient
buffers); a node with any other leaf that needs a gradient keeps autograd's way for all of its leaves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_current = threading.local()


@dataclass(frozen=True)
class GradRows:
    """How a stacked gradient's rows map onto leaves: for adapter j, projection p's leaf `leaves[p][j]` gives rows
    offsets[p] + i for i < its rank; `transposed` when the stack holds the leaf's transpose (B [d_out, r] kept as
    Bᵀ [r, d_out]): row i then starts at element i and its columns are the rank apart, else at i · d_in, columns 1
    apart."""

    offsets: tuple[int, ...]
    padded_rank: int
    transposed: bool


class GradSinks:
    def __init__(self):
        self._tables: dict[tuple, torch.Tensor] = {}
        self.frozen = False

    def __len__(self) -> int:
        """How many tables it built."""
        return len(self._tables)

    @contextmanager
    def active(self, frozen: bool = False) -> Iterator[GradSinks]:
        """The backward of a LoRA node whose forward ran in this thread within it adds the weight gradients into the
        leaves' `.grad` (on a GPU autograd runs backwards in threads of its own); frozen, every table it needs must
        have been built already (see the module docstring)."""
        previous, _current.sinks = getattr(_current, "sinks", None), self
        self.frozen = frozen
        try:
            yield self
        finally:
            _current.sinks = previous

    def table(self, leaves: list[list[torch.Tensor | None]], rows: GradRows) -> torch.Tensor | None:
        """The table for a stack whose projection p, adapter j rows belong to `leaves[p][j]` (None: a leaf that
        takes no gradient); None when some leaf's `.grad` cannot take the kernel's adds."""
        grads = [[_sink_grad(leaf) for leaf in projection] for projection in leaves]
        if any(leaf is not None and grad is None for projection, grad_row in zip(leaves, grads)
               for leaf, grad in zip(projection, grad_row)):
            return None
        key = (rows, tuple((grad.data_ptr(), tuple(grad.shape)) if grad is not None else None
                           for projection in grads for grad in projection))
        table = self._tables.get(key)
        if table is None:
            if self.frozen:
                raise RuntimeError("a LoRA gradient table was not built before the CUDA graph capture: its backward "
                                   "met gradients the warm-up did not")
            device = next(grad.device for projection in grads for grad in projection if grad is not None)
            table = self._tables[key] = torch.tensor(_table_rows(grads, rows), dtype=torch.int64).to(device)
        return table


def current() -> GradSinks | None:
    """The `GradSinks` active in this thread, if any."""
    return getattr(_current, "sinks", None)


def _sink_grad(leaf: torch.Tensor | None) -> torch.Tensor | None:
    grad = None if leaf is None else leaf.grad
    if grad is None or grad.dtype != torch.float32 or grad.shape != leaf.shape or not grad.is_contiguous():
        return None
    return grad


def _table_rows(grads: list[list[torch.Tensor | None]], rows: GradRows) -> list[list[int]]:
    n_adapters = len(grads[0])
    table = [[0] * (rows.padded_rank + 1) for _ in range(n_adapters)]
    for offset, projection in zip(rows.offsets, grads):
        for j, grad in enumerate(projection):
            if grad is None:
                continue
            rank = grad.shape[1] if rows.transposed else grad.shape[0]
            row_step, column_step = (1, rank) if rows.transposed else (grad.shape[1], 1)
            for i in range(rank):
                table[j][offset + i] = grad.data_ptr() + i * row_step * grad.element_size()
            table[j][rows.padded_rank] = column_step
    return table
