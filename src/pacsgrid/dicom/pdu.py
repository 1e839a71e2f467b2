"""DICOM Upper Layer PDUs (PS3.8 section 9.3): association, data, release, abort.

A small codec of our own, because the association PDUs are read once per association but the
P-DATA-TF path runs for every message: this module keeps that path to a few `struct` calls.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE = 0
USER_REJECTION = 1
NO_REASON = 2
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_NO_REASON = 1
RJ_CALLING_AE_NOT_RECOGNIZED = 3
RJ_CALLED_AE_NOT_RECOGNIZED = 7
RJ_PROTOCOL_VERSION = 2  # with source ACSE
RJ_LOCAL_LIMIT_EXCEEDED = 2  # with source presentation

# A-ABORT sources / reasons (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
ABORT_UNRECOGNIZED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNIZED_PARAMETER = 4
ABORT_UNEXPECTED_PARAMETER = 5
ABORT_INVALID_PARAMETER = 6

NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# The longest A-ASSOCIATE-RQ/AC we read. PS3.8 sets no limit; 128 presentation contexts with
# ten transfer syntaxes each, role selections and a user identity token come to some 50 KB,
# so a peer declaring more is refused before its bytes are buffered.
MAX_ASSOCIATE_PDU = 256 * 1024
# A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have 4-byte bodies; a little slack for peers
# that pad them.
MAX_SHORT_PDU = 1024
# P-DATA-TF PDUs may exceed the maximum length we announced by this much (some peers count
# the PDU header in) before they are refused.
PDATA_SLACK = 1024
# The smallest maximum PDU length we send to (unless 0, "no limit"). PS3.8 sets no minimum,
# but a peer announcing, say, 7 bytes asks for one PDU per byte of every dataset: refused at
# association rather than served at a hundred times the cost.
MIN_PEER_MAX_PDU = 1024


class PDUError(Exception):
    """A PDU that violates PS3.8; the association is aborted."""


@dataclass
class PresentationContext:
    id: int
    abstract_syntax: str = ""
    transfer_syntaxes: list[str] = field(default_factory=list)
    result: int = ACCEPTANCE  # in an A-ASSOCIATE-AC


@dataclass
class RoleSelection:
    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass
class AssociateRQ:
    called_ae: str
    calling_ae: str
    contexts: list[PresentationContext]
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: dict[str, RoleSelection] = field(default_factory=dict)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass
class AssociateAC:
    called_ae: str
    calling_ae: str
    contexts: list[PresentationContext]
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: list[RoleSelection] = field(default_factory=list)


@dataclass
class AssociateRJ:
    result: int
    source: int
    reason: int


# ---------------------------------------------------------------- encoding helpers


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _uid(item_type: int, uid: str) -> bytes:
    return _item(item_type, uid.encode("ascii"))


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def _user_info(max_pdu: int, impl_uid: str, impl_version: str, roles: list[RoleSelection]) -> bytes:
    body = _item(0x51, struct.pack(">I", max_pdu)) + _uid(0x52, impl_uid)
    for r in roles:
        uid = r.sop_class_uid.encode("ascii")
        body += _item(0x54, struct.pack(">H", len(uid)) + uid + bytes((r.scu_role, r.scp_role)))
    if impl_version:
        body += _item(0x55, impl_version.encode("ascii")[:16])
    return _item(0x50, body)


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def encode_associate_rq(rq: AssociateRQ) -> bytes:
    body = struct.pack(">HH", 1, 0) + _ae(rq.called_ae) + _ae(rq.calling_ae) + b"\x00" * 32
    body += _uid(0x10, rq.application_context)
    for pc in rq.contexts:
        sub = _uid(0x30, pc.abstract_syntax) + b"".join(
            _uid(0x40, ts) for ts in pc.transfer_syntaxes
        )
        body += _item(0x20, bytes((pc.id, 0, 0, 0)) + sub)
    body += _user_info(
        rq.max_pdu, rq.implementation_class_uid, rq.implementation_version, list(rq.roles.values())
    )
    return _pdu(A_ASSOCIATE_RQ, body)


def encode_associate_ac(ac: AssociateAC) -> bytes:
    body = struct.pack(">HH", 1, 0) + _ae(ac.called_ae) + _ae(ac.calling_ae) + b"\x00" * 32
    body += _uid(0x10, APPLICATION_CONTEXT)
    for pc in ac.contexts:
        ts = pc.transfer_syntaxes[0] if pc.result == ACCEPTANCE and pc.transfer_syntaxes else ""
        # A rejected context still carries a transfer syntax sub-item (its value is ignored).
        sub = _uid(0x40, ts or "1.2.840.10008.1.2")
        body += _item(0x21, bytes((pc.id, 0, pc.result, 0)) + sub)
    body += _user_info(ac.max_pdu, ac.implementation_class_uid, ac.implementation_version, ac.roles)
    return _pdu(A_ASSOCIATE_AC, body)


def encode_associate_rj(rj: AssociateRJ) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes((0, rj.result, rj.source, rj.reason)))


RELEASE_RQ = _pdu(A_RELEASE_RQ, b"\x00" * 4)
RELEASE_RP = _pdu(A_RELEASE_RP, b"\x00" * 4)


def encode_abort(source: int = ABORT_SOURCE_USER, reason: int = 0) -> bytes:
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


# ---------------------------------------------------------------- decoding


def _text(b: bytes) -> str:
    return b.decode("ascii", "replace").strip(" \x00")


def _ae_text(b: bytes) -> str:
    """An AE title as received. Control characters are not allowed in AE titles (PS3.5
    6.2): they are escaped here, once, so no log line or audit record carries them raw, and
    the escaped title (with a backslash) can never equal a configured one."""
    text = _text(b)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _sub_items(body: bytes | memoryview) -> list[tuple[int, bytes]]:
    items = []
    pos = 0
    end = len(body)
    while pos < end:
        if pos + 4 > end:
            raise PDUError("truncated item header")
        item_type, _, length = struct.unpack_from(">BBH", body, pos)
        if pos + 4 + length > end:
            raise PDUError(f"item 0x{item_type:02X} runs past the end of its PDU")
        items.append((item_type, bytes(body[pos + 4 : pos + 4 + length])))
        pos += 4 + length
    return items


def _decode_user_info(body: bytes) -> tuple[int, str, str, list[RoleSelection]]:
    max_pdu = 0
    impl_uid = impl_ver = ""
    roles = []
    for t, sub in _sub_items(body):
        if t == 0x51 and len(sub) >= 4:
            (max_pdu,) = struct.unpack_from(">I", sub)
        elif t == 0x52:
            impl_uid = _text(sub)
        elif t == 0x55:
            impl_ver = _text(sub)
        elif t == 0x54 and len(sub) >= 2:
            (n,) = struct.unpack_from(">H", sub)
            if len(sub) >= 2 + n + 2:
                roles.append(
                    RoleSelection(_text(sub[2 : 2 + n]), bool(sub[2 + n]), bool(sub[3 + n]))
                )
    return max_pdu, impl_uid, impl_ver, roles


def _decode_associate(body: bytes) -> tuple[int, str, str, list[tuple[int, bytes]]]:
    if len(body) < 68:
        raise PDUError("association PDU too short")
    (version,) = struct.unpack_from(">H", body)
    return version, _ae_text(body[4:20]), _ae_text(body[20:36]), _sub_items(body[68:])


def decode_associate_rq(body: bytes) -> AssociateRQ:
    version, called, calling, items = _decode_associate(body)
    rq = AssociateRQ(called, calling, [], protocol_version=version, application_context="")
    for t, sub in items:
        if t == 0x10:
            rq.application_context = _text(sub)
        elif t == 0x20:
            if len(sub) < 4:
                raise PDUError("truncated presentation context item")
            pc = PresentationContext(sub[0])
            for st, ss in _sub_items(sub[4:]):
                if st == 0x30:
                    pc.abstract_syntax = _text(ss)
                elif st == 0x40:
                    pc.transfer_syntaxes.append(_text(ss))
            rq.contexts.append(pc)
        elif t == 0x50:
            rq.max_pdu, rq.implementation_class_uid, rq.implementation_version, roles = (
                _decode_user_info(sub)
            )
            rq.roles = {r.sop_class_uid: r for r in roles}
    return rq


def decode_associate_ac(body: bytes) -> AssociateAC:
    _version, called, calling, items = _decode_associate(body)
    ac = AssociateAC(called, calling, [])
    for t, sub in items:
        if t == 0x21:
            if len(sub) < 4:
                raise PDUError("truncated presentation context item")
            pc = PresentationContext(sub[0], result=sub[2])
            for st, ss in _sub_items(sub[4:]):
                if st == 0x40:
                    pc.transfer_syntaxes.append(_text(ss))
            ac.contexts.append(pc)
        elif t == 0x50:
            ac.max_pdu, ac.implementation_class_uid, ac.implementation_version, ac.roles = (
                _decode_user_info(sub)
            )
    return ac


def decode_associate_rj(body: bytes) -> AssociateRJ:
    if len(body) < 4:
        raise PDUError("A-ASSOCIATE-RJ too short")
    return AssociateRJ(body[1], body[2], body[3])


# ---------------------------------------------------------------- P-DATA-TF

_PDV_HEADER = struct.Struct(">IBB")
_PDU_HEADER = struct.Struct(">BBI")


def pdata_pieces(
    context_id: int, payload: bytes | memoryview, is_command: bool, max_pdu: int
) -> Iterator[bytes | memoryview]:
    """P-DATA-TF PDUs carrying one message part, fragmented to the peer's maximum PDU size:
    each PDU's header, then a slice of `payload` (no copy of the payload), made as they are
    written, so the cost stays linear in the size of the message whatever the PDU size."""
    flag = 0x01 if is_command else 0x00
    n = len(payload)
    step = (max_pdu - 6) if max_pdu and max_pdu > 6 else (n or 1)
    view = memoryview(payload)
    pos = 0
    while True:
        chunk = view[pos : pos + step]
        pos += len(chunk)
        last = pos >= n
        yield _PDU_HEADER.pack(P_DATA_TF, 0, len(chunk) + 6) + _PDV_HEADER.pack(
            len(chunk) + 2, context_id, flag | (0x02 if last else 0)
        )
        if len(chunk):
            yield chunk
        if last:
            return


def encode_pdata(
    context_id: int, payload: bytes | memoryview, is_command: bool, max_pdu: int
) -> list[bytes | memoryview]:
    """`pdata_pieces` as a list (for tests and small messages)."""
    return list(pdata_pieces(context_id, payload, is_command, max_pdu))


def iter_pdvs(body: memoryview) -> list[tuple[int, int, memoryview]]:
    """(context id, message control header, data) of every PDV in a P-DATA-TF body."""
    out = []
    pos = 0
    end = len(body)
    while pos < end:
        if pos + 6 > end:
            raise PDUError("truncated PDV")
        length, ctx, mch = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise PDUError("PDV length runs past the end of its PDU")
        out.append((ctx, mch, body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return out
