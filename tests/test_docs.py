"""The docs cannot drift: the site builds strictly, and what the pages show is checked.

`mkdocs build --strict` fails on a broken link between pages, to a heading, or to a file of the
repository (docs/hooks/repository.py publishes those, so a missing one is a missing page). The
other tests check what mkdocs cannot: every page is in the navigation, every `pacsgrid` command
in a code block parses with the real command line, every TOML example loads as a
configuration, the architecture page names only modules that exist, and the pages speak to
users. (docs/cli.md and docs/configuration.md are checked by tests/test_settings.py.)
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pacsgrid.cli.main import build_parser
from pacsgrid.settings import Overrides, load_settings

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
HOOK = DOCS / "hooks" / "repository.py"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def pages() -> list[Path]:
    """Every page of the docs: the README (the site's home page), docs/, the benchmark history."""
    docs = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)
    return [REPO / "README.md", *docs, REPO / "bench" / "results" / "HISTORY.md"]


def code_blocks(path: Path, *languages: str) -> Iterator[str]:
    for m in FENCE.finditer(path.read_text()):
        if m.group(1) in languages:
            yield m.group(2)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------------------- the site


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    out = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, out.stdout + out.stderr
    site = tmp_path / "site"
    home = (site / "index.html").read_text()
    assert "./scripts/serve" in home, "the README is the home page"
    # Repository files the pages link to are published, and the links point at them.
    assert (site / "repository" / "bench" / "results" / "HISTORY" / "index.html").is_file()
    assert (site / "repository" / "deploy" / "haproxy.cfg").is_file()
    performance = (site / "performance" / "index.html").read_text()
    assert 'href="../repository/bench/results/HISTORY/"' in performance


def small_site(tmp_path: Path, readme: str, page: str) -> Path:
    """A repository with one docs page and one file outside docs/, built with the real hook."""
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.md").write_text("# A run\n\n## Ingest\n\nnumbers\n")
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "page.md").write_text(page)
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "site_name": "t",
                "theme": {"name": "mkdocs", "highlightjs": False},
                "hooks": [str(HOOK)],
                "validation": {
                    "links": {"not_found": "warn", "anchors": "warn", "unrecognized_links": "warn"}
                },
                "nav": [{"Home": "index.md"}, {"Page": "page.md"}],
            }
        )
    )
    return config


def test_links_to_repository_files_are_published_and_checked(tmp_path: Path) -> None:
    good = small_site(
        tmp_path / "good",
        "# Home\n\n[page](docs/page.md) [run](results/run.md#ingest)\n",
        "# Page\n\n[home](../README.md) [run](../results/run.md)\n",
    )
    out = mkdocs_build(good, tmp_path / "good-site")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "good-site" / "repository" / "results" / "run" / "index.html").is_file()

    for n, (readme, page, complaint) in enumerate(
        [
            ("# Home\n", "# Page\n\n[run](../results/gone.md)\n", "repository/results/gone.md"),
            ("# Home\n\n[run](results/run.md#nowhere)\n", "# Page\n", "#nowhere"),
            ("# Home\n\n[page](docs/gone.md)\n", "# Page\n", "gone.md"),
            ("# Home\n", "# Page\n\n[results](../results/)\n", "repository/results"),
        ]
    ):
        bad = small_site(tmp_path / f"bad{n}", readme, page)
        out = mkdocs_build(bad, tmp_path / f"bad{n}-site")
        assert out.returncode != 0, f"a broken link built: {readme!r} {page!r}"
        assert complaint in out.stdout + out.stderr


