"""The layout is the architecture: front ends reach storage and the index only via Archive."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "pacsgrid"
FRONT_ENDS = ("dicom", "web", "migrate", "hl7")
BACK_ENDS = ("pacsgrid.storage", "pacsgrid.index")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_front_ends_do_not_import_storage_or_index(front_end: str) -> None:
    folder = SRC / front_end
    if not folder.exists():
        pytest.skip(f"{front_end}/ does not exist yet")
    offenders = {
        f"{path.relative_to(SRC)} imports {name}"
        for path in folder.rglob("*.py")
        for name in imports(path)
        if name.startswith(BACK_ENDS)
    }
    assert not offenders, sorted(offenders)


def test_public_names_of_the_index_package_exist() -> None:
    import pacsgrid.index as index

    for name in index.__all__:
        assert hasattr(index, name), name


def test_modules_stay_small() -> None:
    """STYLE.md: a few hundred lines per module; split by concept past that."""
    big = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 700
    }
    assert not big, big
