"""The upper-layer codec and schema upgrades, checked without a network."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacsgrid.dicom import dimse, pdu
from pacsgrid.errors import IndexUnavailable

uids = st.from_regex(r"1\.2\.[1-9][0-9]{0,10}(\.[0-9]{1,5}){0,5}", fullmatch=True)
aes = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=16)


@given(
    called=aes,
    calling=aes,
    n=st.integers(1, 20),
    syntaxes=st.lists(uids, min_size=1, max_size=4),
    max_pdu=st.integers(0, 2**32 - 1),
    roles=st.lists(uids, max_size=3),
)
def test_associate_rq_round_trip(
    called: str, calling: str, n: int, syntaxes: list[str], max_pdu: int, roles: list[str]
) -> None:
    contexts = [
        pdu.PresentationContext(2 * i + 1, f"1.2.840.10008.5.1.4.1.1.{i}", syntaxes)
        for i in range(n)
    ]
    rq = pdu.AssociateRQ(
        called,
        calling,
        contexts,
        max_pdu,
        "1.2.3.4",
        "PG",
        {r: pdu.RoleSelection(r, True, False) for r in roles},
    )
    raw = pdu.encode_associate_rq(rq)
    assert raw[0] == pdu.A_ASSOCIATE_RQ
    back = pdu.decode_associate_rq(raw[6:])
    assert (back.called_ae, back.calling_ae, back.max_pdu) == (called, calling, max_pdu)
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in back.contexts] == [
        (c.id, c.abstract_syntax, c.transfer_syntaxes) for c in contexts
    ]
    assert back.roles == rq.roles
    assert back.implementation_class_uid == "1.2.3.4"


@given(payload=st.binary(max_size=5000), max_pdu=st.sampled_from([0, 16, 100, 4096]))
def test_pdata_fragments_reassemble(payload: bytes, max_pdu: int) -> None:
    pieces = pdu.encode_pdata(3, payload, False, max_pdu)
    stream = b"".join(bytes(p) for p in pieces)
    got, pos, last = b"", 0, False
    while pos < len(stream):
        assert stream[pos] == pdu.P_DATA_TF
        length = int.from_bytes(stream[pos + 2 : pos + 6], "big")
        if max_pdu:
            assert length <= max_pdu
        for ctx, mch, data in pdu.iter_pdvs(memoryview(stream)[pos + 6 : pos + 6 + length]):
            assert ctx == 3 and not mch & 0x01
            got += bytes(data)
            last = bool(mch & 0x02)
        pos += 6 + length
    assert got == payload and last


def test_truncated_pdvs_are_protocol_errors() -> None:
    with pytest.raises(pdu.PDUError):
        pdu.iter_pdvs(memoryview(b"\x00\x00\x00\x10\x01\x03abc"))
    with pytest.raises(pdu.PDUError):
        pdu.decode_associate_rq(b"\x00\x01" + b"\x00" * 10)


@given(
    msg_id=st.integers(0, 0xFFFF),
    status=st.integers(0, 0xFFFF),
    uid=uids,
    comment=st.text(alphabet="abc XYZ.", max_size=30),
)
def test_command_round_trip(msg_id: int, status: int, uid: str, comment: str) -> None:
    cmd: dimse.Command = {
        dimse.AFFECTED_SOP_CLASS: uid,
        dimse.COMMAND_FIELD: dimse.C_STORE_RSP,
        dimse.MESSAGE_ID_RESPONDED: msg_id,
        dimse.STATUS: status,
        dimse.DATASET_TYPE: dimse.NO_DATASET,
        dimse.AFFECTED_SOP_INSTANCE: uid,
        dimse.ERROR_COMMENT: comment,
    }
    raw = dimse.encode_command(cmd)
    back = dimse.decode_command(raw)
    assert back[dimse.GROUP_LENGTH] == len(raw) - 12
    for k, v in cmd.items():
        assert back[k] == (v.strip() if isinstance(v, str) else v)


def test_command_set_read_by_pydicom() -> None:
    """Our encoding is what pydicom (another implementation) reads as a command set."""
    import io

    from pydicom.filereader import read_dataset

    raw = dimse.encode_command(
        {
            dimse.AFFECTED_SOP_CLASS: "1.2.840.10008.1.1",
            dimse.COMMAND_FIELD: dimse.C_ECHO_RQ,
            dimse.MESSAGE_ID: 7,
            dimse.DATASET_TYPE: dimse.NO_DATASET,
        }
    )
    ds = read_dataset(io.BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.AffectedSOPClassUID == "1.2.840.10008.1.1"
    assert (ds.CommandField, ds.MessageID, ds.CommandDataSetType) == (0x30, 7, 0x0101)


def test_schema_is_upgraded_and_newer_schemas_refused(tmp_path: Path) -> None:
    from pacsgrid.index import schema
    from pacsgrid.index.sqlite import SqliteIndex

    db = tmp_path / "index.sqlite"
    first = schema.MIGRATIONS[:1]
    original = list(schema.MIGRATIONS)
    schema.MIGRATIONS[:] = first
    try:
        SqliteIndex(db).close()  # an index made by an older pacsgrid
    finally:
        schema.MIGRATIONS[:] = original
    index = SqliteIndex(db)  # this pacsgrid upgrades it
    try:
        applied = {r[0] for r in index._all("SELECT name FROM schema_migrations")}
        assert applied == {name for name, _ in schema.MIGRATIONS}
        assert index.work_counts("copy") == {}
    finally:
        index.close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES ('9999_from_the_future', 0)")
    with pytest.raises(IndexUnavailable, match="upgraded by a newer pacsgrid"):
        SqliteIndex(db)
