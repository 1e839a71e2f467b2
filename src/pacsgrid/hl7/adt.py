"""ADT messages to corrections, and their acknowledgements (HL7 v2 original mode).

- ADT^A08 (update patient information): PID-3 names the patient; PID-5 (name), PID-7 (birth
  date) and PID-8 (sex) are the new values. An empty field leaves a value as it is, `""`
  (HL7's null) empties it.
- ADT^A40 (merge patient): PID-3 is the surviving patient, MRG-1 the merged one; every study of
  the merged patient goes to the surviving one, with PID-5/7/8 where given.
- ADT^A47 (change patient identifier): MRG-1 is the identifier in use, PID-3 the new one.

The first repetition of PID-3 and MRG-1 is the identifier: CX.1 is the PatientID, CX.4 (its
first part) the IssuerOfPatientID (or always empty: `hl7.issuer = "ignore"`).

Answers (MSA-1): AA when applied, or when there is nothing to change (no study of the patient
in the archive: the archive has nothing to correct yet) and for a message acted on before;
AE when the message asks for something the archive refuses (a value its VR cannot hold, a
new identifier already in use); AR for a message this archive does not take (another type or
event, a sender not in `hl7.senders`, no MessageControlID) or cannot take now (the index or
the sites are unavailable: the sender should send it again). No patient identifier is written
to the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import hl7

from pacsgrid import metrics
from pacsgrid.archive import Archive, Caller
from pacsgrid.archive.correction_plans import PatientRef
from pacsgrid.archive.corrections import Outcome
from pacsgrid.errors import ArchiveUnavailable, InvalidCorrection, NotFound, PacsgridError

log = logging.getLogger("pacsgrid.hl7")

EVENTS = ("A08", "A40", "A47")
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}
_NULL = '""'


class Refusal(Exception):
    """A message answered AE or AR without acting on it: `code` is the acknowledgement code,
    `error` an HL7 table 0357 error code."""

    def __init__(self, code: str, error: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.error = error
        self.text = text


@dataclass(frozen=True)
class Header:
    """The MSH fields an acknowledgement needs."""

    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    event: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5"

    @property
    def source(self) -> str:
        return f"hl7:{self.sending_app}|{self.sending_facility}|{self.control_id}"


def decode(block: bytes) -> str:
    """The text of an MLLP block: UTF-8, or Latin-1 (every byte is a character) when not."""
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")


def answer(archive: Archive, text: str, address: str) -> str:
    """Act on one message; the acknowledgement to send back."""
    started = time.perf_counter()
    header = Header()
    try:
        message = _parse(text)
        header = _header(message)
        detail, quiet = _act(archive, message, header, address)
        code, error = "AA", ""
    except Refusal as r:
        code, error, detail = r.code, r.error, r.text
        quiet = "(see the acknowledgement)"
    except Exception:  # a fault of ours: the sender keeps the message and sends it again
        log.exception("HL7 message %s could not be handled", header.control_id or "?")
        code, error, detail = "AR", "207", "internal error of the archive (see its log)"
        quiet = detail
    metrics.HL7_MESSAGES.labels(code).inc()
    log.info(
        "HL7 %s %s from %s|%s: %s %s (%.0f ms)",
        header.event or "?",
        header.control_id or "?",
        header.sending_app,
        header.sending_facility,
        code,
        quiet,
        (time.perf_counter() - started) * 1000,
    )
    return ack(header, code, detail, error)


def _parse(text: str) -> hl7.Message:
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Refusal("AR", "100", "not an HL7 message (no MSH segment first)")
    try:
        return hl7.parse(text)
    except Exception as e:  # the parser raises several kinds of errors
        raise Refusal("AR", "100", f"unparseable message: {type(e).__name__}") from None


def _field(message: hl7.Message, path: str) -> str:
    try:
        return str(message[path]).strip()
    except (KeyError, IndexError):
        return ""


def _header(message: hl7.Message) -> Header:
    return Header(
        _field(message, "MSH.F3.R1.C1"),
        _field(message, "MSH.F4.R1.C1"),
        _field(message, "MSH.F5.R1.C1"),
        _field(message, "MSH.F6.R1.C1"),
        _field(message, "MSH.F9.R1.C2"),
        _field(message, "MSH.F10"),
        _field(message, "MSH.F11.R1.C1") or "P",
        _field(message, "MSH.F12.R1.C1") or "2.5",
    )


def _act(archive: Archive, message: hl7.Message, h: Header, address: str) -> tuple[str, str]:
    """(text of the acknowledgement, what the log may say: no patient identifier)."""
    settings = archive.settings.hl7
    kind = _field(message, "MSH.F9.R1.C1")
    if not h.control_id:
        raise Refusal("AR", "101", "MSH-10 (message control ID) is empty")
    allowed = settings.senders
    if (
        allowed
        and h.sending_app not in allowed
        and (f"{h.sending_app}|{h.sending_facility}" not in allowed)
    ):
        raise Refusal("AR", "207", f"sending application {h.sending_app!r} is not accepted")
    if kind != "ADT":
        raise Refusal("AR", "200", f"unsupported message type {kind or '(none)'}")
    if h.event not in EVENTS:
        raise Refusal("AR", "201", f"unsupported event {h.event or '(none)'}: A08, A40, A47")
    caller = Caller(ae_title=h.sending_app[:16], address=address, via="hl7", user=h.sending_app)
    reason = f"HL7 ADT^{h.event} {h.control_id} from {h.sending_app}|{h.sending_facility}"
    corrections = archive.corrections
    try:
        if _has_segments(message, "PID") != 1:
            raise Refusal("AE", "100", "one PID segment expected")
        patient = _identifier(message, "PID.F3", settings.issuer)
        changes = _demographics(message)
        if h.event == "A08":
            outcome = corrections.update_patient(caller, patient, changes, reason, source=h.source)
        else:
            if _has_segments(message, "MRG") != 1:
                raise Refusal("AE", "100", "one MRG segment expected (one patient pair)")
            old = _identifier(message, "MRG.F1", settings.issuer)
            if h.event == "A40":
                outcome = corrections.merge(caller, old, patient, changes, reason, source=h.source)
            else:
                new_id = {"PatientID": patient.pid, "IssuerOfPatientID": patient.issuer}
                outcome = corrections.update_patient(
                    caller, old, {**changes, **new_id}, reason, source=h.source
                )
    except NotFound as e:
        corrections.remember(h.source, "nothing to change")
        return f"nothing to change: {e}", "nothing to change (no such patient or study)"
    except InvalidCorrection as e:
        raise Refusal("AE", "207", str(e)) from None
    except ArchiveUnavailable as e:
        raise Refusal("AR", "207", f"the archive cannot apply it now: {e}") from None
    except PacsgridError as e:
        raise Refusal("AE", "207", str(e)) from None
    text = _describe(outcome)
    return text, text


def _describe(outcome: Outcome) -> str:
    if outcome.repeated:
        done = f", correction #{outcome.seq}" if outcome.seq else ""
        return f"message received before ({outcome.detail}{done}): not applied again"
    return outcome.detail


def _has_segments(message: hl7.Message, name: str) -> int:
    return sum(1 for segment in message if str(segment[0]) == name)


def _identifier(message: hl7.Message, path: str, issuer_mode: str) -> PatientRef:
    pid = _field(message, f"{path}.R1.C1")
    if not pid or pid == _NULL:
        raise Refusal("AE", "101", f"{path.replace('.F', '-')} has no patient identifier")
    issuer = "" if issuer_mode == "ignore" else _field(message, f"{path}.R1.C4.S1")
    return PatientRef(pid, "" if issuer == _NULL else issuer)


def _demographics(message: hl7.Message) -> dict[str, str]:
    """PID-5, PID-7 and PID-8 as DICOM values; fields left empty are not changed."""
    out: dict[str, str] = {}
    # XPN: family (its surname part), given, middle, suffix, prefix; DICOM PN puts the
    # prefix before the suffix.
    parts = [_field(message, "PID.F5.R1.C1.S1")]
    parts += [_field(message, f"PID.F5.R1.C{i}") for i in (2, 3, 5, 4)]
    if any(parts):
        name = "^".join(parts).rstrip("^")
        out["PatientName"] = "" if name == _NULL else name
    born = _field(message, "PID.F7.R1.C1")
    if born:
        out["PatientBirthDate"] = "" if born == _NULL else born[:8]
    sex = _field(message, "PID.F8.R1.C1").upper()
    if sex:
        out["PatientSex"] = "" if sex == _NULL else _SEX.get(sex, "O")
    return out


def escape(text: str) -> str:
    """Text for a field of a message with the default delimiters (|^~\\&)."""
    for ch, seq in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\")):
        text = text.replace(ch, seq)
    return text.replace("~", "\\R\\").replace("\r", " ").replace("\n", " ")


def ack(h: Header, code: str, text: str, error: str = "") -> str:
    """An ACK (original mode) to the message `h` describes."""
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            escape(h.receiving_app or "PACSGRID"),
            escape(h.receiving_facility),
            escape(h.sending_app),
            escape(h.sending_facility),
            now,
            "",
            f"ACK^{escape(h.event)}^ACK",
            f"ACK{time.time_ns()}"[:20],
            escape(h.processing_id),
            escape(h.version),
        ]
    )
    segments = [msh, f"MSA|{code}|{escape(h.control_id)}|{escape(text[:200])}"]
    if error:
        segments.append(f"ERR|||{error}^{escape(text[:80])}^HL70357|E")
    return "\r".join(segments) + "\r"
