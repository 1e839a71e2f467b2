"""DIMSE command sets (PS3.7 sections 9 and 10, annex E): encode and decode, statuses.
DIMSE-C for the query/retrieve and storage services, the DIMSE-N messages of storage
commitment (N-ACTION, N-EVENT-REPORT).

A command set is group 0000 in implicit VR little endian. We keep it as a dict from element
number to value (str or int); a dozen struct calls per message instead of a pydicom Dataset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacsgrid.archive import Spool

# Command fields
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130

COMMAND_NAMES = {
    C_STORE_RQ: "C-STORE-RQ",
    C_STORE_RSP: "C-STORE-RSP",
    C_GET_RQ: "C-GET-RQ",
    C_GET_RSP: "C-GET-RSP",
    C_FIND_RQ: "C-FIND-RQ",
    C_FIND_RSP: "C-FIND-RSP",
    C_MOVE_RQ: "C-MOVE-RQ",
    C_MOVE_RSP: "C-MOVE-RSP",
    C_ECHO_RQ: "C-ECHO-RQ",
    C_ECHO_RSP: "C-ECHO-RSP",
    C_CANCEL_RQ: "C-CANCEL-RQ",
    N_EVENT_REPORT_RQ: "N-EVENT-REPORT-RQ",
    N_EVENT_REPORT_RSP: "N-EVENT-REPORT-RSP",
    N_ACTION_RQ: "N-ACTION-RQ",
    N_ACTION_RSP: "N-ACTION-RSP",
}

# Command elements (group 0000)
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
REQUESTED_SOP_CLASS = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATASET_TYPE = 0x0800
STATUS = 0x0900
OFFENDING_ELEMENT = 0x0901
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000
REQUESTED_SOP_INSTANCE = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_ID = 0x1031

NO_DATASET = 0x0101
HAS_DATASET = 0x0000

_VR = {
    GROUP_LENGTH: "UL",
    AFFECTED_SOP_CLASS: "UI",
    REQUESTED_SOP_CLASS: "UI",
    COMMAND_FIELD: "US",
    MESSAGE_ID: "US",
    MESSAGE_ID_RESPONDED: "US",
    MOVE_DESTINATION: "AE",
    PRIORITY: "US",
    DATASET_TYPE: "US",
    STATUS: "US",
    OFFENDING_ELEMENT: "AT",
    ERROR_COMMENT: "LO",
    0x0903: "US",
    AFFECTED_SOP_INSTANCE: "UI",
    REQUESTED_SOP_INSTANCE: "UI",
    EVENT_TYPE_ID: "US",
    ACTION_TYPE_ID: "US",
    REMAINING: "US",
    COMPLETED: "US",
    FAILED: "US",
    WARNING: "US",
    MOVE_ORIGINATOR_AE: "AE",
    MOVE_ORIGINATOR_ID: "US",
}

# Statuses (PS3.4 annexes B and C, PS3.7 annex C)
SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
WARNING_SUBOPS = 0xB000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_MATCHES = 0xA701
OUT_OF_RESOURCES_SUBOPS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001
REFUSED_NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211
# DIMSE-N failures (PS3.7 annex C)
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_ACTION = 0x0123
MISTYPED_ARGUMENT = 0x0212
RESOURCE_LIMITATION = 0x0213

Command = dict[int, "str | int | bytes"]


@dataclass(slots=True)
class Message:
    """One DIMSE message as received: command set, optional dataset bytes, its context. A
    large dataset is not in `dataset` but in `spool` (a spill file; closed once handled)."""

    context_id: int
    command: Command
    dataset: bytes | None = None
    spool: Spool | None = None

    @property
    def command_field(self) -> int:
        return int(self.command.get(COMMAND_FIELD, 0))

    @property
    def message_id(self) -> int:
        return int(self.command.get(MESSAGE_ID, self.command.get(MESSAGE_ID_RESPONDED, 0)))


def encode_command(cmd: Command) -> bytes:
    parts = []
    for elem in sorted(cmd):
        if elem == GROUP_LENGTH:
            continue
        value = cmd[elem]
        vr = _VR.get(elem)
        if isinstance(value, int) and vr == "US":
            raw = struct.pack("<H", value & 0xFFFF)
        elif isinstance(value, int) and vr == "UL":
            raw = struct.pack("<I", value)
        elif isinstance(value, bytes):
            raw = value
        else:
            raw = str(value).encode("ascii", "replace")
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        parts.append(struct.pack("<HHI", 0, elem, len(raw)) + raw)
    body = b"".join(parts)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def decode_command(data: bytes) -> Command:
    cmd: Command = {}
    pos = 0
    end = len(data)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if group != 0:
            # Some peers (Orthanc's C-GET SCP on failure) append identifier elements to the
            # command set; the command proper ends at the first element outside group 0000.
            break
        pos += 8
        if pos + length > end:
            raise ValueError("malformed command set")
        raw = data[pos : pos + length]
        pos += length
        vr = _VR.get(elem)
        if vr == "US" and length >= 2:
            cmd[elem] = struct.unpack_from("<H", raw)[0]
        elif vr == "UL" and length >= 4:
            cmd[elem] = struct.unpack_from("<I", raw)[0]
        elif vr in ("UI", "AE", "LO"):
            cmd[elem] = raw.decode("ascii", "replace").strip(" \x00")
        else:
            cmd[elem] = raw
    return cmd


def status_category(status: int) -> str:
    if status == SUCCESS:
        return "success"
    if status in (PENDING, PENDING_WARNING):
        return "pending"
    if status == CANCEL:
        return "cancel"
    if status & 0xF000 == 0xB000 or status in (0x0001, 0x0107, 0x0116):
        return "warning"
    return "failure"
