"""Several worker processes on one port: each new association goes to the least busy worker,
and a stuck worker does not keep associations from being accepted by the others.

Which worker takes a connection is a race the server biases with a 20 ms back-off per
association a worker is ahead, so exact splits are not a property of the server on a loaded
machine. The tests split it: the real server publishes its load on the board exactly; the
acceptor, run in two processes with a back-off long enough to decide every race, splits
exactly; and a stuck worker never keeps the other from accepting."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from pacsgrid.dicom.accept import BalancedAcceptor, LoadBoard
from pacsgrid.drill.procs import children
from tests.conftest import Server
from tests.waiting import wait_until


def _workers(server: Server, n: int) -> list[int]:
    """The worker processes, once each of them accepts associations."""
    assert server.proc is not None
    proc = server.proc

    def ready() -> list[int]:
        logged = {
            int(p) for p in re.findall(r"\[(\d+)\] pacsgrid\.node: worker ready", server.text())
        }
        pids = children(proc.pid)
        # `logged` also has workers that died
        return pids if len(pids) == n and set(pids) <= logged else []

    return wait_until(ready, 60, f"{n} ready workers", seen=lambda: server.text()[-2000:])


def _open(port: int, calling_ae: str, n: int) -> list[Association]:
    """`n` associations, one after the other, each echoed and left open."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    out = []
    for _ in range(n):
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSGRID")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        out.append(assoc)
    return out


def _accepted_by(server: Server, calling_ae: str) -> Counter[int]:
    pattern = rf"\[(\d+)\] pacsgrid\.dicom: association from {calling_ae}@\S+ accepted"
    return Counter(int(pid) for pid in re.findall(pattern, server.text()))


def _wait_accepted(server: Server, calling_ae: str, n: int) -> Counter[int]:
    def accepted() -> Counter[int] | None:
        counts = _accepted_by(server, calling_ae)
        return counts if sum(counts.values()) >= n else None

    return wait_until(
        accepted,
        60,
        f"{n} associations from {calling_ae} accepted",
        seen=lambda: _accepted_by(server, calling_ae),
    )


def _release(associations: list[Association]) -> None:
    for assoc in associations:
        assoc.release()


