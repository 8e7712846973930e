"""On a GPU, the executor's device readings are real: NVML's memory, utilisation, power and temperature, the peak
MFU divides by, and the gauges they feed (tests/test_metrics.py covers their absence on a CPU)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.executor.gpu import Nvml, device_peak_tflops, mfu
from lorafleet.scheduler.metrics import executor_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_nvml_reads_this_gpu_as_torch_sees_it():
    stats = Nvml("cuda:0").read()
    assert stats is not None, "nvidia-ml-py is in the executor extra: NVML must answer on a GPU host"
    total = torch.cuda.get_device_properties(0).total_memory
    assert abs(stats.memory_total_bytes - total) <= 0.02 * total, (stats.memory_total_bytes, total)
    torch.cuda.empty_cache()  # earlier tests' cached blocks would serve the allocation below without NVML seeing it
    before, reserved = Nvml("cuda:0").read(), torch.cuda.memory_reserved(0)
    held = torch.empty(2**30, dtype=torch.uint8, device="cuda:0")  # 1 GiB more reserved from the driver
    grown = torch.cuda.memory_reserved(0) - reserved
    after = Nvml("cuda:0").read()
    # With expandable segments the allocation may start in the free tail of a segment already mapped, so less than
    # the whole GiB is new; NVML must see what was.
    assert grown >= 0.9 * 2**30 and after.memory_used_bytes >= before.memory_used_bytes + 0.9 * grown
    del held
    assert 0 <= stats.utilization <= 1
    assert stats.power_watts is None or 10 < stats.power_watts < 2000
    assert stats.temperature_celsius is None or 5 < stats.temperature_celsius < 110
    assert stats.sm_clock_hertz is None or 1e8 < stats.sm_clock_hertz < 4e9


def test_a_known_gpu_has_a_peak_and_its_gauges_are_exported():
    peak = device_peak_tflops("cuda:0")
    name = torch.cuda.get_device_name(0)
    if any(part in name for part in ("H100", "H200", "A100")):
        assert peak is not None and peak > 100
    assert device_peak_tflops("cuda:0", 500.0) == 500.0
    assert mfu(8_000_000_000, 16_384, 1.0, 989.0) == pytest.approx(4 * 8e9 * 16_384 / 989e12)
    metrics = executor_metrics("gpu-test")
    metrics.record_gpu(Nvml("cuda:0").read())
    value = metrics.registry.get_sample_value("lorafleet_gpu_memory_total_bytes", {"executor": "gpu-test"})
    assert value and value > 2**30
