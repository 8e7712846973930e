"""Waiting on real processes: poll a condition until it holds, or fail saying what never happened."""

from __future__ import annotations

import time
from typing import Callable, Optional


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 90.0,
               details: Optional[Callable[[], str]] = None, interval: float = 0.05):
    """The first truthy value of `predicate()`; AssertionError naming `what` (and `details()`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f":\n{details()}" if details else ""))
