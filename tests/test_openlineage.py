"""OpenLineage events through openlineage-python: START when a stage starts, COMPLETE
with its run record, FAIL when it raises; files always, HTTP when OPENLINEAGE_URL is set."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from distillflow.base.io import DataError
from distillflow.stagekit import entry

from .builders import check_event, write_stage
from .conftest import ROOT


@pytest.fixture(autouse=True)
def restore_environ():
    """openlineage-python writes OPENLINEAGE__TRANSPORT__* into os.environ when it reads
    OPENLINEAGE_URL (its client.py), which monkeypatch does not undo: restore the whole
    environment so later tests' stage processes do not inherit a half-configured client."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def lineage_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTILLFLOW_LINEAGE_DIR", str(tmp_path / "lineage"))
    for var in [v for v in os.environ if v.startswith("OPENLINEAGE") or v in ("DVC_STAGE", "RANK")]:
        monkeypatch.delenv(var)
    return tmp_path / "lineage"


def events(lineage: Path, job: str) -> dict[str, dict[str, Any]]:
    """The job's events by type (one run each)."""
    found = [json.loads(f.read_text()) for f in sorted((lineage / "openlineage" / job).glob("*.json"))]
    by_type = {e["eventType"]: e for e in found}
    assert len(by_type) == len(found), [e["eventType"] for e in found]
    for e in found:
        check_event(e)
    return by_type


def test_a_stage_that_succeeds_leaves_start_and_complete(tmp_path: Path, lineage_env: Path) -> None:
    entry.run_stage(lambda: write_stage(tmp_path), stage="pairs")
    ev = events(lineage_env, "pairs")
    assert set(ev) == {"START", "COMPLETE"}
    run_id = ev["START"]["run"]["runId"]
    assert ev["COMPLETE"]["run"]["runId"] == run_id
    record = json.loads((lineage_env / "runs" / "pairs.json").read_text())
    assert record["openlineage_run_id"] == run_id
    assert ev["START"]["eventTime"] == record["started"] and ev["COMPLETE"]["eventTime"] == record["ended"]
    assert ev["COMPLETE"]["run"]["facets"]["distillflow_run"]["run_id"] == record["run_id"]
    assert ev["COMPLETE"]["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 0
    assert ev["START"]["outputs"] == []  # the datasets come with COMPLETE


def test_a_stage_that_writes_no_record_is_completed_by_entry(lineage_env: Path) -> None:
    entry.run_stage(lambda: None, stage="report")
    ev = events(lineage_env, "report")
    assert set(ev) == {"START", "COMPLETE"} and ev["START"]["run"]["runId"] == ev["COMPLETE"]["run"]["runId"]


def test_a_stage_that_raises_leaves_start_and_fail(lineage_env: Path) -> None:
    def boom() -> None:
        raise RuntimeError("the model diverged")

    with pytest.raises(RuntimeError, match="the model diverged"):
        entry.run_stage(boom, stage="train")
    ev = events(lineage_env, "train")
    assert set(ev) == {"START", "FAIL"} and ev["FAIL"]["run"]["runId"] == ev["START"]["run"]["runId"]
    error = ev["FAIL"]["run"]["facets"]["errorMessage"]
    assert error["message"] == "RuntimeError: the model diverged" and error["programmingLanguage"] == "PYTHON"
    assert "in boom" in error["stackTrace"]
    assert not (lineage_env / "runs").exists()


def test_bad_input_exits_2_and_leaves_fail(lineage_env: Path) -> None:
    def bad() -> None:
        raise DataError("x.parquet: row 3: field score: not a number")

    with pytest.raises(SystemExit) as exc:
        entry.run_stage(bad, stage="score")
    assert exc.value.code == 2
    assert events(lineage_env, "score")["FAIL"]["run"]["facets"]["errorMessage"]["message"].startswith("DataError")


def test_a_real_stage_process_names_its_job_and_fails(lineage_env: Path) -> None:
    """`python -m stages.report` with no arguments: argparse exits 2 inside main()."""
    done = subprocess.run(
        [sys.executable, "-m", "stages.report"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    ev = events(lineage_env, "report")
    assert set(ev) == {"START", "FAIL"}
    assert ev["FAIL"]["run"]["facets"]["errorMessage"]["message"] == "exit status 2"


class Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lineage_server() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """An OpenLineage collector on 127.0.0.1 that shuts itself down after 60 s at most."""
    received: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(60, server.shutdown)
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_events_go_to_the_http_server_openlineage_url_names(
    tmp_path: Path, lineage_env: Path, lineage_server: tuple[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = lineage_server
    entry.run_stage(lambda: write_stage(tmp_path / "plain"), stage="pairs")
    plain = (tmp_path / "plain" / "data" / "pairs" / "manifest.json").read_bytes()
    monkeypatch.setenv("OPENLINEAGE_URL", url)
    entry.run_stage(lambda: write_stage(tmp_path / "sent"), stage="pairs")
    assert [(path, e["eventType"]) for path, e in received] == [
        ("/api/v1/lineage", "START"),
        ("/api/v1/lineage", "COMPLETE"),
    ]
    assert received[0][1]["run"]["runId"] == received[1][1]["run"]["runId"]
    files = {json.loads(f.read_text())["run"]["runId"] for f in (lineage_env / "openlineage" / "pairs").glob("*.json")}
    assert received[0][1]["run"]["runId"] in files  # and the files are written as well
    for _, event in received:
        check_event(event)
    # the manifest (in the DVC out) does not depend on where the events go
    assert (tmp_path / "sent" / "data" / "pairs" / "manifest.json").read_bytes().replace(b"/sent/", b"/plain/") == plain


def test_an_unreachable_server_is_logged_and_the_stage_completes(
    tmp_path: Path, lineage_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "openlineage.yml"
    config.write_text("transport:\n  type: http\n  url: http://127.0.0.1:9\n  timeout: 2\n  retry:\n    total: 0\n")
    monkeypatch.setenv("OPENLINEAGE_CONFIG", str(config))
    with caplog.at_level(logging.ERROR, logger="distillflow.audit.openlineage"):
        entry.run_stage(lambda: write_stage(tmp_path), stage="pairs")
    assert set(events(lineage_env, "pairs")) == {"START", "COMPLETE"}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and all("not sent through the http transport" in m for m in logged), logged
    assert "-COMPLETE.json" in logged[1]


def test_a_stage_that_fails_after_its_record_ends_with_fail(tmp_path: Path, lineage_env: Path) -> None:
    def late() -> None:
        write_stage(tmp_path)
        raise OSError("metrics.json: disk full")

    with pytest.raises(OSError, match="disk full"):
        entry.run_stage(late, stage="pairs")
    ev = events(lineage_env, "pairs")
    assert set(ev) == {"START", "COMPLETE", "FAIL"}
    assert ev["FAIL"]["run"]["facets"]["errorMessage"]["message"] == "OSError: metrics.json: disk full"
