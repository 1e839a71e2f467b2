"""Forwarding for a parallel run: a durable queue that survives restarts, gives up visibly, and
never sends an instance back to the peer it came from, so that pacsgrid and a legacy PACS
(a real Orthanc, forwarding everything with a Lua script) can forward to each other."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from pacsgrid.index.sqlite import SqliteIndex
from tests.conftest import Server, StoreSCP, free_port, pacsgrid_cli
from tests.corpus import CorpusFile, accepted
from tests.dcmtk_store import store_with_storescu
from tests.peers import Orthanc
from tests.waiting import wait_until

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

# A legacy PACS configured the naive way: everything it stores goes to pacsgrid, including
# what pacsgrid itself sent. Every store is logged, so the test can count them.
NAIVE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  print("stored " .. tags["SOPInstanceUID"] .. " from " .. (origin["RemoteAet"] or "?"))
  SendToModality(instanceId, "pacsgrid")
end
"""


def distinct_files(n: int, skip: int = 0) -> list[CorpusFile]:
    counts = Counter(f.sop_uid for f in accepted())
    plain = [
        f
        for f in accepted()
        if counts[f.sop_uid] == 1 and f.transfer_syntax == "1.2.840.10008.1.2.1"
    ]
    return plain[skip : skip + n]


def work_rows(data_dir: Path) -> list[tuple[str, str, int]]:
    index = SqliteIndex(data_dir / "index.sqlite")
    try:
        return [
            (r[0], r[1], int(r[2]))
            for r in index._all("SELECT key, state, attempts FROM work WHERE kind = 'forward'")
        ]
    finally:
        index.close()


def sop_uids(data_dir: Path) -> set[str]:
    index = SqliteIndex(data_dir / "index.sqlite")
    try:
        return {r[0] for r in index._all("SELECT sop_uid FROM instance")}
    finally:
        index.close()


def stores_from(server: Server, ae: str) -> Counter[str]:
    """Outcomes of the C-STOREs from `ae` in associations that have ended (from the
    "association with AE@host closed: 1 duplicate, 2 stored" lines of the log)."""
    out: Counter[str] = Counter()
    for summary in re.findall(rf"association with {ae}@\S+ closed: (.+)", server.text()):
        for part in summary.split(", "):
            n, _, outcome = part.partition(" ")
            if n.isdigit():
                out[outcome] += int(n)
    return out


