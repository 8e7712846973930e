"""Running Triton kernels on the CPU in a test: Triton decides at decoration time whether a @triton.jit function is
interpreted, reading TRITON_INTERPRET then, so a kernel module compiled for a GPU earlier in this process is
re-imported."""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

RESTORED = ("TRITON_INTERPRET", "LORAFLEET_TRITON")  # put back as they were, whatever the tests inside set


@contextmanager
def interpreted(*modules: ModuleType, **env: str) -> Iterator[None]:
    """TRITON_INTERPRET=1 (and `env`) inside, each of `modules` (re-)imported interpreted; afterwards the variables
    restored and, where the process was not interpreting before, the modules re-imported as they were."""
    saved = {key: os.environ.get(key) for key in (*RESTORED, *env)}
    os.environ.update(TRITON_INTERPRET="1", **env)
    for module in modules:
        if not module.INTERPRETED:
            importlib.reload(module)
        assert module.INTERPRETED
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved["TRITON_INTERPRET"] != "1":
            for module in modules:
                importlib.reload(module)
