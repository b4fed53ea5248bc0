"""Moved to tests.helpers.servers and tests.helpers.ports (kept until every
importer has switched)."""

from tests.helpers.paths import ROOT
from tests.helpers.ports import free_port
from tests.helpers.servers import json_logs, server_process

__all__ = ["ROOT", "free_port", "json_logs", "server_process"]
