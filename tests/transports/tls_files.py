"""Moved to tests.helpers.tls (kept until every importer has switched)."""

from tests.helpers.tls import make_tls_files

__all__ = ["make_tls_files"]
