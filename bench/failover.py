"""Failover: seconds from the death of the PostgreSQL primary to the first successful C-STORE
after the streaming replica is promoted.

    python -m bench.failover                  # 3 rounds, promotion right after the death
    python -m bench.failover --promote-delay 10   # as if the orchestrator waited 10 s

Each round: a primary and a streaming replica (initdb, pg_basebackup, pg_ctl on 127.0.0.1),
one `pacsgrid serve` with the multi-host conninfo (`target_session_attrs=read-write`), and a
client (pacsgrid's asyncio SCU) storing new instances one after another on one association
(opening a new one if the archive aborts it). The primary is SIGKILLed (postmaster and
backends), the replica promoted with `pg_ctl promote` after --promote-delay seconds
(Patroni's job in production, after its TTL), and the stores' outcomes are timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ha_clients import StoreLoop, encoded  # noqa: E402
from tests.peers import Server  # noqa: E402
from tests.pg import FAST_FAIL, PgCluster, failover_url  # noqa: E402


def one_round(workdir: Path, promote_delay: float, n: int) -> dict[str, float]:
    items = encoded(3000, f"failover-{n}-{time.time()}")
    primary = PgCluster().init().start()
    replica = None
    server = None
    try:
        primary.create_db("pacs")
        replica = primary.replica().start()
        url = failover_url(primary, replica)
        server = Server(
            workdir / f"archive-{time.time_ns()}", args=("--database", url), env=FAST_FAIL
        ).start()
        client = StoreLoop(server.port, items)
        client.start()
        time.sleep(2.0)
        t_kill = time.monotonic()
        primary.kill()
        time.sleep(promote_delay)
        t0 = time.monotonic()
        replica.promote()
        t_promoted = time.monotonic()
        deadline = time.monotonic() + 60
        first_ok = None
        while time.monotonic() < deadline and first_ok is None:
            time.sleep(0.01)
            first_ok = client.first_success_after(t_kill)
        time.sleep(1.0)
        client.stop.set()
        client.join(30)
        if first_ok is None:
            raise RuntimeError("no C-STORE succeeded within 60 s of the promotion")
        refused = sum(1 for t, ok in client.results if t_kill < t < first_ok and not ok)
        before = sum(1 for t, ok in client.results if t < t_kill and ok)
        return {
            "failover": first_ok - t_kill,
            "promote": t_promoted - t0,
            "after_promotion": first_ok - t_promoted,
            "refused": refused,
            "stored_before": before,
        }
    finally:
        if server is not None:
            server.stop()
        if replica is not None:
            replica.destroy()
        primary.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--promote-delay", type=float, default=0.0)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pacsgrid-failover-") as tmp:
        for n in range(a.rounds):
            r = one_round(Path(tmp), a.promote_delay, n)
            rows.append(r)
            print(
                f"round {n + 1}: primary death -> first successful C-STORE {r['failover']:.2f}s "
                f"(pg_ctl promote took {r['promote']:.2f}s; first success "
                f"{r['after_promotion']:.2f}s after it; {int(r['refused'])} stores refused "
                f"with a failure status meanwhile, {int(r['stored_before'])} stored before)"
            )
    med = statistics.median(r["failover"] for r in rows)
    print(
        f"failover (promote delay {a.promote_delay:.0f}s): median {med:.2f}s, "
        f"max {max(r['failover'] for r in rows):.2f}s over {len(rows)} rounds"
    )


if __name__ == "__main__":
    main()
