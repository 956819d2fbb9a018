"""The network log file: one JSON object a line, written as things happen."""

from __future__ import annotations

import json
from pathlib import Path

from nsbuild.net.netlog import NetLog


def test_records_are_json_lines_with_the_documented_fields(tmp_path: Path) -> None:
    path = tmp_path / "net.jsonl"
    log = NetLog(str(path))
    log.add(
        engine="proxy",
        kind="GET",
        host="127.0.0.1",
        port=8080,
        decision="allow",
        rule="127.0.0.1:8080",
        bytes_out=100,
        bytes_in=2000,
        status=200,
    )
    # Written before close: a crash loses nothing.
    first = json.loads(path.read_text().splitlines()[0])
    log.add(
        engine="dns",
        kind="dns",
        host="example.org",
        port=53,
        decision="nxdomain",
        rule="--net none: no network",
    )
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == first
    for key in ("time", "host", "port", "decision", "rule", "bytes_out", "bytes_in"):
        assert key in first
    assert first["bytes_in"] == 2000 and lines[1]["host"] == "example.org"


def test_summary_counts_repeats_and_ignores_allowed() -> None:
    log = NetLog()
    for _ in range(3):
        log.add(engine="proxy", kind="CONNECT", host="::1", port=22, decision="deny", rule="x")
    log.add(engine="proxy", kind="GET", host="a", port=80, decision="allow", rule="a:80")
    assert log.denied_summary() == "network: 3 attempts denied: [::1]:22 x3"
    assert NetLog().denied_summary() is None
