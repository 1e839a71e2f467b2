"""Storage sites: where the bytes of every object live (the source of truth)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pacsgrid.errors import ConfigError
from pacsgrid.settings import DurabilitySettings, SiteSettings
from pacsgrid.storage.base import (
    LoggedSite,
    ObjectInfo,
    PutResult,
    SiteHealth,
    StorageSite,
    object_key,
)

__all__ = [
    "LoggedSite",
    "ObjectInfo",
    "PutResult",
    "SiteHealth",
    "StorageSite",
    "object_key",
    "open_site",
]


def open_site(s: SiteSettings, durability: DurabilitySettings | None = None) -> StorageSite:
    """The site a `[[sites]]` entry describes, chosen by the URL scheme."""
    url = urlparse(s.url)
    if url.scheme == "file":
        from pacsgrid.storage.filesystem import FilesystemSite

        d = durability or DurabilitySettings()
        return FilesystemSite(
            s.name,
            Path(unquote(url.path)),
            location=s.location,
            role=s.role,
            log=d.log,
            inline_max=d.inline_kb << 10,
            log_segment_bytes=d.log_segment_mb << 20,
            group_wait=d.group_wait_ms / 1000,
        )
    if url.scheme == "s3":
        try:
            from pacsgrid.storage.s3 import S3Site  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError as e:
            raise ConfigError(f"sites.{s.name}.url", f"S3 sites unavailable: {e}") from None
        return S3Site.from_settings(s)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError(f"sites.{s.name}.url", f"unsupported scheme {url.scheme!r}")
