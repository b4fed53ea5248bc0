"""benchmarks/soak.py end to end, briefly: a reduced mix for a few seconds
against a real `voice-agent serve` (tiny model, --engine-process, PostgreSQL,
mosquitto), no faults; its JSON has the promised shape and the turns were
answered. (The real runs: docs/benchmarks/soak-*.json.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.mosquitto import require_mosquitto
from tests.helpers.paths import ROOT
from tests.helpers.postgres import postgres_bin

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def test_a_short_soak_answers_every_turn_and_reports_its_figures() -> None:
    require_mosquitto()
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    args = ["--minutes", "0.2", "--mix", "text=2,resume=1,mqtt=1", "--faults", "none"]
    args += ["--warmup-s", "2", "--sample-s", "1", "--settle-s", "1", "--think-s", "2"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=240)  # the model loads slowly on a busy machine
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the soak stops its server, broker and database
        out, err = proc.communicate(timeout=150)
        pytest.fail(f"the soak did not end within 240 s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    turns = result["turns"]
    assert turns["sent"] > 0 and turns["answered"] == turns["sent"], turns
    assert turns["lost"] == 0 and turns["open"] == 0
    assert set(turns["by_kind"]) <= {"text", "resume", "mqtt"} and "mqtt" in turns["by_kind"]
    for process in ("server", "worker"):
        assert result["rss_mb"][process]["growth_after_warmup"] is not None
        assert result["fds"][process]["growth_after_warmup"] is not None
    assert result["samples"] and result["samples"][0]["server_rss_mb"] > 0
    # the kept conversations' share of the server's memory, read from /metrics
    assert result["samples"][-1]["server_kept_mb"] is not None
    assert result["rss_mb"]["server_kept_conversations"]["growth_after_warmup"] is not None
    rest = result["rss_mb"]["server_without_kept"]
    assert rest["samples"] == result["rss_mb"]["server"]["samples"]
    assert result["faults"] == [] and result["resumes"]["failed"] == 0
    assert result["server"]["exit_code"] == 0
    assert set(result["goals"]) == {
        "server_rss_growth_under_50_mb",
        "fds_flat",
        "no_turns_lost",
        "no_failed_resumes",
        "well_behaved_unaffected",
    }
    assert result["well_behaved_got_every_reply"] is True
