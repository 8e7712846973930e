"""Which cohort size the capacity probe tries next: the most jobs whose step fits, found in a few steps.

A step of n jobs either fits (and has a measured peak) or runs out of memory. In passes the peak grows about linearly
with n (each job's adapter, gradients and AdamW state; the activations are bounded by the pass), so the next size is
the one the measured peaks predict fills the device (`FILLED`), kept strictly between the largest size that fitted
and the smallest that did not. Every try shrinks that interval, so the search ends; it ends exact when the two are
neighbours (the most jobs is known), or at a bound when the range given is exhausted. An 8B probe step of 144 jobs
takes about 30 s on the H200, so a descending list that stops at the first fit (what the probe did before) gave only
a lower bound for the price of every size above it."""

from __future__ import annotations

from dataclasses import dataclass


FILLED = 0.98  # of the device's memory, what a cohort's peak can reach (the CUDA context and the allocator hold some)


@dataclass(frozen=True)
class Probe:
    jobs: int
    fits: bool
    peak_gib: float | None = None


def next_size(probes: list[Probe], low: int, high: int, base_gib: float, device_gib: float) -> int | None:
    """The next cohort size to try in [low, high], or None once the answer is known. `base_gib`: the device memory
    held with no job (the base); `device_gib`: what the device holds."""
    if not probes:
        return low
    fitted, failed = _bracket(probes, high)
    if not fitted:
        return None  # not even `low` fits
    largest = max(probe.jobs for probe in fitted)
    if largest + 1 >= failed:
        return None
    predicted = _predicted_most(fitted, base_gib, FILLED * device_gib)
    if predicted is None or not largest < predicted < failed:
        return (largest + failed) // 2 if failed <= high else min(high, 2 * largest)
    return predicted


def _bracket(probes: list[Probe], high: int) -> tuple[list[Probe], int]:
    """The probes that fitted, and the smallest size that did not (`high` + 1 while none failed)."""
    fitted = [probe for probe in probes if probe.fits]
    return fitted, min((probe.jobs for probe in probes if not probe.fits), default=high + 1)


def _predicted_most(fitted: list[Probe], base_gib: float, device_gib: float) -> int | None:
    """The size the fitted probes' peaks say fills the device: the line through the two largest, or through the base
    and the one there is."""
    points = sorted((probe.jobs, probe.peak_gib) for probe in fitted if probe.peak_gib is not None)
    if not points:
        return None
    if len(points) == 1:
        (jobs, peak), (jobs_before, peak_before) = points[0], (0, base_gib)
    else:
        (jobs_before, peak_before), (jobs, peak) = points[-2], points[-1]
    per_job = (peak - peak_before) / (jobs - jobs_before)
    if per_job <= 0:
        return None
    return jobs + int((device_gib - peak) / per_job)


def result(probes: list[Probe], high: int) -> dict:
    """The search's answer: the most jobs that fitted, and whether one more is known not to (`exact`) or the range
    ran out first (a lower bound) or even the smallest size failed (`most_jobs` None)."""
    fitted, failed = _bracket(probes, high)
    most = max((probe.jobs for probe in fitted), default=None)
    return {"most_jobs": most, "exact": most is not None and failed == most + 1 and failed <= high,
            "probes": len(probes)}
