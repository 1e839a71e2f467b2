"""The index schema as a list of named migrations, applied in order, each once.

Each feature adds its tables as a new migration at the end of `MIGRATIONS` (never by editing
an applied one). Names, not numbers, record what was applied (table `schema_migrations`), so
features developed side by side do not fight over version numbers. An index carrying a
migration this pacsgrid does not know was upgraded by a newer pacsgrid: opening it fails with
a clear message rather than guessing.

Every migration is literal SQL, frozen once released (tests/test_migrations.py pins each by
its SHA-256 on both engines): the attribute columns of `0001_core` are spelled out rather than
derived from `pacsgrid.model.ATTRIBUTES`, so a new attribute is a new migration (an `ALTER
TABLE ... ADD COLUMN`) and never silently changes one that indexes have already applied. The
numbers in the names are not unique (four features landed as `0003_*` side by side); the names
are, and they are what indexes record, so they stay as they are.

DDL is written once for both engines; `Types` fills in what differs (an auto-increment key,
a float type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Types:
    pk: str  # "INTEGER PRIMARY KEY" (SQLite) / "BIGSERIAL PRIMARY KEY" (PostgreSQL)
    real: str  # "REAL" / "DOUBLE PRECISION"
    text: str = "TEXT"
    engine: str = "sqlite"  # "sqlite" | "postgres": for the few statements only one engine needs


SQLITE_TYPES = Types("INTEGER PRIMARY KEY", "REAL")
POSTGRES_TYPES = Types("BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION", engine="postgres")


def core(t: Types) -> list[str]:
    """Patients, studies, series, instances, copies and sites."""
    return [
        f"""CREATE TABLE patient (
  pk {t.pk},
  patient_key {t.text} NOT NULL UNIQUE,
  patient_id TEXT NOT NULL DEFAULT '',
  patient_name TEXT NOT NULL DEFAULT '',
  patient_name_norm TEXT NOT NULL DEFAULT '',
  issuer TEXT NOT NULL DEFAULT '',
  birth_date TEXT NOT NULL DEFAULT '',
  sex TEXT NOT NULL DEFAULT '',
  num_studies INTEGER NOT NULL DEFAULT 0,
  num_series INTEGER NOT NULL DEFAULT 0,
  num_instances INTEGER NOT NULL DEFAULT 0)""",
        f"""CREATE TABLE study (
  pk {t.pk},
  patient_pk BIGINT NOT NULL REFERENCES patient(pk),
  study_uid TEXT NOT NULL DEFAULT '',
  study_date TEXT NOT NULL DEFAULT '',
  study_time TEXT NOT NULL DEFAULT '',
  accession TEXT NOT NULL DEFAULT '',
  study_id TEXT NOT NULL DEFAULT '',
  study_description TEXT NOT NULL DEFAULT '',
  referring_physician TEXT NOT NULL DEFAULT '',
  referring_physician_norm TEXT NOT NULL DEFAULT '',
  modalities {t.text} NOT NULL DEFAULT '',
  sop_classes {t.text} NOT NULL DEFAULT '',
  num_series INTEGER NOT NULL DEFAULT 0,
  num_instances INTEGER NOT NULL DEFAULT 0,
  updated_at {t.real} NOT NULL DEFAULT 0)""",
        f"""CREATE TABLE series (
  pk {t.pk},
  study_pk BIGINT NOT NULL REFERENCES study(pk),
  series_uid TEXT NOT NULL DEFAULT '',
  modality TEXT NOT NULL DEFAULT '',
  series_number TEXT NOT NULL DEFAULT '',
  series_description TEXT NOT NULL DEFAULT '',
  series_date TEXT NOT NULL DEFAULT '',
  series_time TEXT NOT NULL DEFAULT '',
  body_part TEXT NOT NULL DEFAULT '',
  num_instances INTEGER NOT NULL DEFAULT 0)""",
        f"""CREATE TABLE instance (
  pk {t.pk},
  series_pk BIGINT NOT NULL REFERENCES series(pk),
  sop_uid TEXT NOT NULL DEFAULT '',
  sop_class_uid TEXT NOT NULL DEFAULT '',
  instance_number TEXT NOT NULL DEFAULT '',
  content_date TEXT NOT NULL DEFAULT '',
  content_time TEXT NOT NULL DEFAULT '',
  number_of_frames TEXT NOT NULL DEFAULT '',
  rows TEXT NOT NULL DEFAULT '',
  columns TEXT NOT NULL DEFAULT '',
  transfer_syntax {t.text} NOT NULL,
  size BIGINT NOT NULL,
  sha256 {t.text} NOT NULL,
  stored_at {t.real} NOT NULL,
  source_ae {t.text} NOT NULL DEFAULT '')""",
        f"""CREATE TABLE copy (
  instance_pk BIGINT NOT NULL REFERENCES instance(pk) ON DELETE CASCADE,
  site {t.text} NOT NULL,
  key {t.text} NOT NULL,
  size BIGINT NOT NULL,
  sha256 {t.text} NOT NULL,
  stored_at {t.real} NOT NULL,
  state {t.text} NOT NULL DEFAULT 'ok',
  verified_at {t.real},
  PRIMARY KEY (instance_pk, site))""",
        f"CREATE TABLE site (name {t.text} PRIMARY KEY, registered_at {t.real} NOT NULL)",
        "CREATE UNIQUE INDEX study_uid_idx ON study(study_uid)",
        "CREATE UNIQUE INDEX series_uid_idx ON series(series_uid)",
        "CREATE UNIQUE INDEX sop_uid_idx ON instance(sop_uid)",
        "CREATE INDEX patient_id_idx ON patient(patient_id)",
        "CREATE INDEX patient_name_idx ON patient(patient_name_norm)",
        "CREATE INDEX study_patient_idx ON study(patient_pk)",
        "CREATE INDEX study_date_idx ON study(study_date)",
        "CREATE INDEX study_accession_idx ON study(accession)",
        "CREATE INDEX series_study_idx ON series(study_pk)",
        "CREATE INDEX instance_series_idx ON instance(series_pk)",
        "CREATE INDEX copy_site_idx ON copy(site, state)",
    ]


def work_queue(t: Types) -> list[str]:
    """Durable work items for background jobs (copies to make, instances to forward, ...).

    One row per (kind, key). A worker claims items by setting a lease (claimed_by,
    claimed_until); an item whose lease ran out (its node died) can be claimed again.
    """
    return [
        f"""CREATE TABLE work (
  pk {t.pk},
  kind {t.text} NOT NULL,
  key {t.text} NOT NULL,
  payload {t.text} NOT NULL DEFAULT '',
  state {t.text} NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  not_before {t.real} NOT NULL DEFAULT 0,
  claimed_by {t.text},
  claimed_until {t.real},
  last_error {t.text} NOT NULL DEFAULT '',
  created_at {t.real} NOT NULL,
  updated_at {t.real} NOT NULL,
  UNIQUE (kind, key))""",
        "CREATE INDEX work_ready_idx ON work(kind, state, not_before)",
    ]


def sites(t: Types) -> list[str]:
    """Several sites: when a cache copy was last read (LRU eviction), an index for the fixity
    audit's "least recently verified first", and small named state for resumable jobs."""
    return [
        f"ALTER TABLE copy ADD COLUMN accessed_at {t.real}",
        "CREATE INDEX copy_site_verified_idx ON copy(site, verified_at)",
        # Named state of jobs: resumable passes (value) and periodic jobs that one node of
        # several runs per period (last_run, owner; see Index.lease_job).
        f"""CREATE TABLE job_state (
  name {t.text} PRIMARY KEY,
  value {t.text} NOT NULL DEFAULT '',
  updated_at {t.real} NOT NULL DEFAULT 0,
  last_run {t.real} NOT NULL DEFAULT 0,
  owner {t.text} NOT NULL DEFAULT '',
  detail {t.text} NOT NULL DEFAULT '')""",
    ]


