"""`pacsgrid serve` as a subprocess, as a user starts it: on 127.0.0.1, a free DICOM port (and
an HTTP port when asked), ready once the ports listen."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.peers.program import HOST, Program, free_port


class Server(Program):
    """`pacsgrid serve --data-dir DATA_DIR`; `workers=0` leaves the number to pacsgrid (one
    per CPU core, at least two); `args` go last (a second `--port 0` turns DICOM off, for
    TLS only); `env` adds to the environment; `python` is the interpreter (another build's
    virtualenv). The log goes next to the data folder unless `log` names one."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        workers: int = 1,
        args: tuple[str, ...] = (),
        config: Path | None = None,
        env: dict[str, str] | None = None,
        http_port: int | None = None,
        python: str = sys.executable,
        log: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        super().__init__(
            "pacsgrid serve", log or data_dir.parent / f"{data_dir.name}-serve-{self.port}.log"
        )
        self.workers = workers
        self.args = args
        self.config = config
        self.env = env or {}
        self.http_port = http_port
        self.python = python

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "pacsgrid", "serve", "--data-dir", str(self.data_dir)]
        cmd += ["--port", str(self.port), "--bind", HOST]
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        if self.http_port:
            cmd += ["--http-port", str(self.http_port)]
        if self.config:
            cmd += ["--config", str(self.config)]
        return cmd + list(self.args)

    def start(self, timeout: float = 60.0) -> Server:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.launch(self.command(), env=self.env)
        self.wait_listening(self.port, timeout)
        if self.http_port:
            self.wait_listening(self.http_port, timeout)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port
