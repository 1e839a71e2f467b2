"""Fuzz fuzzers: each takes arbitrary bytes, hands them to one decoder, and lets through only
the errors that decoder documents. Anything else it raises is a crash: a bug to fix, and its
input becomes a file under tests/fuzz/crashes/<fuzzer>/ that `tests/test_fuzz.py` replays.

    header  pacsgrid.dicomfile.header.scan (the first byte picks the transfer syntax)
    part10  pacsgrid.dicomfile.part10.split_part10, then scan of the dataset it finds
    pdu     pacsgrid.dicom.pdu decoders (the first byte picks A-ASSOCIATE-RQ/AC/RJ or PDVs)
    dimse   pacsgrid.dicom.dimse.decode_command
"""

from __future__ import annotations

from collections.abc import Callable

from pacsgrid.dicom import dimse, pdu
from pacsgrid.dicomfile.header import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, scan
from pacsgrid.dicomfile.part10 import split_part10
from pacsgrid.errors import InvalidDataset

SYNTAXES = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED_LE)


def header(data: bytes) -> None:
    if not data:
        return
    try:
        scan(data[1:], SYNTAXES[data[0] % len(SYNTAXES)])
    except InvalidDataset:
        pass


def part10(data: bytes) -> None:
    try:
        p10 = split_part10(data)
        scan(data[p10.dataset_offset :], p10.transfer_syntax)
    except InvalidDataset:
        pass


def pdus(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    try:
        kind = data[0] % 4
        if kind == 0:
            pdu.decode_associate_rq(body)
        elif kind == 1:
            pdu.decode_associate_ac(body)
        elif kind == 2:
            pdu.decode_associate_rj(body)
        else:
            for _ctx, _mch, value in pdu.iter_pdvs(memoryview(body)):
                bytes(value)
    except pdu.PDUError:
        pass


def command(data: bytes) -> None:
    try:
        dimse.decode_command(data)
    except ValueError:
        pass


FUZZERS: dict[str, Callable[[bytes], None]] = {
    "header": header,
    "part10": part10,
    "pdu": pdus,
    "dimse": command,
}
