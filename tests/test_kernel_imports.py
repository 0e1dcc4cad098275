"""The kernels' shared layer (CONTRIBUTING.md, Layers): a helper that more than one Triton op
module uses lives in ``kernels/_common.py`` under a public name, so no kernel module imports a
private name of another one, and ``_common`` imports no op module (static check of the sources)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
PACKAGE = "kdfast.kernels"


def private_uses(path: Path) -> list[str]:
    """Every private name of another kernel module that ``path`` imports or reads through a
    module alias, and every kernel module ``_common`` imports, as ``"line: what"``."""
    own = path.stem
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # local name -> kernel module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:  # from kdfast.kernels import at as at_kernels
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
                    if own == "_common":
                        found.append(f"{node.lineno}: imports kernel module {a.name}")
            elif node.module.startswith(PACKAGE + "."):  # from kdfast.kernels.at import _sqrt
                module = node.module.removeprefix(PACKAGE + ".")
                if own == "_common":
                    found.append(f"{node.lineno}: imports from kernel module {module}")
                found += [f"{node.lineno}: {module}.{a.name}" for a in node.names if a.name.startswith("_") and module != own]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + ".") and a.asname:
                    aliases[a.asname] = a.name.removeprefix(PACKAGE + ".")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and aliases[node.value.id] != own
        ):
            found.append(f"{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_no_private_names_across_kernel_modules(path):
    assert private_uses(path) == [], f"{path.name} reaches into another kernel module's private names"


def test_the_check_sees_private_imports(tmp_path):
    """Negative control: both spellings of a private import across modules are reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from kdfast.kernels import at as at_kernels\n"
        "from kdfast.kernels.softmax import _min_programs, row_launch\n"
        "x = at_kernels._sqrt\n"
        "y = at_kernels.at_maps\n"
    )
    assert private_uses(probe) == ["2: softmax._min_programs", "3: at._sqrt"]
