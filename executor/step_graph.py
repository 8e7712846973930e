"""A cohort step's forward and backward as one CUDA graph: the host launches it in one call instead of thousands.

A small cohort step is host-bound: one 8B job of 512 tokens spends ~0.23 s in Python and kernel launches for ~0.04 s
of GPU work (docs/BENCHMARKS.md). `StepGraphs` captures the whole forward and backward of a one-pass step (decoder,
LoRA kernels, flash attention, chunked head loss, the adapters' gradients) with `torch.cuda.graph` and replays it on
later steps with the same layout:

- each job's rows are padded to a bucket (`bucket_rows`: fewer than 64 rows or 1/16 more) by one more sequence of
  ignored targets inside the job's own segment, so segments, and with them every launch's grid, stay the same from
  step to step while the sequence lengths inside move; padded rows get no loss, hence no gradient;
- the token ids, targets, positions and sequence boundaries are copied into the graph's static buffers (one copy),
  and so are the jobs' loss weights 1 / (targets · window) (a device tensor, not numbers baked into the graph); the
  cohort packs them ahead, while the GPU runs the step before (`pack_ahead`), and a step whose pass holds other
  examples than those packed packs its own;
- the adapters' gradients live in buffers of the graph's own: the captured backward adds into them as a second
  micro-batch of a window adds into the first's, so gradient accumulation replays too; before a replay each job's
  `.grad` is pointed at its buffer (zeroed at a window's start, or holding what an eager step left). The LoRA
  backward's kernels add into them themselves (kernels/grad_sink.py), not autograd's add per adapter tensor;
- the optimizer and the step's one host sync stay outside the graph.

A layout is captured when a step repeats the previous step's layout (jobs, padded rows, number of sequences, longest
sequence's power of two), so data whose layout changes every step keeps running eagerly rather than capturing every
step. One graph is held at a time (its memory pool holds a step's activations); a new layout or a job leaving drops it.
Steps the graph cannot express run eagerly: several passes, preference pairs, dropout, DoRA, adapters other than LoRA,
MoE experts (their routing is data-dependent), checkpointed layers, int8 bases (bitsandbytes' int8 matmul keeps
host-side state per call), CPU tensors. An nf4 base is captured: its dequantization is stream-ordered kernels alone.
A capture that fails runs the step eagerly, with a warning, and is tried again after `CaptureBackoff`'s wait: a
capture can fail for a passing reason (memory short for the graph's pool, another thread's CUDA call at the wrong
moment); one that fails `CAPTURE_ATTEMPTS` times fails for good (some module syncs with the host) and turns graphs off
for the cohort.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch

from lorafleet.executor.activations import recomputes
from lorafleet.executor.adapters import LoraAdapter
from lorafleet.executor.model import decoder_layers, packing_kwargs
from lorafleet.executor.optim import JobOptimizer
from lorafleet.kernels import GradSinks


GRAPHED_QUANTIZATION = ("none", "nf4")


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of max(64, a power of two ≤ rows / 16): under 64 rows or 1/16 of padding."""
    granularity = max(64, 1 << max(0, rows.bit_length() - 5))
    return -(-rows // granularity) * granularity


def length_bucket(longest: int) -> int:
    """The attention's longest-sequence bound: the next power of two (flash attention sizes its grid by it)."""
    return max(16, 1 << max(0, longest - 1).bit_length())


CAPTURE_ATTEMPTS = 3
FIRST_RETRY_AFTER = 16  # capturable steps run eagerly after the first failure; doubled after each later one


@dataclass
class CaptureBackoff:
    """When a failed capture is tried again: after `FIRST_RETRY_AFTER` capturable steps, then twice as many, until
    `CAPTURE_ATTEMPTS` captures failed."""

    failures: int = 0
    wait: int = 0

    def ready(self) -> bool:
        """Called once for each step that could capture: whether this one may."""
        if self.wait == 0:
            return True
        self.wait -= 1
        return False

    def failed(self) -> bool:
        """A capture failed; whether that was the last attempt."""
        self.failures += 1
        self.wait = FIRST_RETRY_AFTER << (self.failures - 1)
        return self.failures >= CAPTURE_ATTEMPTS


@dataclass(frozen=True)
class GraphLayout:
    jobs: tuple[str, ...]
    rows: tuple[int, ...]  # each job's padded rows, in order
    sequences: int
    max_length: int


@dataclass
class _GradBuffers:
    """A job's parameters (its optimizer's that take gradients, in its order) and their gradients' buffers: views
    of one flat tensor, zeroed by one kernel (the optimizer's `zero_grad` while the graph holds them), laid out as
    the optimizer's flat parameters (optim.py's `FlatAdamW`), so its update reads them in place."""

    params: list[torch.Tensor]
    views: list[torch.Tensor]
    flat: torch.Tensor
    optimizer: JobOptimizer

    @classmethod
    def of(cls, optimizer: JobOptimizer) -> _GradBuffers:
        params = [param for param in optimizer.params if param.requires_grad]
        flat = torch.zeros(sum(param.numel() for param in params), dtype=params[0].dtype, device=params[0].device)
        views = [chunk.view_as(param) for chunk, param in zip(flat.split([param.numel() for param in params]), params)]
        return cls(params, views, flat, optimizer)

    def adopt(self) -> None:
        """Point each parameter's .grad at its view, the view holding what .grad held (zero for None); from then on
        the optimizer clears the grads by zeroing the views."""
        held = [param.grad for param in self.params]
        if all(map(operator.is_, held, self.views)):  # the usual case: compared in C, no generator per job
            return
        if all(grad is None for grad in held):  # a new window: the usual case
            self.flat.zero_()
        else:
            torch._foreach_zero_([view for grad, view in zip(held, self.views) if grad is not view])
            carried = [(view, grad) for grad, view in zip(held, self.views) if grad is not None and grad is not view]
            if carried:
                torch._foreach_add_([view for view, _ in carried], [grad for _, grad in carried])
        for param, view in zip(self.params, self.views):
            param.grad = view
        self.optimizer.grad_buffer = self.flat

    def release(self) -> None:
        """The graph is gone: a pending gradient becomes a tensor of its own, and the optimizer clears to None."""
        for param, view in zip(self.params, self.views):
            if param.grad is view:
                param.grad = view.clone()
        self.optimizer.grad_buffer = None


@dataclass(frozen=True)
class _HostInputs:
    """One pass's graph layout and static inputs on the host, packed from `examples` (job id -> its Example objects,
    in order)."""

    examples: dict[str, tuple]
    layout: GraphLayout
    tokens: torch.Tensor  # int64: see `_Captured.tokens`

    @classmethod
    def pack(cls, examples: dict[str, list]) -> _HostInputs:
        from lorafleet.executor.cohort import pack  # the cohort module imports this one

        batch = pack(examples, "cpu", pad_rows=bucket_rows)
        layout = GraphLayout(tuple(batch.rows), tuple(end - start for start, end in batch.rows.values()),
                             len(batch.sequence_lengths), length_bucket(max(batch.sequence_lengths)))
        return cls({job_id: tuple(micro_batch) for job_id, micro_batch in examples.items()}, layout,
                   _static_inputs(batch))

    def holds(self, examples: dict[str, list]) -> bool:
        """Whether these are the examples it was packed from: the same jobs in the same order, each with the same
        Example objects in the same order (by identity: packing reads nothing else)."""
        return list(self.examples) == list(examples) and all(
            len(mine) == len(theirs) and all(map(operator.is_, mine, theirs))
            for mine, theirs in zip(self.examples.values(), examples.values()))


@dataclass
class _Captured:
    layout: GraphLayout
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # int64 [3T + sequences + 1]: ids, targets, positions, boundaries (the static inputs)
    weights: torch.Tensor  # fp32 [jobs]: each job's loss weight
    sums: dict[str, torch.Tensor]  # job id -> its loss sum, written by each replay
    grads: dict[str, _GradBuffers]
    sinks: GradSinks  # the tables of gradient addresses the graph's LoRA backward reads


class StepGraphs:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.captured: _Captured | None = None
        self.last_layout: GraphLayout | None = None
        self.replays = 0  # steps run through a graph, for tests and benchmarks
        self.packed_ahead = 0  # of them, those whose inputs `pack_ahead` had packed
        self.backoff = CaptureBackoff()
        self.ahead: _HostInputs | None = None

    def use(self, cohort, passes: list[dict]) -> bool:
        """Whether this step may run as a graph; when not, a graph held is dropped (its memory is the eager step's)."""
        if self._applies(cohort, passes):
            return True
        self.drop()
        self.last_layout = None
        return False

    def _applies(self, cohort, passes: list[dict]) -> bool:
        """See the module's docstring for what a graph cannot express."""
        if (not self.enabled or cohort.device.type != "cuda" or cohort.quantization not in GRAPHED_QUANTIZATION
                or len(passes) != 1):
            return False
        if any(recomputes(layer) for layer in decoder_layers(cohort.model)):  # checkpointed layers
            return False
        for job_id in passes[0]:
            job = cohort.jobs[job_id]
            adapter = job.adapter
            if (job.spec.method != "sft" or type(adapter) is not LoraAdapter or adapter.use_dora
                    or job.spec.adapter.target_parameters or (adapter.dropout > 0 and adapter.training)):
                return False
        return True

    def pack_ahead(self, examples: dict[str, list]) -> None:
        """Pack the next step's pass (job id -> the micro-batch read ahead) while the GPU still runs this step: on a
        1B 8 x 4x512 cohort packing is ~4.5 of the ~14 ms the GPU waits on the host a graphed step, profiled (run
        P13). `run` takes it when its pass holds the same examples."""
        self.ahead = _HostInputs.pack(examples)

    def run(self, cohort, examples: dict, weights: dict[str, float]) -> dict[str, torch.Tensor] | None:
        """Forward and backward of the one pass `examples` (job id -> its micro-batch) through the graph, each job's
        loss weighted by `weights`; returns job id -> its loss sum (the graph's buffers: read them before the next
        step). None when the layout is new this step (the caller runs the step eagerly) or capture failed."""
        ahead, self.ahead = self.ahead, None
        inputs = ahead if ahead is not None and ahead.holds(examples) else _HostInputs.pack(examples)
        layout, tokens = inputs.layout, inputs.tokens
        repeated, self.last_layout = layout == self.last_layout, layout
        if self.captured is not None and self.captured.layout != layout:
            self.drop()
        if self.captured is None and not repeated:
            return None
        weight_values = torch.tensor([weights[job_id] for job_id in layout.jobs], dtype=torch.float32)
        if self.captured is None:
            if not self.backoff.ready():
                return None
            try:
                self.captured = _capture(cohort, layout, tokens.to(cohort.device), weight_values.to(cohort.device))
            except RuntimeError as exc:
                self._capture_failed(exc)
                return None
        captured = self.captured
        captured.tokens.copy_(tokens, non_blocking=True)
        captured.weights.copy_(weight_values, non_blocking=True)
        for buffers in captured.grads.values():
            buffers.adopt()
        captured.graph.replay()
        self.replays += 1
        self.packed_ahead += inputs is ahead
        return dict(captured.sums)

    def _capture_failed(self, exc: RuntimeError) -> None:
        if self.backoff.failed():
            self.enabled = False
            then = "running eagerly from now on"
        else:
            then = f"running eagerly, trying again in {self.backoff.wait} steps"
        warnings.warn(f"CUDA graph capture of the cohort step failed ({self.backoff.failures} of {CAPTURE_ATTEMPTS}), "
                      f"{then}: {exc}", RuntimeWarning, stacklevel=3)

    def forget(self, job_id: str) -> None:
        """A job left the cohort: drop a graph that holds it."""
        if self.captured is not None and job_id in self.captured.layout.jobs:
            self.drop()

    def drop(self) -> None:
        """Forget the captured graph (a job left, or the layout changed); its memory goes back once unused."""
        if self.captured is not None:
            for buffers in self.captured.grads.values():
                buffers.release()
            self.captured = None
            torch.cuda.empty_cache()


def _static_inputs(batch) -> torch.Tensor:
    """One int64 host tensor holding the graph's inputs: ids, targets, positions, boundaries (see `_Captured`)."""
    packing = packing_kwargs(batch.sequence_lengths, "cpu")
    return torch.cat([batch.input_ids[0], batch.targets, packing["position_ids"][0], packing["cu_seq_lens_q"]])


def _static_batch(batch_type, layout: GraphLayout, tokens: torch.Tensor):
    """The PackedBatch whose tensors are views of the static inputs."""
    n_rows = sum(layout.rows)
    ids, targets, positions, boundaries = tokens.split([n_rows, n_rows, n_rows, layout.sequences + 1])
    rows, start = {}, 0
    for job_id, count in zip(layout.jobs, layout.rows):
        rows[job_id] = (start, start + count)
        start += count
    packing = {"position_ids": positions.view(1, -1), "cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries,
               "max_length_q": layout.max_length, "max_length_k": layout.max_length}
    return batch_type(ids.view(1, -1), targets, [], rows, {}, {}, packing=packing)


def _capture(cohort, layout: GraphLayout, tokens: torch.Tensor, weights: torch.Tensor) -> _Captured:
    from lorafleet.executor.cohort import PackedBatch

    batch = _static_batch(PackedBatch, layout, tokens)
    jobs = {job_id: cohort.jobs[job_id] for job_id in layout.jobs}
    grads = {job_id: _GradBuffers.of(job.optimizer) for job_id, job in jobs.items()}

    def forward_backward() -> dict[str, torch.Tensor]:
        sums = cohort._forward(batch)
        (torch.stack([sums[job_id] for job_id in layout.jobs]) * weights).sum().backward()
        return sums

    pending = {job_id: [param.grad for param in buffers.params] for job_id, buffers in grads.items()}
    sinks = GradSinks()  # the LoRA backward adds into the buffers' views itself (kernels/grad_sink.py)
    try:
        _warm_up(forward_backward, grads, sinks)
        for job_id, buffers in grads.items():  # the warm-up's gradients thrown away, the pending ones taken over
            for param, grad in zip(buffers.params, pending[job_id]):
                param.grad = grad
            buffers.adopt()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the publisher's thread waits on its host copies' events (executor/checkpoint.py's HostCopy)
        # while this thread captures; in the default global mode that wait would invalidate the capture
        with sinks.active(frozen=True), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            sums = forward_backward()
    except RuntimeError:
        for job_id, buffers in grads.items():
            for param, grad in zip(buffers.params, pending[job_id]):
                param.grad = grad
            buffers.optimizer.grad_buffer = None
        raise
    return _Captured(layout, graph, tokens, weights, sums, grads, sinks)


def _warm_up(forward_backward, grads: dict[str, _GradBuffers], sinks: GradSinks) -> None:
    """One forward and backward on a side stream before the capture: Triton compiles, cuBLAS picks its workspace,
    and the LoRA backward builds the gradient tables the capture will add through (into zeroed buffers)."""
    for buffers in grads.values():
        for param in buffers.params:
            param.grad = None
        buffers.adopt()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), sinks.active():
        forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.empty_cache()  # the eager warm-up's cached activations: the graph's pool takes as much again
