"""Typed, frozen settings: one TOML file, `PACSGRID_*` environment overrides, command-line options.

Each setting is declared once, here, with its default and a help line (`setting()`); the loader,
the error messages and `docs/configuration.md` are all derived from those declarations, so the
documentation cannot drift from the code (a test regenerates it and compares).

Precedence, lowest first: built-in defaults, the TOML file, `PACSGRID_<SECTION>_<KEY>`
environment variables, command-line options. A wrong value stops start-up with one line that
names the key, e.g. ``dicom.port: must be an integer from 0 to 65535, got 'abc'``.

Relative paths in a config file are resolved against the folder of that file; relative paths on
the command line against the current directory.
"""

from pacsgrid.settings.loading import (
    Overrides,
    load_settings,
    parse_peer,
    parse_site_options,
    parse_size,
)
from pacsgrid.settings.masking import masked
from pacsgrid.settings.reference import describe_settings
from pacsgrid.settings.sections import (
    ALL_OPERATIONS,
    LISTS,
    SECTIONS,
    AuditLogSettings,
    AuditSettings,
    BackupSettings,
    CommitmentSettings,
    DicomSettings,
    DurabilitySettings,
    ForwardingSettings,
    ForwardRule,
    Hl7Settings,
    HttpSettings,
    IndexSettings,
    LogSettings,
    PeerSettings,
    RepairSettings,
    ReplicationSettings,
    RetentionSettings,
    Settings,
    SiteSettings,
    setting,
)

__all__ = [
    "ALL_OPERATIONS",
    "LISTS",
    "SECTIONS",
    "AuditLogSettings",
    "AuditSettings",
    "BackupSettings",
    "CommitmentSettings",
    "DicomSettings",
    "DurabilitySettings",
    "ForwardRule",
    "ForwardingSettings",
    "Hl7Settings",
    "HttpSettings",
    "IndexSettings",
    "LogSettings",
    "Overrides",
    "PeerSettings",
    "RepairSettings",
    "ReplicationSettings",
    "RetentionSettings",
    "Settings",
    "SiteSettings",
    "describe_settings",
    "load_settings",
    "masked",
    "parse_peer",
    "parse_site_options",
    "parse_size",
    "setting",
]