def _board(server: Server) -> dict[int, int]:
    """What each worker publishes on the load board (worker pid -> associations served), read
    from the shared memory the supervisor gave it (`--worker-board FD:SLOTS:SLOT`)."""
    assert server.proc is not None
    out = {}
    for pid in children(server.proc.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--worker-board" not in argv:
            continue
        fd, _, slot = (int(x) for x in argv[argv.index(b"--worker-board") + 1].split(b":"))
        with open(f"/proc/{pid}/fd/{fd}", "rb") as fh:
            fh.seek(slot * 4)
            out[pid] = struct.unpack("=I", fh.read(4))[0]
    return out


@pytest.mark.slow
def test_workers_publish_the_associations_they_serve(tmp_path: Path) -> None:
    """The balance rests on the board: each worker's slot says how many associations it
    serves, from the moment it accepts one until the association's thread is gone."""
    server = Server(tmp_path / "archive", workers=2).start()
    try:
        workers = _workers(server, 2)
        assert _board(server) == dict.fromkeys(workers, 0)
        first = _open(server.port, "BOARD1", 4)
        counts = _wait_accepted(server, "BOARD1", 4)
        wait_until(
            lambda: _board(server) == {pid: counts[pid] for pid in workers},
            60,
            f"the board shows the open associations {dict(counts)}",
            seen=lambda: _board(server),
        )
        _release(first)
        wait_until(
            lambda: _board(server) == dict.fromkeys(workers, 0),
            60,
            "the board shows every worker idle once the associations are released",
            seen=lambda: _board(server),
        )
        again = _open(server.port, "BOARD2", 1)
        (pid,) = _wait_accepted(server, "BOARD2", 1)
        wait_until(
            lambda: _board(server) == {w: int(w == pid) for w in workers},
            60,
            "one association on the board",
            seen=lambda: _board(server),
        )
        _release(again)
    finally:
        server.stop()


# The acceptor's own back-off, long enough that the less busy process always gets to the
# connection first on a loaded machine (the server uses 20 ms per association, at most 100).
STEP, MAX_WAIT = 2.0, 10.0


def _acceptor(sock: socket.socket, board_fd: int, slot: int, events: Any, commands: Any) -> None:
    """One process accepting on the shared socket with the server's BalancedAcceptor; holds
    what it accepts until told to release it, and reports every acceptance.

    "sync" is answered once this process is not backing off (at once, or when its back-off
    ends), so the test makes each connection with neither process in a back-off: a process
    still backing off from the last connection would take the next one when its wait ends,
    ahead or not (it accepts "if the connection is still there")."""
    board = LoadBoard(board_fd, 2, slot)
    held: list[socket.socket] = []

    class Reporting(BalancedAcceptor):
        sync_wanted = False

        def _after_wait(self) -> None:
            super()._after_wait()
            if self.sync_wanted and self._timer is None:
                self.sync_wanted = False
                events.put((slot, "synced"))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_connection(conn: socket.socket) -> None:
            held.append(conn)
            board.publish(len(held))
            events.put((slot, "accepted"))

        def on_command() -> None:
            what = commands.recv()
            if what == "sync":
                if acceptor._timer is None:
                    events.put((slot, "synced"))
                else:
                    acceptor.sync_wanted = True
            elif what == "release":
                for conn in held:
                    conn.close()
                held.clear()
                board.publish(0)
                events.put((slot, "released"))
            elif not done.done():
                done.set_result(None)

        acceptor = Reporting(
            sock, on_connection, load=lambda: len(held), board=board, step=STEP, max_wait=MAX_WAIT
        )
        board.publish(0)
        acceptor.start()
        loop.add_reader(commands.fileno(), on_command)
        events.put((slot, "ready"))
        await done
        acceptor.close()

    asyncio.run(main())


@pytest.mark.slow
def test_the_least_busy_process_takes_each_new_connection(tmp_path: Path) -> None:
    """pacsgrid.dicom.accept in two real processes on one listening socket: connections made
    one after the other are split evenly, also after the first ones are closed."""
    ctx = multiprocessing.get_context("fork")
    listener = socket.create_server(("127.0.0.1", 0))
    board = LoadBoard.create(2)
    events = ctx.Queue()
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [
        ctx.Process(target=_acceptor, args=(listener, board.fd, slot, events, pipes[slot][1]))
        for slot in range(2)
    ]
    for p in procs:
        p.start()
    clients: list[socket.socket] = []

    def both(command: str) -> list[tuple[int, str]]:
        for parent_end, _ in pipes:
            parent_end.send(command)
        return sorted(next_event() for _ in procs)

    def next_event() -> tuple[int, str]:
        slot, what = events.get(timeout=120)
        return int(slot), str(what)

    def connect(n: int) -> Counter[int]:
        taken: Counter[int] = Counter()
        for _ in range(n):
            clients.append(socket.create_connection(listener.getsockname(), timeout=30))
            slot, what = next_event()  # one connection at a time: wait until it is taken
            assert what == "accepted", what
            taken[slot] += 1
            assert both("sync") == [(0, "synced"), (1, "synced")]
        return taken

    try:
        assert sorted(next_event() for _ in procs) == [(0, "ready"), (1, "ready")]
        assert sorted(connect(4).values()) == [2, 2]
        assert sorted(connect(2).values()) == [1, 1]  # three each now
        assert both("release") == [(0, "released"), (1, "released")]
        taken = connect(6)
        assert sorted(taken.values()) == [3, 3], taken
    finally:
        for client in clients:
            client.close()
        for parent_end, _ in pipes:
            parent_end.send("stop")
        for p in procs:
            p.join(60)
            if p.exitcode is None:
                p.kill()
                p.join()
        listener.close()
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.slow
def test_a_stuck_worker_does_not_stop_accepting(tmp_path: Path) -> None:
    server = Server(tmp_path / "archive", workers=2).start()
    stuck = None
    try:
        workers = _workers(server, 2)
        # Warm both workers up, then freeze one that serves nothing: it looks least busy
        # on the board, yet every association is accepted (by the other, after its wait).
        _release(_open(server.port, "WARMUP", 2))
        stuck = workers[0]
        os.kill(stuck, signal.SIGSTOP)
        opened = _open(server.port, "WHILESTUCK", 4)
        counts = _wait_accepted(server, "WHILESTUCK", 4)
        assert counts == Counter({workers[1]: 4}), counts
        _release(opened)
    finally:
        if stuck is not None:
            os.kill(stuck, signal.SIGCONT)
        server.stop()


@pytest.mark.slow
def test_associations_leave_no_open_files_behind(tmp_path: Path) -> None:
    """Every association has its own thread; what a thread opens for it (index read
    connections, above all) must not stay open after the association is gone."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    server = Server(tmp_path / "archive", workers=1, args=("--peer", "FINDER@127.0.0.1:9")).start()
    try:
        assert server.proc is not None

        def open_files() -> int:
            return len(os.listdir(f"/proc/{server.proc.pid}/fd"))  # type: ignore[union-attr]

        ae = AE(ae_title="FINDER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""

        def one_association() -> None:
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSGRID")
            assert assoc.is_established
            statuses = [
                s.Status
                for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            ]
            assert statuses[-1] == 0
            assoc.release()

        for _ in range(3):
            one_association()
        wait_until(
            lambda: server.text().count("association with FINDER@127.0.0.1 closed") == 3,
            60,
            "the three first associations closed",
        )
        before = open_files()
        for _ in range(40):
            one_association()
        # What the 40 association threads opened is closed once they are gone: a leak
        # never gets there.
        wait_until(
            lambda: open_files() <= before + 2,
            60,
            f"no more than {before + 2} open files after 40 associations",
            seen=open_files,
        )
    finally:
        server.stop()