def pacsgrid(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return pacsgrid_cli(*args, timeout=120)


def test_two_systems_forwarding_to_each_other_do_not_loop(tmp_path: Path) -> None:
    pg_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        modalities={"PACSGRID": ("127.0.0.1", pg_port), "MODALITY": ("127.0.0.1", 9)},
        lua=NAIVE_LUA,
        extra={"OverwriteInstances": True},  # a store sent back would be stored (and logged)
    ).start()
    config = tmp_path / "pacsgrid.toml"
    config.write_text(
        f"""
[[peers]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}

[[forward]]
to = "ORTHANC"

[forwarding]
retry_initial = 0.5
poll = 0.2
"""
    )
    server = Server(tmp_path / "pg", port=pg_port, config=config)
    try:
        server.start()
        to_pacsgrid, to_orthanc = distinct_files(6), distinct_files(6, skip=6)
        assert len(to_pacsgrid) == len(to_orthanc) == 6
        a = {f.sop_uid for f in to_pacsgrid}
        b = {f.sop_uid for f in to_orthanc}
        sent_a = store_with_storescu(pg_port, to_pacsgrid, tmp_path, aet="MODALITY1")
        sent_b = store_with_storescu(orthanc.dicom_port, to_orthanc, tmp_path, aet="MODALITY")
        assert not sent_a.failed and not sent_b.failed
        everything = a | b
        wait_until(
            lambda: sop_uids(server.data_dir) == everything,
            120,
            "pacsgrid holds A and B",
            seen=lambda: sop_uids(server.data_dir),
        )
        wait_until(
            lambda: orthanc.sop_uids() == everything,
            120,
            "Orthanc holds A and B",
            seen=orthanc.sop_uids,
        )

        def lua_stores() -> list[tuple[str, str]]:
            return re.findall(r"Lua says: stored (\S+) from (\S+)", orthanc.log.read_text())

        # Everything that can still arrive has arrived: Orthanc's script ran for all twelve,
        # and every echo it sent (A back to pacsgrid) was answered. A duplicate is answered
        # before its association ends, so after these nothing of the exchange is in flight.
        wait_until(
            lambda: {uid for uid, _ in lua_stores()} == everything,
            120,
            "Orthanc's script ran for every instance",
            seen=lua_stores,
        )
        wait_until(
            lambda: stores_from(server, "ORTHANC") == Counter(stored=len(b), duplicate=len(a)),
            120,
            "B stored from Orthanc and A back from Orthanc as duplicates",
            seen=lambda: stores_from(server, "ORTHANC"),
        )
        wait_until(
            lambda: all(state == "done" for _, state, _ in work_rows(server.data_dir)),
            120,
            "pacsgrid's forwarding queue done",
            seen=lambda: work_rows(server.data_dir),
        )

        rows = work_rows(server.data_dir)
        assert {key.partition(">")[0] for key, _, _ in rows} == a, "B must not go back"
        # A was sent once each: the duplicates Orthanc sent back did not queue it again.
        assert sorted(attempts for _, _, attempts in rows) == [1] * len(a), rows
        stores = lua_stores()
        per_uid = Counter(uid for uid, _ in stores)
        assert set(per_uid.values()) == {1}, per_uid
        assert {uid for uid, who in stores if who == "PACSGRID"} == a
        assert {uid for uid, who in stores if who == "MODALITY"} == b

        status = pacsgrid("forward", "status", "--config", config, "--data-dir", server.data_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"pending 0, sent {len(a)}, given up 0" in status.stdout
        assert "forward to ORTHANC" in status.stdout
    finally:
        server.stop()
        orthanc.stop()


def test_queue_survives_restarts_gives_up_visibly_and_retries(tmp_path: Path) -> None:
    peer_port = free_port()  # nothing listens there yet
    config = tmp_path / "pacsgrid.toml"
    config.write_text(
        f"""
[[peers]]
ae_title = "PEER"
host = "127.0.0.1"
port = {peer_port}

[[forward]]
to = "PEER"
modality = ["CT", "MR"]

[forwarding]
retry_initial = 0.2
retry_max = 0.5
max_attempts = 3
poll = 0.2
"""
    )
    pool = distinct_files(60)
    ct_mr = [f for f in pool if _modality(f) in ("CT", "MR")][:3]
    files = ct_mr + [f for f in pool if _modality(f) not in ("CT", "MR")][:3]
    selected = {f.sop_uid for f in ct_mr}
    assert selected and len(selected) < len(files), "the corpus slice should mix modalities"
    server = Server(tmp_path / "pg", config=config).start()
    scp: StoreSCP | None = None
    try:
        assert not store_with_storescu(server.port, files, tmp_path).failed
        # The peer is down: every selected instance is tried, then given up and listed.
        wait_until(
            lambda: (
                {k.partition(">")[0] for k, s, _ in work_rows(server.data_dir) if s == "failed"}
                == selected
            ),
            120,
            "every selected instance given up",
            seen=lambda: work_rows(server.data_dir),
        )
        assert all(a == 3 for _, _, a in work_rows(server.data_dir))
        status = pacsgrid("forward", "status", "--config", config, "--data-dir", server.data_dir)
        assert status.returncode == 1
        assert f"given up {len(selected)}" in status.stdout
        assert "cannot open an association to PEER" in status.stdout
        server.stop()

        # Requeued while the archive is down; delivered after a restart, once the peer is up.
        retry = pacsgrid("forward", "retry", "--config", config, "--data-dir", server.data_dir)
        assert f"queued {len(selected)}" in retry.stdout, retry.stdout + retry.stderr
        # The forwarding peer comes up late, on the port the queue has been trying.
        scp = StoreSCP(tmp_path / "peer", "PEER", port=peer_port, options=("+xa",)).start()
        server = Server(tmp_path / "pg", config=config, port=server.port).start()
        wait_until(
            lambda: len(list(scp.out.iterdir())) == len(selected),
            120,
            "the peer received every selected instance",
            seen=lambda: list(scp.out.iterdir()),
        )
        wait_until(
            lambda: all(s == "done" for _, s, _ in work_rows(server.data_dir)),
            120,
            "the queue done",
            seen=lambda: work_rows(server.data_dir),
        )
    finally:
        server.stop()
        if scp is not None:
            scp.stop()


def _modality(f: CorpusFile) -> str:
    import pydicom

    return str(pydicom.dcmread(f.path, stop_before_pixels=True).get("Modality", ""))


def test_forward_rule_to_an_unknown_peer_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[forward]]\nto = "NOBODY"\n')
    run = pacsgrid("forward", "status", "--config", config, "--data-dir", tmp_path / "d")
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "pacsgrid: config error: forward[0].to: 'NOBODY' is not a configured peer "
        "(add it to [[peers]])"
    )
