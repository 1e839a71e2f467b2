"""A raw DICOM upper layer peer for tests: a plain socket that sends exactly the bytes a test
asks for (malformed, out of order, truncated) and reads PDUs back, so nothing between the test
and the server repairs or refuses them first. Every wait is bounded."""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from pacsgrid.dicom import dimse, pdu

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@dataclass
class Received:
    type: int
    body: bytes


class RawPeer:
    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self._buf = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_pdu(self, timeout: float | None = None) -> Received | None:
        """The next PDU, or None when the server closed the connection."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if len(self._buf) >= 6:
                (length,) = struct.unpack_from(">I", self._buf, 2)
                if len(self._buf) >= 6 + length:
                    out = Received(self._buf[0], self._buf[6 : 6 + length])
                    self._buf = self._buf[6 + length :]
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no PDU from the server")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buf += chunk

    def closed_by_server(self, timeout: float) -> bool:
        """True when the server closes the connection within `timeout` (PDUs are read and
        dropped meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.recv_pdu(max(0.1, deadline - time.monotonic())) is None:
                    return True
            except TimeoutError:
                return False
        return False

    def associate(
        self,
        calling: str = "RAWPEER",
        contexts: list[tuple[str, list[str]]] | None = None,
        max_pdu: int = 16384,
    ) -> Received | None:
        rq = associate_rq(calling, contexts or [(VERIFICATION, [IMPLICIT])], max_pdu)
        self.send(rq)
        return self.recv_pdu()

    def message(
        self,
        context_id: int,
        command: dimse.Command,
        dataset: bytes | None = None,
        max_pdu: int = 16384,
    ) -> None:
        command[dimse.DATASET_TYPE] = dimse.NO_DATASET if dataset is None else dimse.HAS_DATASET
        pieces = pdu.encode_pdata(context_id, dimse.encode_command(command), True, max_pdu)
        if dataset is not None:
            pieces += pdu.encode_pdata(context_id, dataset, False, max_pdu)
        self.send(b"".join(bytes(p) for p in pieces))

    def response(self) -> dimse.Command:
        """The command set of the next message (its PDVs may span several PDUs)."""
        parts = b""
        while True:
            got = self.recv_pdu()
            assert got is not None, "the server closed the connection"
            assert got.type == pdu.P_DATA_TF, f"expected P-DATA-TF, got PDU type {got.type}"
            for _ctx, mch, data in pdu.iter_pdvs(memoryview(got.body)):
                if mch & 0x01:
                    parts += bytes(data)
                    if mch & 0x02:
                        return dimse.decode_command(parts)


def associate_rq(calling: str, contexts: list[tuple[str, list[str]]], max_pdu: int) -> bytes:
    return pdu.encode_associate_rq(
        pdu.AssociateRQ(
            "PACSGRID",
            calling,
            [
                pdu.PresentationContext(2 * i + 1, abstract, syntaxes)
                for i, (abstract, syntaxes) in enumerate(contexts)
            ],
            max_pdu,
            "1.2.3.4",
        )
    )


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))
