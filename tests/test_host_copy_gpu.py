"""A job's snapshot on its way to the host (`HostCopy`) on a GPU: it holds the state of the step it was taken at
while later steps update the live tensors, and the GPU memory its copies stage is bounded."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, llama, write_jsonl  # noqa: F401 (llama: a fixture)

from lorafleet.executor.checkpoint import HostCopy
from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_host_copy_keeps_the_values_of_when_it_started_while_the_stream_updates_them():
    live = {"a": torch.arange(1 << 22, device="cuda", dtype=torch.float32),
            "b": [torch.ones(7, device="cuda", dtype=torch.bfloat16), torch.tensor([3], dtype=torch.int64)]}
    want = {"a": live["a"].cpu(), "b": [live["b"][0].cpu(), live["b"][1].clone()]}
    copy = HostCopy.start(live)
    for _ in range(20):  # queued behind the gather on the same stream, racing the side stream's copy to the host
        live["a"].mul_(1.5).add_(1)
    live["b"][0].zero_()
    live["b"][1].zero_()
    got = copy.get()
    assert got["a"].device.type == "cpu" and torch.equal(got["a"], want["a"])
    assert torch.equal(got["b"][0], want["b"][0]) and torch.equal(got["b"][1], want["b"][1])


def test_the_gpu_memory_staged_by_copies_in_flight_stays_under_the_bound(monkeypatch):
    monkeypatch.setattr(HostCopy, "STAGING_BYTES", 3 << 20)
    monkeypatch.setattr(HostCopy, "_in_flight", [])
    tensors = [torch.randn(1 << 18, device="cuda") for _ in range(6)]  # 1 MiB each
    copies = []
    for tensor in tensors:
        torch.cuda._sleep(10_000_000)  # keeps the stream busy, so that copies are still in flight
        copies.append(HostCopy.start({"t": tensor}))
        assert sum(transfer.staged for transfer in HostCopy._in_flight if not transfer.finished()) <= 3 << 20
    for copy, tensor in zip(copies, tensors):
        assert torch.equal(copy.get()["t"], tensor.cpu())


def test_a_checkpoint_taken_before_more_steps_resumes_the_state_of_its_step(llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_rows(16))
    spec = parse_spec({"base_model": str(llama), "dataset": "unused", "adapter": {"r": 8},
                       "hyperparameters": {"batch_size": 4, "learning_rate": 1e-2, "max_steps": 8}})
    cohort = Cohort(llama, device="cuda")
    cohort.add_job("job", spec, data)
    for _ in range(3):
        cohort.step()
    want = [p.detach().cpu().clone() for p in cohort.jobs["job"].adapter.parameters()]
    snapshot = cohort.snapshot("job", tmp_path / "checkpoint", training_state=True)
    for _ in range(3):  # these steps run while the snapshot is on its way; it keeps step 3's state
        cohort.step()
    snapshot.write()
    resumed = Cohort(llama, device="cuda")
    resumed.add_job("job", spec, data, resume_from=tmp_path / "checkpoint")
    assert resumed.jobs["job"].step == 3
    for got, expected in zip(resumed.jobs["job"].adapter.parameters(), want):
        assert torch.equal(got.detach().cpu(), expected)


def test_past_the_pinned_bound_a_copy_goes_to_pageable_memory_and_a_dropped_copy_gives_its_share_back(monkeypatch):
    monkeypatch.setattr(HostCopy, "PINNED_BYTES", 3 << 20)
    monkeypatch.setattr(HostCopy, "pinned_held", 0)
    monkeypatch.setattr(HostCopy, "_in_flight", [])
    tensors = [torch.randn(1 << 18, device="cuda") for _ in range(4)]  # 1 MiB each
    copies = [HostCopy.start({"t": tensor}) for tensor in tensors]
    for copy, tensor in zip(copies, tensors):
        assert torch.equal(copy.get()["t"], tensor.cpu())
    assert [copy._flats[0][2].is_pinned() for copy in copies] == [True, True, True, False]
    assert HostCopy.pinned_held == 3 << 20
    del copy
    copies.pop(0)
    assert HostCopy.pinned_held == 2 << 20
    again = HostCopy.start({"t": tensors[0]})
    again.get()
    assert again._flats[0][2].is_pinned()
    del again
    copies.clear()
    assert HostCopy.pinned_held == 0


def test_the_loop_pins_no_host_memory_its_copier_does(monkeypatch):
    """Pinning host memory the first time is slow (CUDA's host allocation): a checkpoint round of a 1B cohort cost
    the loop 1.5 s when the loop pinned its copies' memory itself."""
    import threading

    pinning_threads = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        if kwargs.get("pin_memory"):
            pinning_threads.append(threading.current_thread())
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    live = {"a": torch.randn(1 << 16, device="cuda"), "b": torch.ones(3, device="cuda", dtype=torch.bfloat16)}
    copy = HostCopy.start(live)
    got = copy.get()
    assert torch.equal(got["a"], live["a"].cpu()) and torch.equal(got["b"], live["b"].cpu())
    assert pinning_threads and threading.main_thread() not in pinning_threads


def test_a_copy_that_fails_on_the_copier_fails_its_reader_and_the_next_copy_goes_through(monkeypatch):
    empty = torch.empty

    def no_host_memory(*args, **kwargs):
        if "pin_memory" in kwargs:
            raise RuntimeError("no host memory")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_host_memory)
    tensor = torch.randn(1 << 10, device="cuda")
    failed = HostCopy.start({"t": tensor})
    with pytest.raises(RuntimeError, match="copying a snapshot to the host failed: no host memory"):
        failed.get()
    monkeypatch.setattr(torch, "empty", empty)
    assert torch.equal(HostCopy.start({"t": tensor}).get()["t"], tensor.cpu())


def test_host_memory_pinned_ahead_is_what_the_first_copies_take():
    """A job's first checkpoint takes host memory its copier pinned after the job's first step (`HostCopy.pin_ahead`):
    pinning it then, a 1B cohort's first checkpoint round stalled the loop while the copies waited for it."""
    import time

    from lorafleet.executor import checkpoint

    HostCopy.start({"t": torch.ones(1, device="cuda")}).get()  # whatever earlier tests pinned ahead is let go
    torch._C._host_emptyCache()
    states = [{"a": torch.randn(1 << 20, device="cuda"), "b": torch.ones(1 << 18, device="cuda", dtype=torch.bfloat16)},
              {"c": torch.zeros(3 << 18, device="cuda")}]
    HostCopy.pin_ahead(states)
    deadline = time.monotonic() + 30
    while len(checkpoint._PINNED_AHEAD) < 3:  # one flat per device and dtype of each state
        assert time.monotonic() < deadline, "the copier did not pin ahead"
        time.sleep(0.01)
    created = torch.cuda.memory.host_memory_stats()["num_host_alloc"]
    copies = [HostCopy.start(state) for state in states]
    for copy, state in zip(copies, states):
        got = copy.get()
        assert all(torch.equal(got[key], tensor.cpu()) for key, tensor in state.items())
        assert all(flat.is_pinned() for _, _, flat in copy._flats)
    assert torch.cuda.memory.host_memory_stats()["num_host_alloc"] == created, "the copies pinned nothing more"
