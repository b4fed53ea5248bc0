"""`--db` values: which database a value names, the default SQLite path, and
a PostgreSQL URL's password kept out of logs and messages."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: str | Path) -> bool:
    """Whether a `--db` value names a PostgreSQL server."""
    return isinstance(value, str) and value.strip().lower().startswith(_POSTGRES_SCHEMES)


def default_db_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "voice_agent" / "conversations.db"


def resolve_db(value: str) -> str | Path | None:
    """The `--db` value as a store target: a PostgreSQL URL as it is, `auto`
    the default SQLite path, `none` (or empty) None, anything else a path."""
    if value.strip().lower() in ("", "none"):
        return None
    if is_postgres_url(value):
        return value.strip()
    if value == "auto":
        return default_db_path()
    return Path(value).expanduser()


def url_secrets(url: str) -> list[str]:
    """The passwords a URL carries (in its user info or a `password=`
    parameter), as spelt in the URL and percent-decoded."""
    userinfo = url.partition("://")[2].split("/", 1)[0].rpartition("@")[0]
    raw = [userinfo.partition(":")[2]] if ":" in userinfo else []
    raw += re.findall(r"(?i)(?:[?&])password=([^&#]*)", url)
    return [s for r in raw for s in {r, unquote(r)} if s]


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (for logs and messages)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable database URL>"


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
