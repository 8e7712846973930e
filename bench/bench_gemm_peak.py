"""The bf16 matmul rate the MFU figures divide by, held for longer, and an 8B layer's frozen GEMMs against it.

    python3 -P bench/bench_gemm_peak.py [--seconds 2] [--tokens 16384] [--out OUT]

bench_e2e's peak (`matmul_peak_tflops`) is ten 8192³ products, ~14 ms of work. The 8B 8 x 4x512 step's frozen GEMMs
ran at 85% of it (run P11, docs/BENCHMARKS.md) in a step of 0.9 s; whether that is their shapes or the card's clocks
under longer load is what this measures:
1. the burst, as bench_e2e measures it;
2. the same product back to back for `--seconds`, its rate in each tenth of that time (clocks and power settling);
3. each frozen GEMM of an 8B layer at `--tokens` rows as the engine runs it (the forward adds x·Wᵀ into the LoRA
   delta, the input gradient adds dY·W into the LoRA dX: `addmm_`), each back to back for a tenth of `--seconds`,
   then the layer's 14 in sequence, repeated for `--seconds`: each rate against the burst and the held rate.
While 2. and 3.'s sequence run, a thread reads the SM clock and the board's power from NVML every 20 ms: a held rate
below the burst with the clock below its first reading is the card's clocks, not the GEMMs' shapes.
Results: OUT/gemm_peak.json and a table on stdout. Without CUDA it runs at the tiny shape in fp32 on the CPU, as
the smoke test does; those numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorafleet.executor.gpu import Nvml

# name: (in features, out features) of an 8B (Llama-3) layer's projections; the tiny shape for the CPU
LAYERS = {
    "8b": {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096), "gate": (4096, 14336),
           "up": (4096, 14336), "down": (14336, 4096)},
    "tiny": {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128),
             "down": (128, 64)},
}


class Clock:
    """Wall time of queued work: CUDA events on a GPU, perf_counter after the work elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


def held_rates(clock: Clock, work: Callable[[], None], flops: float, seconds: float, windows: int = 10
               ) -> list[float]:
    """TFLOP/s of `work` repeated back to back for about `seconds`, in `windows` consecutive stretches."""
    work()
    start = clock.mark()
    work()
    once = max(clock.seconds(start, clock.mark()), 1e-6)
    calls = max(1, round(seconds / windows / once))
    marks = [clock.mark()]
    for _ in range(windows):
        for _ in range(calls):
            work()
        marks.append(clock.mark())
    return [flops * calls / clock.seconds(a, b) / 1e12 for a, b in zip(marks, marks[1:])]


class ClockSampler:
    """NVML's SM clock (MHz) and board power (W) read every `period` s while the block runs; nothing on a CPU."""

    def __init__(self, device: torch.device, period: float = 0.02):
        self.nvml = Nvml(str(device)) if device.type == "cuda" else None
        self.period, self.readings = period, []

    def __enter__(self):
        self.readings, self._stop, self._thread = [], threading.Event(), None
        if self.nvml is not None and self.nvml.handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.period):
            stats = self.nvml.read()  # the executor's own reading (its metrics' SM clock and power)
            if stats is not None and stats.sm_clock_hertz is not None and stats.power_watts is not None:
                self.readings.append((round(stats.sm_clock_hertz / 1e6), stats.power_watts))

    def summary(self) -> dict | None:
        """The clock's first, least and median reading and the median power, or None without readings."""
        if not self.readings:
            return None
        clocks, watts = [c for c, _ in self.readings], [w for _, w in self.readings]
        return {"sm_mhz_first": clocks[0], "sm_mhz_min": min(clocks), "sm_mhz_median": statistics.median(clocks),
                "power_w_median": statistics.median(watts), "readings": len(clocks)}


