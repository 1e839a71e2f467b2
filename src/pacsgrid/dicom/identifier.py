"""C-FIND/C-MOVE/C-GET identifiers: read a request's keys, write response identifiers.

Requests are small, so pydicom parses them; but values are taken from the raw element bytes
(no value conversion: a date range or a wildcard is not a valid DA or IS value, and pydicom
would warn). Responses are encoded here directly: every return key is a string, so writing the
elements by hand is simpler and ten times faster than building pydicom Datasets.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset

from pacsgrid.dicomfile.header import EXPLICIT_BE, IMPLICIT_LE, LONG_VRS, _encodings, decode_value
from pacsgrid.errors import InvalidDataset
from pacsgrid.matching import Match, Query, parse_match
from pacsgrid.model import BY_KEYWORD, BY_TAG, COMPUTED, UNIQUE_KEY, Level

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
FAILED_SOP_INSTANCE_UID_LIST = 0x00080058
TRANSFER_SYNTAX_UID = 0x00020010  # not allowed in identifiers; we use AvailableTransferSyntax
AVAILABLE_TRANSFER_SYNTAX = 0x00083002

_COMPUTED_BY_TAG = {tag: (kw, vr, lvl) for kw, (tag, vr, lvl) in COMPUTED.items()}


@dataclass(frozen=True)
class RequestKey:
    tag: int
    vr: str
    value: str  # decoded text, backslashes kept


@dataclass(frozen=True)
class Request:
    level: Level
    keys: tuple[RequestKey, ...]

    def query(self, limit: int | None = None) -> Query:
        matches: list[Match] = []
        for k in self.keys:
            kw = _keyword(k.tag)
            if kw is None:
                continue
            m = parse_match(kw, k.value)
            if m is not None:
                matches.append(m)
        return Query(self.level, tuple(matches), limit)


def _keyword(tag: int) -> str | None:
    if tag in BY_TAG:
        return BY_TAG[tag].keyword
    if tag in _COMPUTED_BY_TAG:
        return _COMPUTED_BY_TAG[tag][0]
    return None


def decode_request(data: bytes, transfer_syntax: str) -> Request:
    """Parse a request identifier; raise InvalidDataset if it is unreadable or has no level."""
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(data), implicit, little)
            raw = list(ds.elements())  # raw elements: no value conversion
    except Exception as e:
        raise InvalidDataset(f"unreadable identifier: {e}") from None
    encodings = None
    for elem in raw:
        if elem.tag == SPECIFIC_CHARACTER_SET and elem.value:
            encodings = _encodings(bytes(elem.value))
    level: Level | None = None
    keys = []
    for elem in raw:
        tag = int(elem.tag)
        vr = elem.VR
        if not vr or vr == "UN":
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        value = elem.value if isinstance(elem.value, bytes) else b""
        if vr == "SQ":
            keys.append(RequestKey(tag, "SQ", ""))
            continue
        text = _raw_text(vr, value, encodings, little)
        if tag == QUERY_RETRIEVE_LEVEL:
            try:
                level = Level.parse(text)
            except ValueError:
                raise InvalidDataset(
                    f"QueryRetrieveLevel {text!r} is not one of PATIENT, STUDY, SERIES, IMAGE"
                ) from None
            continue
        if tag == SPECIFIC_CHARACTER_SET:
            continue
        keys.append(RequestKey(tag, vr, text))
    if level is None:
        raise InvalidDataset("identifier has no QueryRetrieveLevel")
    return Request(level, tuple(keys))


def _raw_text(vr: str, value: bytes, encodings: list[str] | None, little: bool) -> str:
    if vr in ("US", "UL", "SS", "SL", "FL", "FD", "AT", "OB", "OW", "UN"):
        return decode_value("US", value, None, little) if vr == "US" else ""
    # Keep multiple values (UID lists): decode without splitting.
    text = decode_value("LO" if vr not in ("PN",) else "PN", value, encodings, little)
    return text.strip()


# ---------------------------------------------------------------- responses


def response_elements(
    request: Request, row: dict[str, str], our_ae: str
) -> list[tuple[int, str, str]]:
    """(tag, VR, value) of a response: every requested key, plus the level's unique key."""
    out: dict[int, tuple[str, str]] = {QUERY_RETRIEVE_LEVEL: ("CS", request.level.value)}
    for k in request.keys:
        kw = _keyword(k.tag)
        if kw is not None:
            out[k.tag] = (k.vr if k.vr != "UN" else _vr_of(k.tag), row.get(kw, ""))
        elif k.tag == RETRIEVE_AE_TITLE:
            out[k.tag] = ("AE", our_ae)
        elif k.tag == INSTANCE_AVAILABILITY:
            out[k.tag] = ("CS", "ONLINE")
        elif k.tag == AVAILABLE_TRANSFER_SYNTAX:
            out[k.tag] = ("UI", row.get("TransferSyntaxUID", ""))
        else:
            out[k.tag] = (k.vr, "")  # a key we do not index: returned empty
    unique = BY_KEYWORD[UNIQUE_KEY[request.level]]
    out.setdefault(unique.tag, (unique.vr, row.get(unique.keyword, "")))
    if any(not v.isascii() for _, v in out.values()):
        out[SPECIFIC_CHARACTER_SET] = ("CS", "ISO_IR 192")
    return [(tag, vr, value) for tag, (vr, value) in sorted(out.items())]


def _vr_of(tag: int) -> str:
    if tag in BY_TAG:
        return BY_TAG[tag].vr
    if tag in _COMPUTED_BY_TAG:
        return _COMPUTED_BY_TAG[tag][1]
    return "UN"


def encode_elements(elements: list[tuple[int, str, str]], transfer_syntax: str) -> bytes:
    """Encode top-level elements with string values (SQ: empty sequence)."""
    implicit = transfer_syntax == IMPLICIT_LE
    bo = ">" if transfer_syntax == EXPLICIT_BE else "<"
    parts = []
    for tag, vr, value in elements:
        if vr == "SQ":
            raw = b""
        elif vr == "US":
            raw = struct.pack(bo + "H", int(value)) if value.strip().isdigit() else b""
        elif vr in (
            "UL",
            "SS",
            "SL",
            "FL",
            "FD",
            "AT",
            "OB",
            "OW",
            "UN",
            "OF",
            "OD",
            "OL",
            "OV",
            "SV",
            "UV",
        ):
            raw = b""
        else:
            raw = value.encode("utf-8") if not value.isascii() else value.encode("ascii")
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        group, elem = tag >> 16, tag & 0xFFFF
        if implicit:
            parts.append(struct.pack("<HHI", group, elem, len(raw)) + raw)
        elif vr.encode() in LONG_VRS:
            parts.append(struct.pack(bo + "HH2sHI", group, elem, vr.encode(), 0, len(raw)) + raw)
        else:
            parts.append(struct.pack(bo + "HH2sH", group, elem, vr.encode(), len(raw)) + raw)
    return b"".join(parts)


def failed_uids_identifier(uids: list[str], transfer_syntax: str) -> bytes:
    return encode_elements([(FAILED_SOP_INSTANCE_UID_LIST, "UI", "\\".join(uids))], transfer_syntax)
