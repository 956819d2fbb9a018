"""What the master believes of a worker's answer: nsbuild's exit statuses as
buildd's states, and a summary read bounded, field by field, with only plain
file names taken. Pure functions; the worker is not trusted."""

from __future__ import annotations

import json

import pytest

from nsbuild.farm import outcome


def test_exit_statuses_are_buildd_states() -> None:
    assert [outcome.state(s) for s in (0, 1, 2, 3, 125, 130)] == [
        "built", "failed", "error", "dep-wait", "error", "error"]
    # nsbuild itself killed (OOM, a signal), not found or not executable on
    # the worker, or a status it never gives: the farm's error, not the package's.
    for status in (137, 143, 127, 126, 4, -1):
        assert outcome.state(status) == "error"


def test_the_farm_knows_nsbuilds_exit_statuses() -> None:
    from nsbuild.cli import exits

    assert (outcome.BUILD_FAILED, outcome.USAGE, outcome.UNSATISFIABLE, outcome.SETUP_FAILED,
            outcome.INTERRUPTED) == (exits.BUILD_FAILED, exits.USAGE, exits.UNSATISFIABLE,
                                     exits.SETUP_FAILED, exits.INTERRUPTED)  # fmt: skip


def test_unmet_from_the_summary_field_or_the_message() -> None:
    assert outcome.unmet({"unmet": ["libfoo-dev (>= 2)", 3, ""]}) == ["libfoo-dev (>= 2)"]
    message = "unsatisfiable build dependencies: libfoo-dev (>= 2); bar"
    assert outcome.unmet({"message": message}) == ["libfoo-dev (>= 2)", "bar"]
    assert outcome.unmet({"message": "apt-get update failed (exit status 100); see the log"}) == []
    many = {"unmet": ["x" * 10_000] * 1000}
    got = outcome.unmet(many)
    assert len(got) == outcome.UNMET_COUNT
    assert all(len(u) == outcome.UNMET_LENGTH for u in got)


def test_the_builds_text_names_a_full_disk() -> None:
    said = "nsb 1.0: dpkg-buildpackage failed: exit status 2 (No space left on device: /c)"
    failed = {"package": "nsb", "version": "1.0", "fail_stage": "build", "message": said}
    assert outcome.describe("failed", failed) == "failed nsb 1.0 at build (No space left on device)"
    # Past the part of the message the text shows.
    error = {"message": "x" * 300 + " (No space left on device: /c)"}
    assert outcome.describe("error", error) == f"error: {'x' * 200} (No space left on device)"
    assert outcome.describe("failed", {**failed, "message": "exit status 2"}) == (
        "failed nsb 1.0 at build")
    assert outcome.describe("dep-wait", {"unmet": ["libfoo-dev (>= 2)"]}) == (
        "dep-wait: libfoo-dev (>= 2)")
    assert outcome.describe("built", {}) == "built the package"


@pytest.mark.parametrize("data", ["", "not json", "[1, 2]", '"text"',
                                  "{" + " " * (outcome.SUMMARY_LIMIT + 1) + "}"])
def test_a_summary_that_is_not_one_is_empty(data: str) -> None:
    assert outcome.read_summary(data) == {}


def test_only_plain_names_of_absolute_paths_are_taken() -> None:
    summary = {
        "log": "/w/out/hello_2.10-3_amd64.build",
        "network_log": "relative/x.jsonl",
        "artifacts": [
            {"path": "/w/out/hello_2.10-3_amd64.deb", "size": 10},
            {"path": "/w/out/.."},
            {"path": "/w/out/a\nb.deb"},
            {"path": "/w/out/.hidden"},
            {"path": "/w/out/x..y.deb"},
            {"path": 5},
            "not a dict",
        ],
    }
    assert {k: v.path for k, v in outcome.files(summary).items()} == {
        "hello_2.10-3_amd64.build": "/w/out/hello_2.10-3_amd64.build",
        "hello_2.10-3_amd64.deb": "/w/out/hello_2.10-3_amd64.deb",
    }
    assert outcome.files(json.loads('{"artifacts": {"a": 1}}')) == {}


