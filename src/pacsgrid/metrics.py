"""Prometheus metrics of the archive, recorded by `Archive` and exported by the web face.

DICOM runs in several worker processes while /metrics is served by the supervisor, so the
counters use prometheus_client's multiprocess mode: `pacsgrid serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh folder before any worker starts, each process writes its
samples to memory-mapped files there, and /metrics sums them (`collect()`). Without that
variable (a CLI command, a test) the metrics live in the process's default registry.

Gauges that describe shared state (index size, work queue, site health) are not recorded per
process: the web process computes them when scraped (see pacsgrid.web.metrics_view).
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

INGEST = Counter(
    "pacsgrid_ingest",
    "Objects received for storage, by service and outcome",
    ["service", "outcome"],
)
INGEST_BYTES = Counter("pacsgrid_ingest_bytes", "Bytes of objects stored", ["service"])
INGEST_SECONDS = Histogram(
    "pacsgrid_ingest_seconds",
    "Time from receiving an object to its durable acknowledgement",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
RETRIEVE = Counter(
    "pacsgrid_retrieve",
    "Objects read for a retrieve, by service and outcome",
    ["service", "outcome"],
)
RETRIEVE_BYTES = Counter("pacsgrid_retrieve_bytes", "Bytes of objects read", ["service"])
RETRIEVE_SECONDS = Histogram(
    "pacsgrid_retrieve_seconds",
    "Time to read (and verify) one object from a site",
    ["service"],
    buckets=LATENCY_BUCKETS,
)
QUERY_SECONDS = Histogram(
    "pacsgrid_query_seconds", "Index query time per request", ["service"], buckets=LATENCY_BUCKETS
)
SITE_OPS = Counter("pacsgrid_site_operations", "Operations on storage sites", ["site", "op"])
SITE_ERRORS = Counter("pacsgrid_site_errors", "Failed operations on storage sites", ["site", "op"])
COMMITMENT = Counter(
    "pacsgrid_commitment_instances",
    "Instances storage commitment was asked for, by outcome (committed, failed)",
    ["outcome"],
)
COMMITMENT_REPORTS = Counter(
    "pacsgrid_commitment_reports",
    "Storage commitment reports, by outcome (sent, retry, given_up)",
    ["outcome"],
)
ACCESS_DENIED = Counter("pacsgrid_access_denied", "Refused requests", ["service"])
SCRYPT = Counter("pacsgrid_password_hashes", "scrypt computations (password checks and changes)")
CORRECTIONS = Counter(
    "pacsgrid_corrections",
    "Corrections made, by kind (patient, merge, move-study, reject, unhide, undo; failed)",
    ["kind"],
)
HL7_MESSAGES = Counter(
    "pacsgrid_hl7_messages", "HL7 messages answered, by acknowledgement code", ["code"]
)
LOGIN_REFUSED = Counter(
    "pacsgrid_logins_refused",
    "Password logins answered 429 without a check, by reason (backoff, busy)",
    ["reason"],
)


def service_of(via: str) -> str:
    """Label for a front end: dimse, web, import, migrate, cli."""
    return via or "unknown"


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def enable_multiprocess(directory: str) -> None:
    """Switch this process, and the workers it starts (they inherit the environment), to
    multiprocess metrics in `directory`. Must run before any labelled metric is used here."""
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
