"""The packages' import direction: `kernels` is pure math, `scheduler` owns contracts, store and policy, `executor`
the training loop, `gateway` the tenants' HTTP API. executor -> scheduler, executor -> kernels, gateway -> scheduler;
nothing the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"kernels": set(), "scheduler": set(), "executor": {"scheduler", "kernels"}, "gateway": {"scheduler"}}
# The exceptions: the `lorafleet executor` and `lorafleet gateway` commands start those processes, importing them
# inside the command (so that the control plane never loads torch: test_control_plane_does_not_import_torch, nor the
# gateway's web stack: test_the_scheduler_imports_the_gateway_only_inside_its_command).
ENTRY_POINTS = {"scheduler/cli.py": {"executor", "gateway"}}


def lorafleet_imports(path: Path) -> set[str]:
    """The lorafleet packages `path` imports (top-level and function-local imports alike)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "lorafleet" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = str(path.relative_to(ROOT))
        wrong[name] = sorted(lorafleet_imports(path) - ALLOWED[package] - {package} - ENTRY_POINTS.get(name, set()))
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_scheduler_imports_the_gateway_only_inside_its_command():
    """The CLI's one import of the gateway is inside the `gateway` command, not at the module's top level."""
    tree = ast.parse((ROOT / "scheduler/cli.py").read_text())
    top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not any(module and module.startswith("lorafleet.gateway") for module in top_level)
    command = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "gateway")
    inside = [node for node in ast.walk(command) if isinstance(node, ast.ImportFrom)]
    assert [node.module for node in inside] == ["lorafleet.gateway"]