def migration_ledgers(t: Types) -> list[str]:
    """Ledgers of `pacsgrid migrate` (see pacsgrid.migration_ledger): one row per file of a legacy
    folder, one row per study of a legacy PACS, keyed by the source they came from."""
    return [
        f"""CREATE TABLE folder_ledger (
  pk {t.pk},
  source {t.text} NOT NULL,
  path {t.text} NOT NULL,
  size BIGINT NOT NULL,
  mtime_ns BIGINT NOT NULL,
  sha256 {t.text} NOT NULL DEFAULT '',
  sop_uid {t.text} NOT NULL DEFAULT '',
  state {t.text} NOT NULL,
  reason {t.text} NOT NULL DEFAULT '',
  updated_at {t.real} NOT NULL,
  UNIQUE (source, path))""",
        "CREATE INDEX folder_ledger_state_idx ON folder_ledger(source, state)",
        f"""CREATE TABLE study_ledger (
  pk {t.pk},
  source {t.text} NOT NULL,
  study_uid {t.text} NOT NULL,
  study_date {t.text} NOT NULL DEFAULT '',
  patient_id {t.text} NOT NULL DEFAULT '',
  expected INTEGER NOT NULL DEFAULT -1,
  received INTEGER NOT NULL DEFAULT 0,
  state {t.text} NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error {t.text} NOT NULL DEFAULT '',
  updated_at {t.real} NOT NULL,
  UNIQUE (source, study_uid))""",
        "CREATE INDEX study_ledger_state_idx ON study_ledger(source, state)",
    ]


