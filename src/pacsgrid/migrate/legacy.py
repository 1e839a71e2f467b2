"""A legacy PACS seen over DICOM: C-FIND, C-MOVE and C-GET in the Study Root model.

Built on the archive's own outgoing associations (pacsgrid.dicom.scu). One `LegacySession` is
one association, reused for many requests and opened again after a failure; `migrate pull`
and `verify` run several sessions side by side (`--parallel`).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from pacsgrid.dicom import dimse
from pacsgrid.dicom.association import AcceptedContext, AssociationAborted
from pacsgrid.dicom.dimse import Message
from pacsgrid.dicom.identifier import QUERY_RETRIEVE_LEVEL, encode_elements
from pacsgrid.dicom.scu import AssociationRejected, ClientAssociation, connect, connect_to
from pacsgrid.dicomfile.header import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from pacsgrid.errors import PacsgridError
from pacsgrid.model import BY_KEYWORD, COMPUTED, Level
from pacsgrid.settings import PeerSettings

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QR_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)
# Every syntax a C-GET offers to receive in, so that the source sends what it stores as is.
STORAGE_SYNTAXES = (
    EXPLICIT_LE,
    IMPLICIT_LE,
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE
    EXPLICIT_BE,
    DEFLATED_LE,
)

COMMON_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG for presentation
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
)
StoreCallback = Callable[[str, bytes, str], Awaitable[int]]  # (sop class, dataset, ts) -> status


class LegacyError(PacsgridError):
    """The legacy PACS could not be reached or refused a request."""


@dataclass
class FindResult:
    rows: list[dict[str, str]] = field(default_factory=list)
    status: int = dimse.SUCCESS
    error: str = ""

    @property
    def complete(self) -> bool:
        """False when the source stopped early (a cap on answers, out of resources, cancel)."""
        return self.status == dimse.SUCCESS


@dataclass
class RetrieveResult:
    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    error: str = ""


def _tag_vr(keyword: str) -> tuple[int, str]:
    if keyword in BY_KEYWORD:
        a = BY_KEYWORD[keyword]
        return a.tag, a.vr
    tag, vr, _ = COMPUTED[keyword]
    return tag, vr


def request_identifier(level: Level, keys: dict[str, str], transfer_syntax: str) -> bytes:
    """Encode a query: QueryRetrieveLevel plus `keys` (keyword -> matching value, '' = return)."""
    elements = [(QUERY_RETRIEVE_LEVEL, "CS", level.value)]
    for keyword, value in keys.items():
        tag, vr = _tag_vr(keyword)
        elements.append((tag, "IS" if vr == "US" and not value else vr, value))
    return encode_elements(sorted(elements), transfer_syntax)


def decode_identifier(data: bytes, transfer_syntax: str) -> dict[str, str]:
    """A response identifier as keyword -> text (multiple values joined with backslashes).

    Values are taken from the raw element bytes: no conversion, so a malformed value from a
    legacy system is kept as it is rather than warned about or refused."""
    from pydicom.datadict import keyword_for_tag
    from pydicom.filereader import read_dataset

    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    out: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            raw = list(read_dataset(io.BytesIO(data), implicit, little).elements())
        except Exception as e:
            raise LegacyError(f"unreadable C-FIND answer: {e}") from None
    for elem in raw:
        keyword = keyword_for_tag(elem.tag)
        value = elem.value
        if not keyword or not isinstance(value, bytes) or elem.VR == "SQ":
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        out[keyword] = text.strip(" \x00")
    return out


class LegacySession:
    """One association with the legacy PACS (async context manager)."""

    def __init__(
        self,
        peer: PeerSettings,
        our_ae: str,
        *,
        timeout: float = 60.0,
        get_classes: Sequence[str] = (),
        on_store: StoreCallback | None = None,
    ) -> None:
        self.peer = peer
        self.our_ae = our_ae
        self.timeout = timeout
        self.get_classes = list(get_classes)
        self.on_store = on_store
        self.assoc: ClientAssociation | None = None

    def __str__(self) -> str:
        return f"{self.peer.ae_title}@{self.peer.host}:{self.peer.port}"

    async def open(self) -> None:
        proposals: list[tuple[str, Sequence[str]]] = [
            (STUDY_ROOT_FIND, QR_SYNTAXES),
            (STUDY_ROOT_MOVE, QR_SYNTAXES),
        ]
        if self.on_store is not None:
            proposals.append((STUDY_ROOT_GET, QR_SYNTAXES))
            # The source sends on a context for the class in each file's meta, which may
            # differ from the SOPClassUID it answers C-FIND with: offer common classes too.
            classes = list(dict.fromkeys([*self.get_classes, *COMMON_CLASSES]))
            room = 128 - len(proposals)
            per_class = max(1, min(len(STORAGE_SYNTAXES), room // len(self.get_classes or [1])))
            for sop_class in classes:
                for ts in STORAGE_SYNTAXES[:per_class]:
                    if len(proposals) < 128:
                        proposals.append((sop_class, [ts]))
        try:
            self.assoc = await connect_to(
                self.peer,
                self.our_ae,
                proposals,
                timeout=self.timeout,
                scp_roles=sorted({p[0] for p in proposals[3:]}) if self.on_store else (),
                on_store=self._store if self.on_store else None,
            )
        except (OSError, AssociationRejected, AssociationAborted, TimeoutError) as e:
            raise LegacyError(
                f"cannot open an association to {self}: {e or type(e).__name__}"
            ) from None

    async def close(self) -> None:
        if self.assoc is not None:
            await self.assoc.release()
            self.assoc = None

    async def __aenter__(self) -> LegacySession:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _context(self, abstract_syntax: str) -> AcceptedContext:
        if self.assoc is None or self.assoc.closed.is_set():
            raise LegacyError(f"the association with {self} is closed")
        ctx = self.assoc.context_for(abstract_syntax)
        if ctx is None:
            raise LegacyError(
                f"{self} did not accept {_NAMES.get(abstract_syntax, abstract_syntax)}"
            )
        return ctx

    async def _store(self, msg: Message, ctx: AcceptedContext) -> int:
        assert self.on_store is not None
        if msg.dataset is None:
            return dimse.CANNOT_UNDERSTAND
        return await self.on_store(ctx.abstract_syntax, msg.dataset, ctx.transfer_syntax)

    async def find(self, level: Level, keys: dict[str, str]) -> FindResult:
        ctx = self._context(STUDY_ROOT_FIND)
        assert self.assoc is not None
        identifier = request_identifier(level, keys, ctx.transfer_syntax)
        result = FindResult()
        try:
            async for rsp in self.assoc.c_find(ctx.id, identifier):
                status = int(rsp.command.get(dimse.STATUS, 0))
                if dimse.status_category(status) == "pending":
                    if rsp.dataset is not None:
                        result.rows.append(decode_identifier(rsp.dataset, ctx.transfer_syntax))
                    continue
                result.status = status
                result.error = str(rsp.command.get(dimse.ERROR_COMMENT, ""))
        except AssociationAborted as e:
            raise LegacyError(f"C-FIND on {self} failed: {e}") from None
        return result

    async def move(self, destination: str, level: Level, keys: dict[str, str]) -> RetrieveResult:
        ctx = self._context(STUDY_ROOT_MOVE)
        assert self.assoc is not None
        identifier = request_identifier(level, keys, ctx.transfer_syntax)
        return await self._retrieve(self.assoc.c_move(ctx.id, destination, identifier, 3600))

    async def get(self, level: Level, keys: dict[str, str]) -> RetrieveResult:
        ctx = self._context(STUDY_ROOT_GET)
        assert self.assoc is not None
        identifier = request_identifier(level, keys, ctx.transfer_syntax)
        return await self._retrieve(self.assoc.c_get(ctx.id, identifier, 3600))

    async def _retrieve(self, responses: AsyncIterator[Message]) -> RetrieveResult:
        final: Message | None = None
        try:
            async for rsp in responses:
                final = rsp
        except AssociationAborted as e:
            raise LegacyError(f"retrieve from {self} failed: {e}") from None
        if final is None:
            raise LegacyError(f"retrieve from {self}: no answer")
        c = final.command
        return RetrieveResult(
            int(c.get(dimse.STATUS, 0)),
            int(c.get(dimse.COMPLETED, 0)),
            int(c.get(dimse.FAILED, 0)),
            int(c.get(dimse.WARNING, 0)),
            str(c.get(dimse.ERROR_COMMENT, "")),
        )


_NAMES = {
    STUDY_ROOT_FIND: "Study Root C-FIND",
    STUDY_ROOT_MOVE: "Study Root C-MOVE",
    STUDY_ROOT_GET: "Study Root C-GET",
}


async def echo(host: str, port: int, calling_ae: str, called_ae: str, timeout: float = 10) -> bool:
    """Whether a DICOM node answers C-ECHO."""
    try:
        assoc = await connect(
            host, port, calling_ae, called_ae, [("1.2.840.10008.1.1", QR_SYNTAXES)], timeout=timeout
        )
    except (OSError, AssociationRejected, AssociationAborted, TimeoutError):
        return False
    try:
        return await assoc.c_echo() == dimse.SUCCESS
    except AssociationAborted:
        return False
    finally:
        await assoc.release()
