"""bench/step_parts.py: kernels of a profiler trace sorted into the step's parts, and the parts' ideals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_parts import busy_seconds, device_work, host_timeline, ideal_seconds, kernel_parts  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)


def op(name, ts, dur, external=None, tid=1):
    args = {} if external is None else {"External id": external}
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def kernel(name, ts, dur, external):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7,
            "args": {"External id": external}}


def test_a_gemm_under_the_loss_is_the_head_and_elsewhere_a_frozen_projection():
    events = [
        op("aten::mm", 0, 10, external=1),
        op("_ChunkedHeadLoss", 20, 100, external=2),
        op("aten::mm", 30, 10, external=3),
        op("aten::exp", 50, 5, external=4),
        kernel("nvjet_tst_128x256", 100, 40, 1),
        kernel("nvjet_tst_128x256", 150, 30, 3),
        kernel("vectorized_elementwise_kernel", 190, 5, 4),
    ]
    parts = kernel_parts({"traceEvents": events})
    assert parts["seconds"]["frozen GEMMs"] == pytest.approx(40e-6)
    assert parts["seconds"]["LM head GEMMs"] == pytest.approx(30e-6)
    assert parts["seconds"]["loss elementwise"] == pytest.approx(5e-6)
    assert parts["seconds"]["other"] == 0


def test_backward_kernels_of_the_loss_count_as_loss_on_the_autograd_thread():
    events = [
        op("autograd::engine::evaluate_function: _ChunkedHeadLossBackward", 0, 50, tid=2),
        op("aten::mul", 10, 5, external=9, tid=2),
        kernel("vectorized_elementwise_kernel", 60, 8, 9),
    ]
    assert kernel_parts(events)["seconds"]["loss elementwise"] == pytest.approx(8e-6)


def test_named_kernels_and_the_optimizer_go_to_their_parts():
    events = [
        op("Optimizer.step#AdamW.step", 0, 100),
        op("aten::_fused_adamw_", 10, 20, external=5),
        op("aten::_foreach_norm", 200, 5, external=6),
        op("_SegmentedLora", 300, 5, external=7),
        kernel("void at::native::fused_adamw_kernel", 400, 10, 5),
        kernel("multi_tensor_apply_kernel", 420, 3, 6),
        kernel("_shrink_kernel", 430, 4, 7),
        kernel("_rms_norm_fwd_kernel", 440, 2, 0),
        kernel("flash_fwd_kernel", 450, 6, 0),
        kernel("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", 460, 9, 0),
        kernel("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void con", 470, 2, 0),
    ]
    seconds = kernel_parts(events)["seconds"]
    assert seconds["optimizer"] == pytest.approx(13e-6)
    assert seconds["LoRA kernels"] == pytest.approx(4e-6)
    assert seconds["fused elementwise"] == pytest.approx(2e-6)
    assert seconds["attention"] == pytest.approx(17e-6)  # flash, cuDNN's fused attention and its helpers
    assert seconds["other"] == 0


def function(path, ts, dur):
    return {"ph": "X", "cat": "python_function", "name": path, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


def test_the_host_timeline_names_the_functions_that_ran_while_the_gpu_was_idle():
    """A step of 1000 µs: the host packs for 300 µs before the first kernel, kernels run 300-900 with a 100 µs gap
    in which a pool copy runs, and the results are read after 900. Functions outside the repository are not named."""
    events = [
        function("/repo/executor/cohort.py(403): step", 0, 1000),
        function("/repo/executor/cohort.py(210): pack", 50, 250),
        function("/repo/executor/step_graph.py(75): adopt", 400, 100),
        function("torch/cuda/graphs.py(80): replay", 290, 20),
        function("/repo/executor/cohort.py(628): _after_backward", 920, 60),
        op("aten::copy_", 0, 1000),
        kernel("nvjet_a", 300, 100, 1),
        kernel("nvjet_b", 500, 400, 2),
        kernel("tiny_gap_kernel", 905, 0, 3),
    ]
    timeline = host_timeline(events, "/repo")
    assert timeline["step_ms"] == pytest.approx(1.0)
    assert timeline["idle_ms"] == pytest.approx(0.3 + 0.1 + 0.095)
    assert timeline["before_first_kernel_ms"] == pytest.approx(0.3)
    assert timeline["after_last_kernel_ms"] == pytest.approx(0.095)
    assert timeline["functions_ms"] == pytest.approx({
        "executor/cohort.py: step": 0.495, "executor/cohort.py: pack": 0.25, "executor/step_graph.py: adopt": 0.1,
        "executor/cohort.py: _after_backward": 0.06})


def test_the_host_timeline_knows_its_own_files_named_relative_to_the_repository(tmp_path):
    """With the repository on PYTHONPATH the profiler names its files relative to it, as it names torch's relative
    to site-packages: a relative name is ours when the repository holds the file."""
    (tmp_path / "executor").mkdir()
    (tmp_path / "executor" / "cohort.py").write_text("")
    events = [
        function("executor/cohort.py(425): step", 0, 1000),
        function("torch/cuda/graphs.py(80): replay", 100, 50),
        function("executor/missing.py(1): elsewhere", 100, 50),
        kernel("nvjet_a", 300, 600, 1),
    ]
    timeline = host_timeline(events, str(tmp_path))
    assert timeline["functions_ms"] == pytest.approx({"executor/cohort.py: step": 0.4})


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_seconds([(0, 10), (5, 15), (20, 30), (21, 22)]) == pytest.approx(25e-6)


def test_the_frozen_gemm_ideal_is_four_flops_per_weight_and_token():
    ideal = ideal_seconds(LLAMA_8B, [512] * 32, jobs=8, rank=16, peak_tflops=1.0, copy_gbps=1.0)
    weights = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)
    assert ideal["frozen GEMMs"] == pytest.approx(4 * weights * 16384 / 1e12)
    assert ideal["LM head GEMMs"] == pytest.approx(4 * 16384 * 128256 * 4096 / 1e12)
    assert ideal["host gaps"] == 0


def test_device_work_counts_every_device_op_once_and_picks_out_the_gradient_adds(tmp_path):
    import gzip
    import json

    events = [
        op("aten::add_", 0, 5, external=1),
        kernel("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", 10, 2, 1),
        kernel("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", 13, 3, 1),
        kernel("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", 20, 60,
               1),
        kernel("_weight_grad_kernel", 90, 40, 1),
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 140, "dur": 1, "pid": 0, "tid": 7},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    work = device_work(str(path))
    assert work["device_ops"] == 5  # the CPU op is not one
    groups = {name: (group["count"], group["ms"]) for name, group in work["groups"].items()}
    assert groups["fp32 adds"] == (2, pytest.approx(0.005))
    assert groups["bf16 adds"] == (1, pytest.approx(0.06))
    assert groups["dA kernel"] == (1, pytest.approx(0.04))
    assert groups["memsets"] == (1, pytest.approx(0.001))
    assert groups["fp32 fills"] == (0, 0.0)