def web_auth(t: Types) -> list[str]:
    """Users of the web face (hashed passwords, a role) and their API tokens (SHA-256 only:
    tokens are random, so a fast hash is safe and checking one costs nothing)."""
    return [
        f"""CREATE TABLE web_user (
  name {t.text} PRIMARY KEY,
  role {t.text} NOT NULL,
  password_hash {t.text} NOT NULL DEFAULT '',
  created_at {t.real} NOT NULL)""",
        f"""CREATE TABLE web_token (
  token_hash {t.text} PRIMARY KEY,
  user_name {t.text} NOT NULL REFERENCES web_user(name) ON DELETE CASCADE,
  label {t.text} NOT NULL DEFAULT '',
  created_at {t.real} NOT NULL)""",
        "CREATE INDEX web_token_user_idx ON web_token(user_name)",
    ]


def scale(t: Types) -> list[str]:
    """What several nodes and a large index need.

    - `copy(site, key)`: reindex and reconcile ask "is this object already indexed?" per key;
    - `study_modality`: ModalitiesInStudy as rows, so that a C-FIND on it is an index lookup
      on both engines instead of a substring scan of every study (filled from the series
      already stored);
    - PostgreSQL compares text with the database's collation, so its plain B-tree indexes
      cannot serve `LIKE 'SMI%'` (C-FIND wildcards) unless the collation is C: the
      `text_pattern_ops` twins can. SQLite's GLOB uses the plain indexes already.
    """
    out = [
        "CREATE INDEX copy_key_idx ON copy(site, key)",
        f"""CREATE TABLE study_modality (
  study_pk BIGINT NOT NULL REFERENCES study(pk),
  modality {t.text} NOT NULL,
  PRIMARY KEY (modality, study_pk))""",
        "INSERT INTO study_modality (study_pk, modality) SELECT DISTINCT study_pk, modality "
        "FROM series WHERE modality <> ''",
    ]
    if t.engine == "postgres":
        out += [
            "CREATE INDEX patient_name_like_idx ON patient(patient_name_norm text_pattern_ops)",
            "CREATE INDEX patient_id_like_idx ON patient(patient_id text_pattern_ops)",
            "CREATE INDEX study_accession_like_idx ON study(accession text_pattern_ops)",
            "CREATE INDEX study_date_pk_idx ON study(study_date, pk)",
        ]
    return out


def checkpoint_mark(t: Types) -> list[str]:
    """One row a durable commit rewrites to flush every commit before it (`Index.sync`)."""
    return [
        f"CREATE TABLE checkpoint_mark (id INTEGER PRIMARY KEY, at {t.real} NOT NULL)",
        "INSERT INTO checkpoint_mark (id, at) VALUES (1, 0)",
    ]


