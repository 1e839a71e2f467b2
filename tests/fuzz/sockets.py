"""A socket-level fuzzer of PDU sequences against a running server.

Each round builds a valid exchange (A-ASSOCIATE-RQ, C-ECHO, a C-STORE cut into P-DATA-TF
fragments of random sizes, A-RELEASE-RQ) and, most of the time, mutates it: PDUs dropped,
repeated, swapped or moved; lengths changed (a little, or to 4 GB); bytes flipped; bodies cut
short; garbage, unknown PDU types, A-ABORTs and early P-DATA inserted. It is sent on a raw
socket and the answers read until the server closes or goes quiet. Every C-STORE the server
acknowledged (status 0000) is remembered. After each batch the server must answer C-ECHO,
and every instance it ever acknowledged must come back, byte for byte, by C-GET.

    python -m tests.fuzz.sockets --port 11112 --sequences 400 --seconds 120

Bounded in count and time; sends only to 127.0.0.1. Random but seeded: a failure names its
seed, and the same seed replays it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from pacsgrid.dicom import dimse, pdu

VERIFICATION = "1.2.840.10008.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
GET = "1.2.840.10008.5.1.4.1.2.2.3"
EXPLICIT = "1.2.840.10008.1.2.1"
STUDY = "1.2.826.0.1.3680043.10.1234.77"
SERIES = STUDY + ".1"


def dataset(sop_uid: str, rng: random.Random) -> bytes:
    """A small Secondary Capture instance (explicit VR little endian, no file meta)."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.PatientID = "FUZZ"
    ds.PatientName = "Socket^Fuzzer"
    ds.Modality = "OT"
    ds.ImageComments = "x" * rng.randrange(0, 3000, 2)
    fp = DicomBytesIO()
    fp.is_implicit_VR = False
    fp.is_little_endian = True
    write_dataset(fp, ds)
    return fp.getvalue()


def message(ctx: int, command: dimse.Command, data: bytes | None, size: int) -> list[bytes]:
    command[dimse.DATASET_TYPE] = dimse.NO_DATASET if data is None else dimse.HAS_DATASET
    pieces = pdu.encode_pdata(ctx, dimse.encode_command(command), True, size)
    if data is not None:
        pieces += pdu.encode_pdata(ctx, data, False, size)
    out, current = [], b""
    for piece in pieces:  # header + payload pairs make one PDU each
        if bytes(piece[:1]) == bytes([pdu.P_DATA_TF]) and current:
            out.append(current)
            current = b""
        current += bytes(piece)
    return [*out, current]


@dataclass
class Exchange:
    pdus: list[bytes]
    sop_uid: str
    dataset: bytes


def valid_exchange(rng: random.Random, n: int) -> Exchange:
    sop_uid = f"{SERIES}.{n}.{rng.randrange(10**9)}"
    data = dataset(sop_uid, rng)
    rq = pdu.encode_associate_rq(
        pdu.AssociateRQ(
            "PACSGRID",
            "SOCKFUZZ",
            [
                pdu.PresentationContext(1, VERIFICATION, ["1.2.840.10008.1.2"]),
                pdu.PresentationContext(3, SC, [EXPLICIT]),
            ],
            16384,
            "1.2.3.4",
        )
    )
    size = rng.choice([64, 200, 1000, 4096, 16384])
    echo = message(
        1,
        {dimse.AFFECTED_SOP_CLASS: VERIFICATION, dimse.COMMAND_FIELD: 0x30, dimse.MESSAGE_ID: 1},
        None,
        size,
    )
    store = message(
        3,
        {
            dimse.AFFECTED_SOP_CLASS: SC,
            dimse.COMMAND_FIELD: dimse.C_STORE_RQ,
            dimse.MESSAGE_ID: 2,
            dimse.PRIORITY: 0,
            dimse.AFFECTED_SOP_INSTANCE: sop_uid,
        },
        data,
        size,
    )
    return Exchange([rq, *echo, *store, pdu.RELEASE_RQ], sop_uid, data)


def _set_length(p: bytes, length: int) -> bytes:
    return p[:2] + struct.pack(">I", length & 0xFFFFFFFF) + p[6:]


def mutate(pdus: list[bytes], rng: random.Random) -> tuple[list[bytes], list[str]]:
    """1-3 mutations of a PDU sequence, and their names (for the failure message)."""
    out = list(pdus)
    done = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(out))
        kind = rng.choice(
            [
                "drop",
                "repeat",
                "swap",
                "move",
                "length",
                "huge",
                "flip",
                "cut",
                "garbage",
                "unknown",
                "abort",
                "early-pdata",
                "type",
            ]
        )
        p = out[i]
        if kind == "drop" and len(out) > 1:
            out.pop(i)
        elif kind == "repeat":
            out.insert(i, p)
        elif kind == "swap":
            j = rng.randrange(len(out))
            out[i], out[j] = out[j], out[i]
        elif kind == "move":
            out.insert(rng.randrange(len(out)), out.pop(i))
        elif kind == "length":
            out[i] = _set_length(p, len(p) - 6 + rng.choice([-7, -1, 1, 2, 100]))
        elif kind == "huge":
            out[i] = _set_length(p, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 24]))
        elif kind == "flip" and len(p) > 6:
            b = bytearray(p)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(6, len(b))] = rng.randrange(256)
            out[i] = bytes(b)
        elif kind == "cut":
            out[i] = p[: rng.randrange(len(p))]
        elif kind == "garbage":
            out.insert(i, bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        elif kind == "unknown":
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 32)))
            out.insert(
                i,
                bytes([rng.choice([0, 8, 9, 0x47, 0xFF]), 0]) + struct.pack(">I", len(body)) + body,
            )
        elif kind == "abort":
            out.insert(i, pdu.encode_abort(rng.choice([0, 2]), rng.randrange(7)))
        elif kind == "early-pdata":
            out.insert(0, out[rng.randrange(1, len(out))] if len(out) > 1 else p)
        elif kind == "type":
            out[i] = bytes([rng.randint(1, 7)]) + p[1:]
        done.append(kind)
    return out, done


