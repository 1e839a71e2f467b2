"""Settings as logs, errors, pages and the audit trail may show them: without secrets.

A site URL may carry credentials: ``s3://BUCKET/PREFIX?access_key=...&secret_key=...``, or a
password in ``scheme://user:password@host`` (or ``password=...`` in a PostgreSQL conninfo).
Wherever a URL from the settings is shown, it is `masked(url)`: credential parameters are left
out and a password becomes ``***``. One function, so that no place shows a URL its own way.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_PARAMS = frozenset({"access_key", "secret_key", "session_token", "password", "token"})
_CONNINFO_SECRET = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def masked(url: str) -> str:
    """`url` without the credentials it may hold."""
    if "://" not in url:  # key=value conninfo, or not a URL at all
        return _CONNINFO_SECRET.sub(r"\1***", url)
    try:
        u = urlsplit(url)
    except ValueError:
        return "<unreadable URL>"
    netloc = u.netloc
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = u.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v) for k, v in pairs if k.lower() not in SECRET_PARAMS])
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))
