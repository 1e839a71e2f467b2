"""Store files with DCMTK storescu so that each one travels in its own transfer syntax.

storescu proposes only uncompressed syntaxes by default and converts what it sends; to store
every file as it is, files are grouped by transfer syntax and each group is sent with an
association profile (`-xf`) that proposes exactly that syntax for the group's SOP classes.
`storescu -v` then tells, per file, whether it was sent and what the archive answered.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import dcmtk
from tests.corpus import CorpusFile

SENDING = re.compile(r"^I: Sending file: (.+)$")
UNREADABLE = re.compile(
    r"^E: (?:Bad DICOM file|No SOP Class or Instance UID in file|"
    r"Cannot read file|No presentation context for).*?: (/.+?)(?::.*)?$"
)


@dataclass
class StoreRun:
    stored: list[Path] = field(default_factory=list)  # in the order the archive got them
    failed: dict[Path, str] = field(default_factory=dict)  # the archive refused it
    unreadable: list[Path] = field(default_factory=list)  # DCMTK could not read the file
    output: str = ""


def association_profiles(files: list[CorpusFile], cfg: Path) -> list[tuple[str, list[Path]]]:
    groups: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in files:
        groups[f.transfer_syntax].append(f)
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(sorted(groups)):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines.append("[[PresentationContexts]]")
    for i, ts in enumerate(sorted(groups)):
        lines.append(f"[PC{i}]")
        classes = sorted({f.sop_class_uid for f in groups[ts] if f.sop_class_uid})
        for j, sop_class in enumerate(classes, 1):
            lines.append(f"PresentationContext{j} = {sop_class}\\TS{i}")
    lines.append("[[Profiles]]")
    for i, _ in enumerate(sorted(groups)):
        lines += [f"[P{i}]", f"PresentationContexts = PC{i}"]
    cfg.write_text("\n".join(lines) + "\n")
    return [(f"P{i}", [f.path for f in groups[ts]]) for i, ts in enumerate(sorted(groups))]


def store_with_storescu(
    port: int, files: list[CorpusFile], workdir: Path, aet: str = "STORESCU"
) -> StoreRun:
    run = StoreRun()
    cfg = workdir / "storescu.cfg"
    for profile, paths in association_profiles(files, cfg):
        proc = dcmtk(
            "storescu",
            "-v",
            "-nh",
            "-aet",
            aet,
            "-aec",
            "PACSGRID",
            "-xf",
            cfg,
            profile,
            "127.0.0.1",
            port,
            *paths,
            timeout=300,
        )
        run.output += proc.stdout
        parse_output(proc.stdout, paths, run)
    return run


def parse_output(text: str, paths: list[Path], run: StoreRun) -> None:
    """Add what `storescu -v` printed about `paths` to `run`: a file is stored only when its
    C-STORE response said Success."""
    current: Path | None = None
    for line in text.splitlines():
        m = SENDING.match(line)
        if m:
            current = Path(m.group(1))
            continue
        m = UNREADABLE.match(line)
        if m:
            run.unreadable.append(Path(m.group(1)))
            continue
        if current is not None and line.startswith("I: Received Store Response"):
            if "(Success)" in line:
                run.stored.append(current)
            else:
                run.failed[current] = line
            current = None
        elif current is not None and line.startswith("E: Store Failed"):
            run.failed[current] = line
            current = None
    fatal = [line for line in text.splitlines() if line.startswith("F: ")]
    done = set(run.stored) | set(run.failed) | set(run.unreadable)
    for path in paths:
        if path not in done:
            run.failed[path] = fatal[-1] if fatal else "storescu did not send it"