@dataclass
class Outcome:
    # SOP UID -> the dataset sent (None: mutated on the way, so what arrived is not known)
    acknowledged: dict[str, bytes | None] = field(default_factory=dict)
    sequences: int = 0
    mutated: int = 0


def play(port: int, ex: Exchange, pdus: list[bytes], outcome: Outcome, wait: float = 0.5) -> None:
    """Send `pdus` on a fresh connection; read answers until closed or `wait` seconds quiet;
    remember the instance if the server acknowledged its C-STORE."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for p in pdus:
            try:
                sock.sendall(p)
            except OSError:
                break
        received = b""
        sock.settimeout(wait)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            received += chunk
    if stored_ok(received, ex.sop_uid):
        outcome.acknowledged[ex.sop_uid] = ex.dataset if pdus is ex.pdus else None


def stored_ok(stream: bytes, sop_uid: str) -> bool:
    """Whether the server's bytes hold a C-STORE-RSP with status 0000 for `sop_uid`."""
    pos, command = 0, b""
    while pos + 6 <= len(stream):
        kind, _, length = struct.unpack_from(">BBI", stream, pos)
        body = stream[pos + 6 : pos + 6 + length]
        pos += 6 + length
        if kind != pdu.P_DATA_TF or len(body) < length:
            continue
        try:
            pdvs = pdu.iter_pdvs(memoryview(body))
        except pdu.PDUError:
            return False
        for _ctx, mch, data in pdvs:
            if mch & 0x01:
                command += bytes(data)
                if mch & 0x02:
                    cmd = dimse.decode_command(command)
                    command = b""
                    if (
                        cmd.get(dimse.COMMAND_FIELD) == dimse.C_STORE_RSP
                        and cmd.get(dimse.STATUS) == 0
                        and cmd.get(dimse.AFFECTED_SOP_INSTANCE) == sop_uid
                    ):
                        return True
    return False


def check(port: int, outcome: Outcome) -> None:
    """The server answers C-ECHO, and gives back every acknowledged instance by C-GET."""
    from pacsgrid.dicom.scu import connect

    async def go() -> dict[str, bytes]:
        assoc = await connect(
            "127.0.0.1",
            port,
            "SOCKFUZZ",
            "PACSGRID",
            [(VERIFICATION, ["1.2.840.10008.1.2"])],
            timeout=30,
        )
        try:
            assert await assoc.c_echo() == 0, "C-ECHO failed"
        finally:
            await assoc.release()
        got: dict[str, bytes] = {}

        async def on_store(msg: dimse.Message, ctx: object) -> int:
            got[str(msg.command.get(dimse.AFFECTED_SOP_INSTANCE, ""))] = msg.dataset or b""
            return 0

        getter = await connect(
            "127.0.0.1",
            port,
            "SOCKFUZZ",
            "PACSGRID",
            [(GET, [EXPLICIT]), (SC, [EXPLICIT])],
            timeout=60,
            scp_roles=[SC],
            on_store=on_store,
        )
        try:
            ident = (
                b"\x08\x00\x52\x00CS\x06\x00STUDY "
                + b"\x20\x00\x0d\x00UI"
                + struct.pack("<H", len(STUDY) + len(STUDY) % 2)
                + STUDY.encode()
                + b"\x00" * (len(STUDY) % 2)
            )
            async for rsp in getter.c_get(1, ident, timeout=120):
                final = int(rsp.command.get(dimse.STATUS, 0))
            assert final in (0, 0xA701) or not outcome.acknowledged, hex(final)
        finally:
            await getter.release()
        return got

    from pacsgrid.dicomfile.header import scan

    got = asyncio.run(go())
    for uid, data in outcome.acknowledged.items():
        assert uid in got, f"acknowledged {uid} is not retrievable"
        if data is not None:
            assert got[uid] == data, f"{uid} came back different"
        assert scan(got[uid], EXPLICIT).sop_instance_uid == uid


def fuzz(port: int, *, sequences: int, seconds: float, seed: int, batch: int = 25) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome()
    deadline = time.monotonic() + seconds
    n = 0
    while n < sequences and time.monotonic() < deadline:
        for _ in range(min(batch, sequences - n)):
            ex = valid_exchange(rng, n)
            pdus, kinds = ex.pdus, []
            if rng.random() < 0.8:
                pdus, kinds = mutate(ex.pdus, rng)
                outcome.mutated += 1
            try:
                play(port, ex, pdus, outcome)
            except Exception as e:
                raise AssertionError(f"seed {seed}, sequence {n} ({kinds}): {e}") from e
            n += 1
        outcome.sequences = n
        try:
            check(port, outcome)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, after sequence {n}: {e}") from None
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fuzz a running pacsgrid's DICOM port with PDUs.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sequences", type=int, default=400)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    out = fuzz(args.port, sequences=args.sequences, seconds=args.seconds, seed=args.seed)
    print(
        f"{out.sequences} sequences ({out.mutated} mutated), {len(out.acknowledged)} stores "
        "acknowledged, all retrievable; C-ECHO answered after every batch"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
