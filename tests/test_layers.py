"""The layering of CONTRIBUTING.md: no module imports a layer above it, and the eager references
(the tests' oracle) stay out of the production path (backend "torch" is kdfast/eager)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Everything above the ground floor: kdfast/numerics imports none of it, and the two eager layers
# on that floor (kdfast/eager: backend "torch"; kdfast/reference: the tests' oracle) only themselves.
ABOVE_NUMERICS = (
    "kdfast.eager",
    "kdfast.reference",
    "kdfast.ops",
    "kdfast.functional",
    "kdfast.nn",
    "kdfast.distillers",
    "kdfast.engine",
    "kdfast.kernels",
)


def _above_numerics_but(own: str) -> tuple[str, ...]:
    return tuple(name for name in ABOVE_NUMERICS if name != own)


# package folder -> kdfast modules it must not import (prefix match)
FORBIDDEN = {
    "kdfast/numerics": ABOVE_NUMERICS,
    "kdfast/eager": _above_numerics_but("kdfast.eager"),
    "kdfast/reference": _above_numerics_but("kdfast.reference"),
    "kernels": (
        "kdfast.eager",
        "kdfast.ops",
        "kdfast.reference",
        "kdfast.functional",
        "kdfast.nn",
        "kdfast.distillers",
        "kdfast.engine",
    ),
    "kdfast/ops": ("kdfast.reference", "kdfast.functional", "kdfast.nn", "kdfast.distillers", "kdfast.engine"),
    "kdfast/distillers": ("kdfast.engine", "kdfast.reference"),
    "kdfast/models": ("kdfast.distillers", "kdfast.engine", "kdfast.reference"),
    "kdfast/data": ("kdfast.distillers", "kdfast.engine", "kdfast.reference"),
}
# The only library modules that may import kdfast.reference (the tests' oracle): the end-to-end
# benchmark's eager baselines (the peers' unfused losses) and the demo's float64 check.
REFERENCE_USERS = ("kdfast/engine/bench.py", "kdfast/demo.py", "kdfast/reference/")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("folder", FORBIDDEN)
def test_no_upward_imports(folder):
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[folder])
    ]
    assert not bad, "\n".join(bad)


def test_reference_stays_out_of_the_production_path():
    bad = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "kdfast").rglob("*.py"))
        if not str(path.relative_to(ROOT)).startswith(REFERENCE_USERS)
        and any(name.startswith("kdfast.reference") for name in imported_modules(path))
    ]
    assert not bad, f"modules importing kdfast.reference: {bad}"