def corrections(t: Types) -> list[str]:
    """Corrections over immutable objects (pacsgrid.correction).

    - `correction`: every correction in order (`seq`), its document as written to the sites,
      `pending` until it is durable there and applied here; `undone_by` the undo that
      reverted it; `missing`: archive sites that did not get the document (healed later);
    - `correction_subject`: what each correction touched (an undo must not skip a later
      correction of the same study, patient or instance);
    - `correction_source`: what asked for a correction, by its own id (an HL7 message, a
      rejection note): each is acted on at most once;
    - `corrected_study`: studies whose objects are sent with their patient's current values,
      with the values their objects carry;
    - `hidden_instance`: instances a rejection hides, by SOP Instance UID (also those that have
      not arrived yet), one row per correction that hides them.
    """
    return [
        f"""CREATE TABLE correction (
  seq BIGINT PRIMARY KEY,
  kind {t.text} NOT NULL,
  state {t.text} NOT NULL,
  doc {t.text} NOT NULL,
  source {t.text} NOT NULL DEFAULT '',
  undoes BIGINT NOT NULL DEFAULT 0,
  undone_by BIGINT,
  missing {t.text} NOT NULL DEFAULT '',
  created_at {t.real} NOT NULL,
  applied_at {t.real})""",
        "CREATE INDEX correction_state_idx ON correction(state)",
        f"""CREATE TABLE correction_subject (
  subject {t.text} NOT NULL,
  seq BIGINT NOT NULL,
  PRIMARY KEY (subject, seq))""",
        f"""CREATE TABLE correction_source (
  source {t.text} PRIMARY KEY,
  seq BIGINT,
  outcome {t.text} NOT NULL,
  at {t.real} NOT NULL)""",
        f"""CREATE TABLE corrected_study (
  study_pk BIGINT PRIMARY KEY REFERENCES study(pk),
  original {t.text} NOT NULL)""",
        f"""CREATE TABLE hidden_instance (
  sop_uid {t.text} NOT NULL,
  seq BIGINT NOT NULL,
  study_uid {t.text} NOT NULL DEFAULT '',
  PRIMARY KEY (sop_uid, seq))""",
        "CREATE INDEX hidden_instance_seq_idx ON hidden_instance(seq)",
    ]


def totals(t: Types) -> list[str]:
    """What `status` and the dashboard total without reading every instance (on 10 million
    instances that read took minutes):
    - `series.size`, the bytes of a series' instances, kept by filing like `num_instances`:
      the index's totals add up series (hundreds of thousands of rows) instead;
    - the copies' (site, state) index also holds their size, so that usage per site is read
      from the index alone."""
    return [
        "ALTER TABLE series ADD COLUMN size BIGINT NOT NULL DEFAULT 0",
        "UPDATE series SET size = (SELECT coalesce(sum(i.size), 0) FROM instance i "
        "WHERE i.series_pk = series.pk)",
        "DROP INDEX copy_site_idx",
        "CREATE INDEX copy_site_idx ON copy(site, state, size)",
    ]


def modalities_by_study(t: Types) -> list[str]:
    """A study's ModalitiesInStudy rows found by the study: a correction or a hidden
    instance counts a study again and replaces its rows, which without this index read the
    whole table once per study (the primary key leads with the modality, for C-FIND)."""
    return ["CREATE INDEX study_modality_study_idx ON study_modality(study_pk)"]


# Append new migrations at the end; never edit or reorder applied ones.
MIGRATIONS: list[tuple[str, Callable[[Types], list[str]]]] = [
    ("0001_core", core),
    ("0002_work_queue", work_queue),
    ("0003_sites", sites),
    ("0003_migration_ledgers", migration_ledgers),
    ("0003_web_auth", web_auth),
    ("0003_scale", scale),
    ("0004_checkpoint_mark", checkpoint_mark),
    ("0005_corrections", corrections),
    ("0006_totals", totals),
    ("0007_modalities_by_study", modalities_by_study),
]

TRACKING_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)
