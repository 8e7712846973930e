"""The CUDA-graphed cohort step against the eager one on a GPU: the same losses and weights within bf16 noise."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, llama, write_jsonl  # noqa: F401 (llama: a fixture)

from lorafleet.executor import optim
from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def spec(model_dir, adapter, quantization="none", **hyperparameters):
    # batch_size = the whole set: every step draws the same sequences in another order, so the layout repeats
    return parse_spec({"base_model": str(model_dir), "dataset": "unused", "adapter": adapter,
                       "quantization": quantization,
                       "hyperparameters": {"batch_size": 8, "learning_rate": 2e-2, "max_steps": 6, **hyperparameters}})


def train(model_dir, data, graphs: bool, quantization: str = "none"):
    cohort = Cohort(model_dir, quantization=quantization, device="cuda", cuda_graphs=graphs)
    cohort.add_job("a", spec(model_dir, {"r": 8}, quantization), data)
    cohort.add_job("b", spec(model_dir, {"r": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}, quantization,
                             seed=1, gradient_accumulation_steps=2, max_steps=3), data)
    initial = {job_id: [p.detach().clone() for p in job.adapter.parameters()] for job_id, job in cohort.jobs.items()}
    losses = {"a": [], "b": []}
    while cohort.active_jobs():
        for job_id, result in cohort.step().items():
            assert result.error is None, result.error
            losses[job_id].append(result.loss)
    updates = {job_id: torch.cat([(p.detach() - p0).flatten()
                                  for p, p0 in zip(job.adapter.parameters(), initial[job_id])])
               for job_id, job in cohort.jobs.items()}
    return (cohort.graphs.replays, cohort.graphs.packed_ahead), losses, updates


def test_graphed_jobs_flat_optimizers_update_as_torchs_fused_adamw_does(llama, tmp_path, monkeypatch):
    """The update read from the graph's gradient buffers, one kernel per group (optim.py's `FlatAdamW`), against
    torch's fused step over each parameter, both after graphed steps: the same within the LoRA backward's atomic
    adds, whose order differs run to run (tests/test_optim_flat.py has them bit for bit on the CPU)."""
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=3))
    (replays, _), losses, updates = train(llama, data, graphs=True)
    assert replays > 0
    monkeypatch.setattr(optim.FlatAdamW, "applies", classmethod(lambda cls, optimizer: False))
    (torch_replays, _), torch_losses, torch_updates = train(llama, data, graphs=True)
    assert torch_replays == replays
    for job_id in losses:
        assert losses[job_id] == pytest.approx(torch_losses[job_id], rel=1e-4)
        assert (updates[job_id] - torch_updates[job_id]).norm() <= 0.01 * torch_updates[job_id].norm()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_graphed_step_trains_as_the_eager_step_within_bf16_noise(llama, tmp_path, quantization):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=5))
    (eager_replays, _), eager_losses, eager_updates = train(llama, data, graphs=False, quantization=quantization)
    (replays, packed_ahead), losses, updates = train(llama, data, graphs=True, quantization=quantization)
    assert eager_replays == 0
    assert replays == 5  # step 1 eager, step 2 captures and replays, then every step replays
    assert packed_ahead == 4  # every replay after the capture ran on inputs packed during the step before
    for job_id in losses:
        assert losses[job_id] == pytest.approx(eager_losses[job_id], rel=1e-2)
        # the weights' change over the run: AdamW turns bf16 noise in near-zero gradients into whole steps, so the
        # updates are compared as vectors
        got, want = updates[job_id], eager_updates[job_id]
        assert (got - want).norm() <= 0.05 * want.norm()
    assert losses["a"][-1] < losses["a"][0]  # it trains


def test_rows_of_equal_length_train_on_the_dense_attention_graphed_as_on_varlen_eagerly(llama, tmp_path, monkeypatch):
    """Sequences all cut to max_seq_len make every row a dense batch (cuDNN attention, executor/attention.py); the
    graphed steps on it train as the eager varlen steps do."""
    from lorafleet.executor import attention

    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(200))} for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    dense_calls = []
    original = attention.dense_causal_attention
    monkeypatch.setattr(attention, "dense_causal_attention", lambda *args: dense_calls.append(1) or original(*args))

    def run(dense: bool, graphs: bool):
        monkeypatch.setattr(attention, "DENSE_WHEN_UNIFORM", dense)
        cohort = Cohort(llama, device="cuda", cuda_graphs=graphs)
        cohort.add_job("a", spec(llama, {"r": 8}, max_seq_len=64), data)
        start = torch.cat([p.detach().flatten().clone() for p in cohort.jobs["a"].adapter.parameters()])
        losses = [cohort.step()["a"].loss for _ in range(6)]
        end = torch.cat([p.detach().flatten() for p in cohort.jobs["a"].adapter.parameters()])
        return cohort.graphs.replays, losses, end - start

    _, varlen_losses, varlen_update = run(dense=False, graphs=False)
    assert not dense_calls
    replays, losses, update = run(dense=True, graphs=True)
    assert dense_calls and replays == 5
    assert losses == pytest.approx(varlen_losses, rel=1e-2)
    assert (update - varlen_update).norm() <= 0.05 * varlen_update.norm()


def test_a_graphed_jobs_gradients_stay_views_of_its_buffer_until_the_graph_is_dropped(llama, tmp_path):
    """Between graphed steps the optimizer zeroes the job's one gradient buffer in place (no .grad re-pointed on the
    host); once the graph is dropped, the job's gradients are its own tensors again and clear to None."""
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=5))
    cohort = Cohort(llama, device="cuda", cuda_graphs=True)
    cohort.add_job("a", spec(llama, {"r": 8}, max_steps=8), data)
    cohort.add_job("b", spec(llama, {"r": 4}, seed=1, max_steps=4), data)
    for _ in range(3):
        cohort.step()
    buffers = cohort.graphs.captured.grads["a"]
    # the LoRA backward adds into the views itself (kernels/grad_sink.py): a dA table per node and a dB table per
    # projection, so at least one per layer that an adapter wraps
    assert len(cohort.graphs.captured.sinks) >= len(cohort.jobs["a"].layers) > 0
    views = [param.grad for param in buffers.params]
    cohort.step()  # b finishes: its last step replays the graph
    assert all(param.grad is view for param, view in zip(buffers.params, views))
    assert buffers.flat.abs().sum().item() == 0, "the window closed: its buffer was zeroed"
    assert cohort.jobs["a"].optimizer.grad_buffer is buffers.flat
    cohort.remove_job("b")
    cohort.step()  # a new layout: the graph is dropped and this step runs eagerly
    assert cohort.graphs.captured is None and cohort.jobs["a"].optimizer.grad_buffer is None
    assert all(param.grad is None for param in cohort.jobs["a"].adapter.parameters())


def test_a_capture_succeeds_while_another_thread_waits_on_host_copies(llama, tmp_path):
    """The publisher's thread waits on a snapshot's copy (an event synchronize) while the loop may be capturing the
    step's graph: the capture must not fail and leave the cohort eager."""
    import threading

    from lorafleet.executor.checkpoint import HostCopy

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=5))
    cohort = Cohort(llama, device="cuda", cuda_graphs=True)
    cohort.add_job("a", spec(llama, {"r": 8}, max_steps=6), data)
    stop = threading.Event()
    copies = [HostCopy.start({"t": torch.randn(1 << 16, device="cuda")}) for _ in range(4)]

    def publisher():
        while not stop.is_set():
            for copy in copies:
                copy.get()

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for _ in range(4):
            cohort.step()
    finally:
        stop.set()
        thread.join()
    assert cohort.graphs.enabled, "the capture failed: the cohort fell back to eager steps"
    assert cohort.graphs.replays == 3
