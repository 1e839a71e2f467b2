"""The web face is a front end: it reaches the index and the storage sites only through
`Archive` (ARCHITECTURE.md, rule 3), so access control, audit and durability cannot be
bypassed by a handler."""

from __future__ import annotations

import ast
from pathlib import Path

WEB = Path(__file__).resolve().parent.parent / "src/pacsgrid/web"


def test_web_imports_neither_index_nor_storage() -> None:
    offenders = []
    for path in sorted(WEB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith(("pacsgrid.index", "pacsgrid.storage")):
                    offenders.append(f"{path.name}: {name}")
    assert len(list(WEB.glob("*.py"))) >= 10
    assert offenders == []
