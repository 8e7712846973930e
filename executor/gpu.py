"""What an executor measures of its device for the metrics and the heartbeat: NVML's readings (memory, utilisation,
power, temperature, SM clock) and the model FLOPs utilisation of a step.

MFU counts the FLOPs the model needs, not those the kernels run: 4 x P x input tokens per step, with P the frozen
matmul parameters of the decoder layers (forward 2P; backward through a frozen base computes input gradients only,
another 2P), over the step's time and the device's peak. Attention scores and LoRA matmuls are left out, as in
bench/bench_e2e.py, so the figure is comparable to the benchmarks'.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from transformers.pytorch_utils import Conv1D

from lorafleet.scheduler.records import GpuStats

log = logging.getLogger("lorafleet.executor")

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s), by a substring of the device name. A device
# not listed has no MFU unless `lorafleet executor --peak-tflops` gives its peak.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0),
                    ("L4", 121.0))


def device_peak_tflops(device: str, given: Optional[float] = None) -> Optional[float]:
    """The peak MFU divides by: `given`, else the data sheet's for a known GPU, else None (a CPU, an unknown GPU)."""
    if given:
        return given
    if not device.startswith("cuda"):
        return None
    try:
        name = torch.cuda.get_device_name(torch.device(device))
    except (RuntimeError, AssertionError):  # no usable CUDA here (a CPU build of torch): no peak, no MFU
        return None
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS if part in name), None)


def frozen_matmul_params(layers: torch.nn.Module) -> int:
    """P: the weights of every linear map in the decoder layers (quantized ones counted by their shape, GPT-2's
    Conv1D by its weight's)."""
    return sum(_matmul_params(module) for module in layers.modules())


def _matmul_params(module: torch.nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.weight.numel()
    if (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and hasattr(module, "weight")):
        return module.in_features * module.out_features
    return 0


def mfu(params: int, input_tokens: int, seconds: float, peak: Optional[float]) -> Optional[float]:
    if not peak or seconds <= 0 or params <= 0:
        return None
    return 4 * params * input_tokens / seconds / (peak * 1e12)


class Nvml:
    """NVML readings of one CUDA device; `read()` is None on a CPU, without the NVML library or driver, or when a
    reading fails (the metrics then stay absent rather than show a false 0)."""

    def __init__(self, device: str):
        self.handle = None
        if not device.startswith("cuda"):
            return
        try:
            import pynvml  # nvidia-ml-py, in the executor extra

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = self._handle(pynvml, torch.device(device))
        except Exception as exc:  # no driver library, no permission: measured nothing
            log.warning("NVML unavailable for %s (%s): GPU memory, utilisation, power, temperature and SM clock not "
                        "exported", device, exc)

    @staticmethod
    def _handle(pynvml, device: torch.device):
        """The NVML device of this CUDA device: by UUID (CUDA_VISIBLE_DEVICES renumbers CUDA's indexes, not
        NVML's), by index where torch gives no UUID."""
        uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
        if uuid:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def read(self) -> Optional[GpuStats]:
        if self.handle is None:
            return None
        nvml, handle = self.pynvml, self.handle
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        except Exception:
            return None
        return GpuStats(memory_total_bytes=int(memory.total), memory_used_bytes=int(memory.used),
                        utilization=utilization, power_watts=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(
                            handle) / 1000),
                        temperature_celsius=self._optional(lambda: float(nvml.nvmlDeviceGetTemperature(
                            handle, nvml.NVML_TEMPERATURE_GPU))),
                        sm_clock_hertz=self._optional(lambda: nvml.nvmlDeviceGetClockInfo(
                            handle, nvml.NVML_CLOCK_SM) * 1e6))

    @staticmethod
    def _optional(read) -> Optional[float]:
        """Some GPUs do not report power or temperature (NVML_ERROR_NOT_SUPPORTED): those readings stay absent."""
        try:
            return float(read())
        except Exception:
            return None
