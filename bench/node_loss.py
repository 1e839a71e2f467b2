"""Node loss behind HAProxy: seconds until new associations succeed again after one of two
archive nodes dies (SIGKILL) or hangs (SIGSTOP: the port still accepts, nothing answers).

    python -m bench.node_loss            # both scenarios, 3 rounds each

Setup per round: PostgreSQL (one server for the run), two `pacsgrid serve` nodes on it sharing
one filesystem site, HAProxy (TCP mode, the DICOM health check of deploy/haproxy.cfg with
inter 500ms, fall 2, rise 1, check timeout 1s), and a probe opening a new association with a
C-ECHO through HAProxy every 20 ms (2 s timeout). Reported: time from the event to the first
successful association after the last failed one (0 when none failed), failed associations,
and when HAProxy marked the node DOWN.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ha_clients import AssociationProbe  # noqa: E402
from tests.peers import HAProxy, Server  # noqa: E402
from tests.pg import PgCluster  # noqa: E402


def one_round(work: Path, url: str, scenario: str) -> dict[str, float]:
    cfg = work / "node.toml"
    cfg.write_text(
        f'database = "{url}"\n[[sites]]\nname = "shared"\n'
        f'url = "file://{work / "shared-site"}"\n[index]\nconnect_timeout = 2.0\n'
    )
    nodes = [Server(work / f"node-{i}-{time.time_ns()}", config=cfg).start() for i in range(2)]
    proxy = HAProxy(work, [("a", "127.0.0.1", nodes[0].port), ("b", "127.0.0.1", nodes[1].port)])
    probe = AssociationProbe(proxy.port)
    assert nodes[0].proc is not None
    pid = nodes[0].proc.pid
    try:
        proxy.wait_state("a", "UP")
        proxy.wait_state("b", "UP")
        probe.start()
        time.sleep(1.0)
        t_event = time.monotonic()
        if scenario == "kill":
            nodes[0].kill()
        else:
            os.kill(pid, signal.SIGSTOP)
        down = proxy.wait_state("a", "DOWN", timeout=30)
        time.sleep(4.0)
        probe.stop.set()
        probe.join(10)
        last_fail = probe.last_failure_after(t_event)
        failed = sum(1 for t, ok in probe.results if t >= t_event and not ok)
        if last_fail is None:
            outage = 0.0
        else:
            ok_after = probe.first_success_after(last_fail)
            outage = (ok_after or time.monotonic()) - t_event
        return {"outage": outage, "failed": failed, "down": down}
    finally:
        if scenario == "hang":
            os.kill(pid, signal.SIGCONT)
        probe.stop.set()
        proxy.stop()
        for s in nodes:
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    cluster = PgCluster().init().start()
    try:
        with tempfile.TemporaryDirectory(prefix="pacsgrid-node-loss-") as tmp:
            for scenario in ("kill", "hang"):
                rows = []
                for n in range(a.rounds):
                    url = cluster.create_db(f"nodes_{scenario}_{n}")
                    r = one_round(Path(tmp), url, scenario)
                    rows.append(r)
                    print(
                        f"{scenario} round {n + 1}: new associations succeed again after "
                        f"{r['outage']:.2f}s ({int(r['failed'])} failed); HAProxy marked the "
                        f"node DOWN after {r['down']:.2f}s"
                    )
                med = statistics.median(r["outage"] for r in rows)
                print(
                    f"{scenario}: median {med:.2f}s, max {max(r['outage'] for r in rows):.2f}s "
                    f"until new associations succeed"
                )
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
