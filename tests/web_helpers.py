"""Helpers for the web tests: a `pacsgrid serve` with its web face, raw STOW, multipart."""

from __future__ import annotations

import email.parser
import email.policy
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import REPO, Server, free_port


def start_web(
    data_dir: Path,
    *,
    workers: int = 1,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[Server, str]:
    """A server with DICOM and HTTP on free ports; returns it and its base URL."""
    http = free_port()
    server = Server(data_dir, workers=workers, args=("--http-port", str(http), *extra), env=env)
    server.start()
    base = f"http://127.0.0.1:{http}"
    wait_http(base + "/health", server)
    return server, base


def wait_http(url: str, server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} does not answer:\n{server.text()[-3000:]}")


def multipart_body(files: list[bytes], boundary: str = "pacsgridtestboundary") -> tuple[bytes, str]:
    body = b""
    for data in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(part content type, body) of a multipart/related response, parsed by the standard
    library's email parser (not pacsgrid's)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_parts()]


def audit_records(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def users(data_dir: Path, *args: str, stdin: str = "") -> str:
    """Run `pacsgrid users ARGS` on the archive in `data_dir`; its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "pacsgrid", "users", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()