def test_every_page_is_in_the_navigation() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def files(nav: object) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from files(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from files(value)

    listed = set(files(config["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages() if p.is_relative_to(DOCS)}
    missing = sorted(on_disk - listed)
    assert not missing, f"add these pages to the nav in mkdocs.yml: {missing}"


def test_the_readme_starts_with_the_two_commands() -> None:
    first = next(code_blocks(REPO / "README.md", "sh")).splitlines()
    assert [line.split()[0] for line in first] == ["./scripts/serve", "./scripts/test"]


# ---------------------------------------------------------------------------- examples


def shell_commands(block: str, prompt_only: bool) -> Iterator[list[str]]:
    """Simple commands of a shell block (continuations joined, heredoc bodies skipped, split at
    ; && || | &), as argument lists without leading VAR=value and redirections."""
    lines, heredoc = [], None
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if m := re.search(r"<<-?\s*'?(\w+)'?", line):
            heredoc = m.group(1)
        if prompt_only:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        lines.append(line)
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while command and "=" in command[0] and not command[0].startswith("-"):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                command.append(token)


def pacsgrid_commands() -> list[tuple[Path, list[str]]]:
    found = []
    for path in pages():
        blocks = [(b, False) for b in code_blocks(path, "sh", "bash")]
        blocks += [(b, True) for b in code_blocks(path, "", "console")]
        for block, prompt_only in blocks:
            for command in shell_commands(block, prompt_only):
                for redirect in (">", ">>", "<", "<<"):
                    if redirect in command:
                        command = command[: command.index(redirect)]
                if command[0] in ("pacsgrid", ".venv/bin/pacsgrid"):
                    found.append((path, command[1:]))
                elif command[0] == "./scripts/serve":
                    found.append((path, ["serve", *command[1:]]))
    return found


def test_every_pacsgrid_command_in_the_docs_parses() -> None:
    commands = pacsgrid_commands()
    assert len(commands) > 40, "the examples were not found"
    wrong = []
    for path, args in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(args)
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1:]
            wrong.append(f"{path.relative_to(REPO)}: pacsgrid {shlex.join(args)}: {message}")
    assert not wrong, "\n".join(wrong)


def pem(folder: Path, quoted: str) -> str:
    """A stand-in for a certificate file an example names (the loader checks it exists)."""
    path = folder / Path(quoted.strip('"')).name
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return f'"{path}"'


def test_every_toml_example_is_a_valid_configuration(tmp_path: Path) -> None:
    examples = [(p, b) for p in pages() for b in code_blocks(p, "toml")]
    assert len(examples) > 5, "the examples were not found"
    wrong = []
    for n, (path, text) in enumerate(examples):
        config = tmp_path / f"{n}.toml"
        config.write_text(re.sub(r'"/[^"]+\.pem"', lambda m: pem(tmp_path, m.group(0)), text))
        try:
            load_settings(Overrides(config=config), environ={})
        except Exception as e:
            wrong.append(f"{path.relative_to(REPO)}, example {n}: {e}")
    assert not wrong, "\n".join(wrong)


def test_the_shell_splitter_sees_what_a_shell_sees() -> None:
    block = (
        'echo "$PW" | pacsgrid users add a --role admin --password-stdin  # a comment\n'
        "PACSGRID_DICOM_PORT=abc pacsgrid status --json > out.json &\n"
        "python - <<'PY'\npacsgrid is not a command here\nPY\n"
        "pacsgrid haproxy-config --listen :104 \\\n    --node n=10.0.0.1:104\n"
    )
    commands = list(shell_commands(block, prompt_only=False))
    assert ["pacsgrid", "users", "add", "a", "--role", "admin", "--password-stdin"] in commands
    assert ["pacsgrid", "status", "--json", ">", "out.json"] in commands
    assert ["pacsgrid", "haproxy-config", "--listen", ":104", "--node", "n=10.0.0.1:104"] in (
        commands
    )
    assert not any("here" in c for c in commands)


# ---------------------------------------------------------------------------- architecture

PATH_TOKEN = re.compile(r"(?<![\w./-])([a-z_][a-z0-9_]*(?:/[a-z_][a-z0-9_]*)*(?:/|\.py))(?![\w/-])")
REPO_FOLDERS = ("src/", "tests/", "bench/", "docs/", "deploy/", "scripts/")


def test_the_architecture_page_names_real_modules() -> None:
    text = (DOCS / "architecture.md").read_text()
    package = REPO / "src" / "pacsgrid"
    module_names = {p.name for p in package.rglob("*.py")}
    wrong = []
    for token in sorted(set(PATH_TOKEN.findall(text))):
        if token.startswith(REPO_FOLDERS):
            exists = (REPO / token).exists()
        elif "/" in token:
            exists = (package / token).exists()
        else:
            exists = token in module_names  # a module inside the box of its package
        if not exists:
            wrong.append(token)
    assert not wrong, f"docs/architecture.md names what does not exist: {wrong}"
    # ... and names every package and top-level module, so a new one cannot go unmentioned.
    tokens = set(PATH_TOKEN.findall(text))
    top = {
        p.name + "/" if p.is_dir() else p.name
        for p in package.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
    }
    assert not sorted(top - tokens), f"docs/architecture.md leaves out {sorted(top - tokens)}"


# ---------------------------------------------------------------------------- wording

PROJECT_WORDS = re.compile(r"\b(issues?|tickets?|targets?|sessions?)\b", re.IGNORECASE)


@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_docs_speak_to_users(path: Path) -> None:
    """No issues, tickets, targets or sessions: words of the project's bookkeeping, not of
    the archive (setting names in code, like `audit_log.target`, are fine)."""
    prose = FENCE.sub("", path.read_text())
    prose = re.sub(r"`[^`\n]*`", "", prose)
    found = sorted({m.group(0) for m in PROJECT_WORDS.finditer(prose)})
    assert not found, f"{path.relative_to(REPO)} speaks of {found}"
