"""The CUDA-graphed step's host side (executor/step_graph.py), on the CPU: buckets, padded packing, when it applies."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, llama, single_torch_thread, write_jsonl  # noqa: F401 (fixtures)

from lorafleet.executor.cohort import Cohort, pack
from lorafleet.executor.data import IGNORE_INDEX, Example
from lorafleet.executor import step_graph
from lorafleet.executor.step_graph import (CAPTURE_ATTEMPTS, FIRST_RETRY_AFTER, CaptureBackoff, StepGraphs,
                                            _GradBuffers, _HostInputs, bucket_rows, length_bucket)
from lorafleet.executor.optim import JobOptimizer
from lorafleet.scheduler.spec import Hyperparameters, parse_spec


def test_a_bucket_holds_its_rows_with_less_than_64_rows_or_a_sixteenth_more():
    for rows in [1, 63, 64, 65, 500, 512, 513, 2047, 2048, 2049, 5000, 16384, 16385, 100_000]:
        padded = bucket_rows(rows)
        assert rows <= padded < rows + max(64, rows / 16)
        assert bucket_rows(padded) == padded  # a bucket is its own bucket: the layout repeats
    assert bucket_rows(512) == 512 and bucket_rows(2048) == 2048 and bucket_rows(600) == 640
    assert [length_bucket(n) for n in (1, 16, 17, 512, 513)] == [16, 16, 32, 512, 1024]


def example(ids, labels):
    return Example(input_ids=ids, labels=labels)


def test_padding_rows_are_a_sequence_of_their_own_inside_the_job_and_teach_nothing():
    batches = {"a": [example([1, 2, 3], [1, 2, 3]), example([4, 5], [IGNORE_INDEX, 5])],
               "b": [example([6, 7, 8, 9], [6, 7, 8, 9])]}
    plain = pack(batches, "cpu")
    padded = pack(batches, "cpu", pad_rows=lambda rows: rows + 3)
    assert padded.rows == {"a": (0, 8), "b": (8, 15)}
    assert padded.sequence_lengths == [3, 2, 3, 4, 3]
    assert padded.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 8, 9, 0, 0, 0]
    a, b = plain.targets.split([5, 4])
    assert padded.targets.tolist() == a.tolist() + [IGNORE_INDEX] * 3 + b.tolist() + [IGNORE_INDEX] * 3
    assert padded.num_targets == plain.num_targets and padded.job_sequences == plain.job_sequences


def test_inputs_packed_ahead_serve_only_a_pass_of_the_very_same_examples():
    a1, a2, b1 = example([1, 2, 3], [1, 2, 3]), example([4, 5], [IGNORE_INDEX, 5]), example([6, 7], [6, 7])
    ahead = _HostInputs.pack({"a": [a1, a2], "b": [b1]})
    fresh = _HostInputs.pack({"a": [a1, a2], "b": [b1]})
    assert ahead.layout == fresh.layout and torch.equal(ahead.tokens, fresh.tokens)
    assert ahead.holds({"a": [a1, a2], "b": [b1]})  # other lists, the same examples: what split_passes hands over
    equal_copy = example(list(a2.input_ids), list(a2.labels))
    for other in ({"a": [a1, equal_copy], "b": [b1]}, {"a": [a2, a1], "b": [b1]}, {"b": [b1], "a": [a1, a2]},
                  {"a": [a1], "b": [b1]}, {"a": [a1, a2]}, {"a": [a1, a2], "b": [b1], "c": [b1]}):
        assert not ahead.holds(other), other


def test_the_pass_packed_ahead_is_the_pass_the_next_step_draws(tmp_path, llama):
    from lorafleet.executor.cohort import split_passes

    cohort = Cohort(llama)
    for job_id, seed in (("a", 1), ("b", 2)):
        data = write_jsonl(tmp_path / f"{job_id}.jsonl", alpaca_rows(6, seed=seed))
        cohort.add_job(job_id, parse_spec({"base_model": str(llama), "dataset": "unused", "adapter": {"r": 4},
                                           "hyperparameters": {"batch_size": 2, "max_steps": 5}}), data)
    cohort.step()  # reads every job's next micro-batch ahead before its sync
    cohort.graphs.captured = object()  # as if a graph were held (a CPU cohort never captures one)
    cohort._pack_ahead()
    cohort.graphs.captured = None
    ahead = cohort.graphs.ahead
    assert ahead is not None and list(ahead.examples) == ["a", "b"]
    upcoming = {job_id: cohort.jobs[job_id].data.next_batch()[0] for job_id in ("a", "b")}  # what the step draws
    (part,) = split_passes(upcoming, None)
    assert ahead.holds(part)
    assert torch.equal(ahead.tokens, _HostInputs.pack(part).tokens)


def test_a_cpu_cohort_never_graphs_its_step(tmp_path, llama):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4, seed=1))
    spec = parse_spec({"base_model": str(llama), "dataset": "unused", "adapter": {"r": 4},
                       "hyperparameters": {"batch_size": 4, "max_steps": 3}})
    cohort = Cohort(llama)
    cohort.add_job("a", spec, data)
    for _ in range(3):
        assert cohort.step()["a"].error is None
    assert cohort.graphs.replays == 0 and cohort.graphs.captured is None


@pytest.mark.parametrize("change", ["dropout", "passes"])
def test_what_a_graph_cannot_express_runs_eagerly(tmp_path, llama, change):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4, seed=1))
    adapter = {"r": 4, "lora_dropout": 0.1 if change == "dropout" else 0.0}
    spec = parse_spec({"base_model": str(llama), "dataset": "unused", "adapter": adapter,
                       "hyperparameters": {"batch_size": 4, "max_steps": 3}})
    cohort = Cohort(llama, max_pass_tokens=8 if change == "passes" else None)
    cohort.add_job("a", spec, data)
    cohort.device = torch.device("cuda")  # as if on a GPU: only the step's shape decides
    passes = [{"a": []}, {"a": []}] if change == "passes" else [{"a": []}]
    assert not cohort.graphs._applies(cohort, passes)
    if change == "dropout":
        cohort.jobs["a"].adapter.dropout = 0.0
        assert cohort.graphs._applies(cohort, passes)


def optimizer_of(params):
    return JobOptimizer([{"params": params}], Hyperparameters(), total_steps=4)


def test_grad_buffers_are_laid_out_as_the_optimizers_parameters_group_by_group():
    """LoRA+'s groups take the A factors first: the buffer follows the optimizer (whose flat update reads it in place,
    executor/optim.py), not the adapter's parameter order."""
    params = [torch.nn.Parameter(torch.ones(n)) for n in (2, 3, 4, 5)]
    optimizer = JobOptimizer([{"params": params[0::2]}, {"params": params[1::2], "lr": 1e-3}], Hyperparameters(),
                             total_steps=4)
    buffers = _GradBuffers.of(optimizer)
    buffers.adopt()
    assert buffers.params == [params[0], params[2], params[1], params[3]]
    assert [param.grad.data_ptr() - buffers.flat.data_ptr() for param in buffers.params] == [0, 8, 24, 36]


