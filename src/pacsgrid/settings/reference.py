"""docs/configuration.md, generated from the declarations (a test checks it is current)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pacsgrid.settings.sections import LISTS, SECTIONS, Settings


def describe_settings() -> str:
    """Markdown reference of every setting, generated from the declarations above."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `src/pacsgrid/settings/sections.py` (`pacsgrid config-reference`); "
        "a test checks it is current.",
        "",
        "Precedence: built-in default < TOML file (`--config`) < environment "
        "(`PACSGRID_<SECTION>_<KEY>`, e.g. `PACSGRID_DICOM_PORT=104`) < command line.",
        "",
    ]

    def table(cls: type[Any], title: str, prefix: str) -> None:
        out.extend([f"## {title}", "", "| key | default | meaning |", "|---|---|---|"])
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            )
            if isinstance(default, tuple):
                default = ", ".join(default)
            shown = "" if default == "" else f"`{default}`"
            out.append(f"| `{prefix}{f.name}` | {shown} | {f.metadata['help']} |")
        out.append("")

    table(Settings, "Top level", "")
    for name, cls in SECTIONS.items():
        table(cls, f"[{name}]", f"{name}.")
    for name, cls in LISTS.items():
        table(cls, f"[[{name}]] (repeatable)", "")
    return "\n".join(out)
