"""bench/capacity_search.py: the capacity probe finds the most jobs that fit, in few tries, against a fake device."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from capacity_search import Probe, next_size, result  # noqa: E402


def search(low: int, high: int, base: float, per_job: float, activations: float, usable: float,
           device: float) -> tuple[dict, list[int]]:
    """The probe against a device where n jobs peak at base + n * per_job + activations, and fit up to `usable`
    (below what the device holds: the allocator's own, fragmentation)."""
    probes: list[Probe] = []
    while (n := next_size(probes, low, high, base, device)) is not None:
        assert low <= n <= high and n not in [probe.jobs for probe in probes]
        peak = base + n * per_job + activations
        probes.append(Probe(n, peak <= usable, peak if peak <= usable else None))
        assert len(probes) <= 40, "the search does not end"
    return result(probes, high), [probe.jobs for probe in probes]


def test_the_probe_finds_the_exact_capacity_inside_its_range_in_a_few_tries():
    # P1's 8B figures: a 16 GiB base, 144 jobs peaking at 98 GiB in passes; the H200 fits up to ~136 GiB
    answer, tried = search(144, 320, base=16.0, per_job=0.54, activations=4.2, usable=136.0, device=139.8)
    most = int((136.0 - 16.0 - 4.2) / 0.54)
    assert answer == {"most_jobs": most, "exact": True, "probes": len(tried)}
    assert len(tried) <= 6


@pytest.mark.parametrize("seed", range(200))
def test_the_answer_is_the_most_jobs_that_fit_whatever_the_device(seed):
    rng = random.Random(seed)
    base, per_job, activations = rng.uniform(1, 40), rng.uniform(0.05, 3), rng.uniform(0, 10)
    device = base + activations + per_job * rng.uniform(1, 400)
    usable = device * rng.uniform(0.85, 1.0)
    low = rng.randint(1, 200)
    high = low + rng.randint(1, 300)
    answer, tried = search(low, high, base, per_job, activations, usable, device)
    truth = max((n for n in range(low, high + 1) if base + n * per_job + activations <= usable), default=None)
    assert answer["most_jobs"] == truth
    assert answer["exact"] == (truth is not None and truth < high)
    assert len(tried) <= 12


def test_without_measured_peaks_the_search_bisects_to_the_answer():
    """A CPU smoke run measures no peak: the search still ends at the right size."""
    probes: list[Probe] = []
    while (n := next_size(probes, 10, 100, 0.0, 0.0)) is not None:
        probes.append(Probe(n, n <= 37))
    assert result(probes, 100) == {"most_jobs": 37, "exact": True, "probes": len(probes)}
    assert len(probes) <= 9


def test_a_range_whose_smallest_size_does_not_fit_says_so():
    answer, tried = search(50, 80, base=10.0, per_job=1.0, activations=0.0, usable=40.0, device=40.0)
    assert answer == {"most_jobs": None, "exact": False, "probes": 1} and tried == [50]