def test_grad_buffers_take_over_pending_gradients_and_start_a_window_at_zero():
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))]
    buffers = _GradBuffers.of(optimizer_of(params))
    buffers.flat.fill_(7.0)  # what the last replay left
    buffers.adopt()  # no .grad yet: a new window starts at zero
    assert all(param.grad is view for param, view in zip(params, buffers.views))
    assert buffers.flat.eq(0).all()
    buffers.flat.fill_(1.5)
    buffers.adopt()  # mid-window: what the graph wrote stays
    assert buffers.flat.eq(1.5).all()
    params[0].grad = torch.full((2, 3), 2.0)  # an eager micro-batch's gradient, the other parameter's still None
    params[1].grad = None
    buffers.adopt()
    assert params[0].grad.eq(2.0).all() and params[1].grad.eq(0).all()
    assert params[0].grad.data_ptr() == buffers.flat.data_ptr()


def test_while_a_graph_holds_the_gradients_the_optimizer_zeroes_its_buffer_and_after_clears_them_to_none():
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))]
    optimizer = optimizer_of(params)
    buffers = _GradBuffers.of(optimizer)
    buffers.adopt()
    assert optimizer.grad_buffer is buffers.flat
    buffers.flat.fill_(3.0)  # a replay's gradients
    optimizer.step(optimizer.grad_norm(), optimizer.grad_norm().item())
    assert all(param.grad is view for param, view in zip(params, buffers.views)), "no .grad re-pointed"
    assert buffers.flat.eq(0).all()
    buffers.flat.fill_(2.0)  # mid-window when the graph is dropped: the pending gradient is kept, as its own tensor
    buffers.release()
    assert optimizer.grad_buffer is None
    assert all(param.grad is not view and param.grad.eq(2.0).all() for param, view in zip(params, buffers.views))
    optimizer.zero_grad()
    assert all(param.grad is None for param in params)


def test_a_failed_capture_is_tried_again_after_a_doubling_wait_and_given_up_after_the_last_attempt():
    backoff, attempts, given_up = CaptureBackoff(), [], False
    for step in range(1000):
        if backoff.ready():
            attempts.append(step)
            given_up = backoff.failed()
            if given_up:
                break
    waits = [FIRST_RETRY_AFTER << k for k in range(CAPTURE_ATTEMPTS - 1)]
    assert attempts == [sum(wait + 1 for wait in waits[:k]) for k in range(CAPTURE_ATTEMPTS)]
    assert given_up and backoff.failures == CAPTURE_ATTEMPTS


def test_a_cohort_whose_capture_fails_steps_eagerly_and_retries_before_turning_graphs_off(monkeypatch):
    captures = []

    def failing_capture(cohort, layout, tokens, weights):
        captures.append(layout)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step_graph, "_capture", failing_capture)
    cohort = type("Cohort", (), {"device": torch.device("cpu")})()
    examples = {"a": [example([1, 2, 3], [1, 2, 3])]}
    graphs = StepGraphs()
    assert graphs.run(cohort, examples, {"a": 1.0}) is None and not captures  # a new layout: eager, no capture
    with pytest.warns(RuntimeWarning, match=rf"failed \(1 of {CAPTURE_ATTEMPTS}\).*trying again in "
                                            rf"{FIRST_RETRY_AFTER} steps: operation not permitted"):
        assert graphs.run(cohort, examples, {"a": 1.0}) is None
    assert len(captures) == 1 and graphs.enabled
    for _ in range(FIRST_RETRY_AFTER):
        assert graphs.run(cohort, examples, {"a": 1.0}) is None
    assert len(captures) == 1
    with pytest.warns(RuntimeWarning, match=rf"failed \(2 of {CAPTURE_ATTEMPTS}\)"):
        graphs.run(cohort, examples, {"a": 1.0})
    assert len(captures) == 2 and graphs.enabled
    graphs.backoff.wait = 0
    with pytest.warns(RuntimeWarning, match=rf"failed \({CAPTURE_ATTEMPTS} of {CAPTURE_ATTEMPTS}\).*from now on"):
        for _ in range(CAPTURE_ATTEMPTS - 2):
            graphs.run(cohort, examples, {"a": 1.0})
            graphs.backoff.wait = 0
    assert len(captures) == CAPTURE_ATTEMPTS and not graphs.enabled
