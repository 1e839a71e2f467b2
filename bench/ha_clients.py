"""DICOM clients for benchmarks, on pacsgrid's own asyncio SCU (no Nagle, no per-store process
start): a store loop that records the outcome and time of every C-STORE, and an association
prober that opens a new association (C-ECHO) every few milliseconds."""

from __future__ import annotations

import asyncio
import io
import threading
import time

from bench import synth
from pacsgrid.dicom.scu import connect
from pacsgrid.dicomfile.part10 import split_part10

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"


def encoded(n: int, seed: str) -> list[tuple[str, bytes]]:
    """(SOP Instance UID, dataset bytes in explicit VR little endian) of n new instances."""
    spec = synth.Spec(studies=max(1, n // 50), series=1, instances=50, size=16, seed=seed)
    out = []
    for _, ds in synth.datasets(spec):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        out.append((str(ds.SOPInstanceUID), data[split_part10(data).dataset_offset :]))
        if len(out) >= n:
            break
    return out


class Recorder(threading.Thread):
    """Runs an asyncio loop in a thread; `results` holds (start time of the attempt, success)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.results: list[tuple[float, bool]] = []
        self.stop = threading.Event()

    def first_success_after(self, t: float) -> float | None:
        return next((x for x, ok in list(self.results) if x > t and ok), None)

    def last_failure_after(self, t: float) -> float | None:
        fails = [x for x, ok in list(self.results) if x > t and not ok]
        return fails[-1] if fails else None


class StoreLoop(Recorder):
    """C-STOREs back to back on one association (a new one when it breaks)."""

    def __init__(self, port: int, items: list[tuple[str, bytes]]) -> None:
        super().__init__()
        self.port = port
        self.items = items

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        items = iter(self.items)
        assoc = None
        while not self.stop.is_set():
            t0 = time.monotonic()  # a success that started after an event committed after it
            try:
                if assoc is None or assoc.closed.is_set():
                    assoc = await connect(
                        "127.0.0.1",
                        self.port,
                        "BENCH",
                        "PACSGRID",
                        [(CT, [EXPLICIT_LE])],
                        timeout=5,
                    )
                ctx = assoc.context_for(CT)
                assert ctx is not None
                sop, data = next(items)
                status, _ = await assoc.c_store(ctx.id, CT, sop, data)
                ok = status == 0
            except StopIteration:
                return
            except Exception:
                ok = False
                assoc = None
            self.results.append((t0, ok))
            if not ok:
                await asyncio.sleep(0.02)  # a modality retries after a short pause
        if assoc is not None:
            await assoc.release()


class AssociationProbe(Recorder):
    """A new association with a C-ECHO every `every` seconds; a failure is a refused,
    aborted or unanswered (timeout) association."""

    def __init__(self, port: int, every: float = 0.02, timeout: float = 2.0) -> None:
        super().__init__()
        self.port = port
        self.every = every
        self.timeout = timeout

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                assoc = await connect(
                    "127.0.0.1",
                    self.port,
                    "PROBE",
                    "PACSGRID",
                    [(VERIFICATION, ["1.2.840.10008.1.2"])],
                    timeout=self.timeout,
                )
                ok = await asyncio.wait_for(assoc.c_echo(), self.timeout) == 0
                await assoc.release(self.timeout)
            except Exception:
                ok = False
            self.results.append((t0, ok))
            await asyncio.sleep(self.every)