def test_text_fields_are_strings_cut_short() -> None:
    assert outcome.text({"package": "hello"}, "package") == "hello"
    assert outcome.text({"package": ["x"]}, "package") == ""
    assert outcome.text({"package": "p" * 500}, "package", 100) == "p" * 100


@pytest.mark.parametrize("spec", ["hello", "hello=2.10-3", "libc6=2.36-9+deb12u4",
                                  "pkg=1:2.0~rc1-1"])
def test_archive_sources(spec: str) -> None:
    name, _, version = spec.partition("=")
    assert outcome.split_source(spec) == (name, version or None)


@pytest.mark.parametrize("spec", ["", "Hello", "-x", "hello;rm -rf /", "hello=", "a b",
                                  "hello=2.10 -3", "../x", "hello=$(id)"])
def test_not_archive_sources(spec: str) -> None:
    with pytest.raises(ValueError):
        outcome.split_source(spec)


DEEP = ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000]


@pytest.mark.parametrize("data", DEEP)
def test_a_deeply_nested_summary_is_empty_not_a_traceback(data: str) -> None:
    assert outcome.read_summary(data) == {}


def _artifact(name: str, size: object = 10) -> dict[str, object]:
    return {"path": f"/w/out/{name}", "size": size, "sha256": "0" * 64}


def test_uploads_are_bounded_in_count_and_bytes() -> None:
    many = {"artifacts": [_artifact(f"p_{i}_all.deb") for i in range(outcome.FILES_LIMIT * 2)]}
    with pytest.raises(ValueError, match="files"):
        outcome.files(many)
    big = {"artifacts": [_artifact(f"p_{i}_all.deb", outcome.MAX_FILE) for i in range(10)]}
    with pytest.raises(ValueError, match="bytes"):
        outcome.files(big)
    # Each upload is allowed the size the summary claims, and no more (one
    # byte over, as Buildbot fails an upload of exactly its maxsize).
    got = outcome.files({"artifacts": [_artifact("a_1_all.deb", 1234),
                                       _artifact("b_1_all.deb", "x")],
                         "log": "/w/out/a_1_amd64.build"})  # fmt: skip
    assert got["a_1_all.deb"].maxsize == 1235
    assert got["a_1_all.deb"].sha256 == "0" * 64
    assert "b_1_all.deb" not in got
    assert got["a_1_amd64.build"].maxsize == outcome.LOG_FILE_MAX


def test_a_worker_cannot_name_the_masters_own_summary() -> None:
    assert outcome.files({"artifacts": [_artifact("summary.json")]}) == {}


def test_a_stream_is_kept_up_to_its_limit_and_said_cut_once() -> None:
    kept = outcome.Budget(10)
    assert kept.take("12345") == "12345"
    assert kept.take("67890abc") == "67890" + outcome.Budget.NOTE.format(limit=10)
    assert kept.take("more") == ""
    assert kept.cut


def test_the_summary_must_agree_with_the_exit_status() -> None:
    ok = {"status": "successful", "exit_status": 0}
    assert outcome.judge(0, ok) == "built"
    assert outcome.judge(1, {"status": "failed", "exit_status": 1}) == "failed"
    # The worker's summary and its command's status disagree, or a success
    # came with no summary at all: not believed.
    assert outcome.judge(0, {"status": "failed", "exit_status": 1}) == "error"
    assert outcome.judge(1, ok) == "error"
    assert outcome.judge(0, {}) == "error"
    assert outcome.judge(0, {"status": "successful", "exit_status": "0"}) == "error"
    # A failure's summary may be missing (nsbuild died early): the status says.
    assert outcome.judge(3, {}) == "dep-wait"
