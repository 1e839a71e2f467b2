"""Which new TCP connections a DICOM worker takes: a bound on all, a bound per address, and
room made by closing connections that are not associations.

`Admission` only decides; `pacsgrid.dicom.server` acts (starts the thread, closes the
connections chosen to make room, rejects). It is called under the server's lock.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class Connection(Protocol):
    """What admission needs to know of a connection (a `ServerAssociation`)."""

    since: float  # time.monotonic() when it was accepted

    @property
    def waiting(self) -> bool:
        """Not associated (yet, or any more): it may be closed to make room."""
        ...


C = TypeVar("C", bound=Connection)


class Admission(Generic[C]):
    def __init__(self, limit: int, per_host: int) -> None:
        """`limit`: connections held at once; `per_host`: from one address (0 = no bound)."""
        self.limit = limit
        self.per_host = per_host
        self._held: dict[C, str] = {}  # connection -> address
        self._leaving: set[C] = set()  # chosen to make room, not yet gone

    def __len__(self) -> int:
        return len(self._held) - len(self._leaving)

    def admit(self, host: str, conn: C) -> tuple[bool, list[C]]:
        """Whether `conn` from `host` may have a thread, and the waiting connections to close
        to make room for it (oldest first: a flood's older connections go first, and a
        real peer's, which sends its request at once, is past waiting long before)."""
        victims: list[C] = []
        if self.per_host and self._from(host) >= self.per_host:
            victim = self._oldest_waiting(host)
            if victim is None:
                return False, []
            victims.append(victim)
        if len(self) >= self.limit:
            victim = self._oldest_waiting(None)
            if victim is None:
                self._leaving.difference_update(victims)
                return False, []
            victims.append(victim)
        self._held[conn] = host
        return True, victims

    def leave(self, conn: C) -> None:
        """`conn` is closed (its thread ends)."""
        self._held.pop(conn, None)
        self._leaving.discard(conn)

    def refusal(self, host: str) -> str:
        """Why a connection from `host` was not admitted, for the log and the rejection."""
        if self.per_host and self._from(host) >= self.per_host:
            return (
                f"{self._from(host)} associations from {host} already "
                f"(dicom.max_associations_per_host {self.per_host})"
            )
        return f"{len(self)} associations already (dicom.max_associations {self.limit})"

    def _from(self, host: str) -> int:
        return sum(1 for c, h in self._held.items() if h == host and c not in self._leaving)

    def _oldest_waiting(self, host: str | None) -> C | None:
        best: C | None = None
        for c, h in self._held.items():
            if c in self._leaving or (host is not None and h != host) or not c.waiting:
                continue
            if best is None or c.since < best.since:
                best = c
        if best is not None:
            self._leaving.add(best)
        return best
