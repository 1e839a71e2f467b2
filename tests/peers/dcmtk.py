"""DCMTK's storescp as a peer that receives: a C-MOVE destination, a forwarding peer, the
ceiling of an ingest benchmark. It writes what it receives into a folder, one file each."""

from __future__ import annotations

from pathlib import Path

from tests.peers.program import DCMTK_ENV, Program, dcmtk_tool, free_port


class StoreSCP(Program):
    """`storescp -aet AET -od OUT OPTIONS PORT` on a free port (or `port`), ready once the
    port listens. `options` are storescp's: "+xa" accepts every transfer syntax, "+B" writes
    the received bytes unchanged, "--fork" takes associations side by side, "-v" logs them."""

    def __init__(
        self,
        out: Path,
        aet: str = "STORESCP",
        *,
        port: int | None = None,
        options: tuple[str, ...] = ("+xa", "+B", "-pm", "-v"),
        log: Path | None = None,
    ) -> None:
        self.out = out
        self.aet = aet
        self.port = port or free_port()
        self.options = options
        super().__init__("storescp", log or out.parent / f"storescp-{self.port}.log")

    def command(self) -> list[str]:
        return [
            dcmtk_tool("storescp"),
            "-aet",
            self.aet,
            "-od",
            str(self.out),
            *self.options,
            str(self.port),
        ]

    def start(self, timeout: float = 30.0) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        self.launch(self.command(), env=DCMTK_ENV)
        self.wait_listening(self.port, timeout)
        return self

    def files(self) -> list[Path]:
        """What it wrote (in sub-folders too), sorted."""
        return sorted(p for p in self.out.rglob("*") if p.is_file()) if self.out.exists() else []

    def clear(self) -> None:
        for p in self.files():
            p.unlink()