def burst_rate(clock: Clock, a: torch.Tensor, b: torch.Tensor) -> float:
    """bench_e2e's peak: three warm-up products, then ten timed."""
    for _ in range(3):
        a @ b
    start = clock.mark()
    for _ in range(10):
        a @ b
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * 10 / clock.seconds(start, clock.mark()) / 1e12


def layer_gemms(layer: dict[str, tuple[int, int]], tokens: int, dtype, device) -> dict[str, tuple[Callable, float]]:
    """name -> (one of the layer's frozen GEMMs as the engine runs it, its FLOPs)."""
    gemms = {}
    for name, (d_in, d_out) in layer.items():
        weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in ** 0.5
        x, delta = torch.randn(tokens, d_in, device=device, dtype=dtype), torch.zeros(tokens, d_out, device=device,
                                                                                      dtype=dtype)
        grad_y, grad_x = torch.randn(tokens, d_out, device=device, dtype=dtype), torch.zeros_like(x)
        flops = 2.0 * tokens * d_in * d_out
        gemms[f"{name} forward"] = (lambda delta=delta, x=x, weight=weight: delta.addmm_(x, weight.t()), flops)
        gemms[f"{name} dX"] = (lambda grad_x=grad_x, grad_y=grad_y, weight=weight: grad_x.addmm_(grad_y, weight),
                               flops)
    return gemms


def measure(device: torch.device, shape: str, tokens: int, seconds: float) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    side = 8192 if device.type == "cuda" else 256
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    burst = burst_rate(clock, a, b)
    sampler = ClockSampler(device)
    with sampler:
        held = held_rates(clock, lambda: a @ b, 2.0 * side ** 3, seconds)
    held_clocks = sampler.summary()
    gemms = layer_gemms(LAYERS[shape], tokens, dtype, device)
    each = {name: min(held_rates(clock, work, flops, seconds / 10, windows=3)) for name, (work, flops) in gemms.items()}
    works = [work for work, _ in gemms.values()]
    with sampler:
        layer = held_rates(clock, lambda: [work() for work in works], sum(flops for _, flops in gemms.values()),
                           seconds)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape,
            "tokens": tokens, "seconds": seconds, "burst_tflops": burst, "held_tflops": held,
            "gemm_tflops": each, "layer_tflops": layer, "held_clocks": held_clocks, "layer_clocks": sampler.summary()}


def table(result: dict) -> str:
    """Each GEMM against the burst and against the held product's mean rate (its windows swing with the clocks)."""
    burst, held = result["burst_tflops"], statistics.mean(result["held_tflops"])
    lines = [f"{result['device']}: the burst {burst:.0f} TFLOP/s; {side_note(result)}", "",
             "| GEMM | TFLOP/s | of the burst | of the held rate |", "|---|---|---|---|"]
    rows = [*result["gemm_tflops"].items(), ("the layer's 14 in sequence", statistics.mean(result["layer_tflops"]))]
    lines += [f"| {name} | {rate:.0f} | {rate / burst:.0%} | {rate / held:.0%} |" for name, rate in rows]
    for what, clocks in (("the held product", result["held_clocks"]), ("the layer's sequence", result["layer_clocks"])):
        if clocks:
            lines.append(f"{what}: SM clock {clocks['sm_mhz_first']} MHz at first, median {clocks['sm_mhz_median']}, "
                         f"least {clocks['sm_mhz_min']}; power median {clocks['power_w_median']:.0f} W "
                         f"({clocks['readings']} readings)")
    return "\n".join(lines)


def side_note(result: dict) -> str:
    rates = result["held_tflops"]
    mean = statistics.mean(rates)
    return (f"held for {result['seconds']:.1f} s: {rates[0]:.0f} in its first tenth, {mean:.0f} on average "
            f"({mean / result['burst_tflops']:.0%} of the burst), {min(rates):.0f} in its slowest tenth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = "8b" if device.type == "cuda" else "tiny"
    result = measure(device, shape, args.tokens if device.type == "cuda" else 256, args.seconds)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_peak.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
