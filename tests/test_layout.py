"""The layout is the architecture: front ends reach storage and the index only via Archive."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "pacsgrid"
FRONT_ENDS = ("dicom", "web", "migrate", "hl7", "cli")
BACK_ENDS = ("pacsgrid.storage", "pacsgrid.index")
CORE = ("archive", "index", "storage")
# DICOM files without networking (pacsgrid.dicomfile): the core may use it, and it uses
# nothing above it.
FILE_FORMAT = "dicomfile"
# The archive's collaborators: private to it; pacsgrid.node hands the jobs what they need of
# them, and tests/behind_the_archive.py lets tests look at them.
COLLABORATORS = {"index", "sites", "placement", "cache", "committer"}
PRIVATE = {f"_{name}" for name in COLLABORATORS}
REPO = SRC.parent.parent
MAY_REACH_BEHIND = (SRC / "archive", SRC / "node.py", REPO / "tests" / "behind_the_archive.py")


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


def _front_or_job(name: str) -> bool:
    if name.startswith(("pacsgrid.jobs", "pacsgrid.node", "pacsgrid.served")):
        return True
    return any(name == f"pacsgrid.{f}" or name.startswith(f"pacsgrid.{f}.") for f in FRONT_ENDS)


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_no_front_end_and_no_job(core: str) -> None:
    offenders = {
        f"{path.relative_to(SRC)} imports {name}"
        for path in (SRC / core).rglob("*.py")
        for name in imports(path)
        if _front_or_job(name)
    }
    assert not offenders, sorted(offenders)


def test_dicom_files_need_no_network_no_archive_and_no_index() -> None:
    """pacsgrid.dicomfile reads and writes DICOM files; the network layer, the archive and the
    index are built on it, never the other way round."""
    above = ("pacsgrid.archive", "pacsgrid.index", "pacsgrid.storage", "pacsgrid.node")
    offenders = {
        f"{path.relative_to(SRC)} imports {name}"
        for path in (SRC / FILE_FORMAT).rglob("*.py")
        for name in imports(path)
        if _front_or_job(name) or name.startswith(above)
    }
    assert not offenders, sorted(offenders)


def _reaches_into_the_archive(node: ast.AST) -> bool:
    """`archive.index`, `self.archive.sites`, `ctx.archive.placement`..."""
    if not (isinstance(node, ast.Attribute) and node.attr in COLLABORATORS):
        return False
    owner = node.value
    return (isinstance(owner, ast.Name) and owner.id == "archive") or (
        isinstance(owner, ast.Attribute) and owner.attr == "archive"
    )


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_front_ends_ask_the_archive_and_not_its_collaborators(front_end: str) -> None:
    offenders = {
        f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node)}"
        for path in (SRC / front_end).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if _reaches_into_the_archive(node)
    }
    assert not offenders, sorted(offenders)


def _python_files() -> list[Path]:
    return [p for top in ("src", "tests", "bench") for p in sorted((REPO / top).rglob("*.py"))]


def test_only_the_archive_and_the_node_reach_its_private_collaborators() -> None:
    """`x._index`, `x._placement`... of anything but `self`, outside archive/, node.py (which
    builds the jobs) and the tests' one window on them."""
    offenders = {
        f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}"
        for path in _python_files()
        if not any(path == p or p in path.parents for p in MAY_REACH_BEHIND)
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute)
        and node.attr in PRIVATE
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }
    assert not offenders, sorted(offenders)


def test_the_archive_keeps_its_collaborators_private(tmp_path: Path) -> None:
    from pacsgrid.archive import Archive
    from pacsgrid.settings import Overrides, load_settings

    archive = Archive(load_settings(Overrides(data_dir=tmp_path), environ={}), probe_interval=0)
    try:
        public = COLLABORATORS & {*vars(archive), *dir(type(archive))}
        assert not public, sorted(public)
    finally:
        archive.close()


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
