"""The farm end to end: `nsbuild farm submit` to a real master with two real
workers, real `nsbuild build`s on them, and what the user sees: the table,
the files fetched, the states in Buildbot's REST interface."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from debbuild.conftest import make_package
from inputs import fixture_dsc

from .conftest import WORKERS, Farm, dsc_of, table_rows

pytestmark = [pytest.mark.slow, pytest.mark.userns]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nsbuild-greeting"
UNMET = "nsbuild-no-such-package (>= 1)"
EXCEPTION = 4  # Buildbot's result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four source packages: the example, hello, one whose build fails,
    one whose build dependency no archive has."""
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(EXAMPLE, root / "nsbuild-greeting-1.0")
    fails = make_package(root, "nsb-farm-fails", build="echo this build fails on purpose; exit 1")
    unsat = make_package(root, "nsb-farm-unsat", build_depends=UNMET)
    return {
        "nsbuild-greeting": dsc_of(root / "nsbuild-greeting-1.0"),
        "hello": fixture_dsc("hello_2.10-3"),
        "nsb-farm-fails": dsc_of(fails),
        "nsb-farm-unsat": dsc_of(unsat),
    }


Submitted = tuple[subprocess.CompletedProcess[str], Path]


@pytest.fixture(scope="module")
def submitted(farm: Farm, sources: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Submitted:  # fmt: skip
    out = tmp_path_factory.mktemp("farm-out")
    proc = farm.nsbuild("farm", "submit", *map(str, sources.values()), "--wait", "--out", str(out))
    return proc, out


def test_workers_register_with_their_environment_and_secrets(farm: Farm) -> None:
    builders = farm.get("builders?field=name")
    assert isinstance(builders, dict)
    assert [b["name"] for b in builders["builders"]] == ["bookworm-amd64"]
    assert (farm.master / "workers.json").stat().st_mode & 0o777 == 0o600
    passwords = set()
    for name in WORKERS:
        tac = farm.root / name / "buildbot.tac"
        assert tac.stat().st_mode & 0o777 == 0o600
        assert (farm.root / name / "info" / "nsbuild-envs").read_text().split() == [
            "bookworm/amd64"]
        line = next(ln for ln in tac.read_text().splitlines() if ln.startswith("passwd"))
        passwords.add(line)
    assert len(passwords) == 2


def test_four_builds_end_in_buildd_states(submitted: Submitted) -> None:
    proc, _ = submitted
    # Not all built: the command says so.
    assert proc.returncode == 1, proc.stderr
    rows = table_rows(proc.stdout)
    states = {p: r[2] for p, r in rows.items()}
    # apt's words follow the name ("... but it is not installable").
    assert states.pop("nsb-farm-unsat").startswith(f"dep-wait: {UNMET}")
    assert states == {"nsbuild-greeting": "built", "hello": "built", "nsb-farm-fails": "failed"}
    assert rows["hello"][0] == "2.10-3"
    assert {r[1] for r in rows.values()} <= set(WORKERS)
    assert "building on w" in proc.stderr


def test_buildbot_shows_the_states(farm: Farm, submitted: object) -> None:
    found = farm.get("builds?field=results&field=state_string&field=buildid&field=properties"
                     "&property=nsbuild_package&property=nsbuild_status&property=nsbuild_unmet"
                     "&property=nsbuild_results")
    assert isinstance(found, dict)
    by_package = {b["properties"]["nsbuild_package"][0]: b for b in found["builds"]
                  if "nsbuild_package" in b["properties"]}  # fmt: skip
    # Buildbot's own results: SUCCESS 0, WARNINGS 1, FAILURE 2.
    assert by_package["hello"]["results"] == 0
    assert by_package["nsb-farm-fails"]["results"] == 2
    unsat = by_package["nsb-farm-unsat"]
    assert unsat["results"] == 1
    assert unsat["state_string"].startswith(f"warnings dep-wait: {UNMET}")
    assert unsat["properties"]["nsbuild_status"][0] == "dep-wait"
    (unmet,) = unsat["properties"]["nsbuild_unmet"][0]
    assert unmet.startswith(UNMET)
    # Read from the summary's list, not from its message.
    import json

    results = farm.master / unsat["properties"]["nsbuild_results"][0]
    assert json.loads((results / "summary.json").read_text())["unmet"] == [unmet]


def test_the_sources_sent_through_the_master_are_removed_once_built(
    farm: Farm, submitted: Submitted
) -> None:
    assert submitted[0].returncode == 1
    # Other tests put files of their own there, by hand or without --wait:
    # none of the four `farm submit` staged (in folders of 16 hex digits) remains.
    staged = [p.name for p in (farm.master / "sources").glob("*/*.dsc")
              if re.fullmatch(r"[0-9a-f]{16}", p.parent.name)]  # fmt: skip
    four = ("hello_", "nsbuild-greeting_", "nsb-farm-fails_", "nsb-farm-unsat_")
    assert not [n for n in staged if n.startswith(four)]


def test_the_build_log_is_in_buildbot_and_the_files_are_fetched(
    farm: Farm, submitted: Submitted
) -> None:
    _, out = submitted
    for name in ("hello_2.10-3_amd64.deb", "hello_2.10-3_amd64.changes",
                 "hello_2.10-3_amd64.build", "nsbuild-greeting_1.0_amd64.deb",
                 "nsb-farm-fails_1.0_amd64.build", "nsb-farm-unsat_1.0_amd64.build"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(out.glob("nsb-farm-fails*.deb"))
    log = (out / "nsb-farm-fails_1.0_amd64.build").read_text()
    assert "this build fails on purpose" in log
    # The .build log, as nsbuild wrote it, is the step's log "build"; its
    # stdio has nsbuild's own lines, not the build's output again.
    builds = farm.get("builds?field=buildid&field=properties&property=nsbuild_package")
    assert isinstance(builds, dict)
    (hello,) = [b["buildid"] for b in builds["builds"]
                if b["properties"].get("nsbuild_package", [""])[0] == "hello"]  # fmt: skip
    steps = farm.get(f"builds/{hello}/steps?field=stepid&field=name")
    assert isinstance(steps, dict)
    (step,) = [s["stepid"] for s in steps["steps"] if s["name"] == "nsbuild build"]
    logs = farm.get(f"steps/{step}/logs?field=logid&field=name")
    assert isinstance(logs, dict)
    ids = {x["name"]: x["logid"] for x in logs["logs"]}
    build, stdio = (_raw(farm, ids[name]) for name in ("build", "stdio"))
    for phase in ("Prepare", "Install package build dependencies", "Build", "Summary"):
        assert f"| {phase} ".ljust(79) + "|" in build, phase
    # The whole log: Buildbot ends a line at a carriage return or a cursor
    # move, and cuts one longer than it takes (the list of package versions,
    # of which it loses a part), so its other lines, and its end whole.
    from buildbot.util.lineboundaries import LineBoundaryFinder

    delivered = (out / "hello_2.10-3_amd64.build").read_text()
    lines = LineBoundaryFinder.newline_re.sub("\n", delivered).splitlines()
    kept = set(build.splitlines())
    longest = LineBoundaryFinder.MAX_LINELENGTH
    assert [ln for ln in lines if len(ln) < longest and ln not in kept] == []
    assert build.endswith(delivered[delivered.index("| Summary "):])
    assert "[3/4] Build: dpkg-buildpackage" in stdio
    assert "dpkg-buildpackage: info: source package hello" in build
    assert "dpkg-buildpackage: info" not in stdio


def _raw(farm: Farm, logid: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{farm.url}api/v2/logs/{logid}/raw", timeout=30) as r:
        return r.read().decode()


@pytest.mark.parametrize("package", ["nsbuild-greeting", "hello"])
def test_the_farm_builds_the_same_deb_as_a_local_build(
    farm: Farm, sources: dict[str, Path], submitted: Submitted,
    package: str, tmp_path: Path,
) -> None:  # fmt: skip
    _, out = submitted
    local = farm.nsbuild("build", "--env", "bookworm", "--out", str(tmp_path),
                         str(sources[package]))  # fmt: skip
    assert local.returncode == 0, local.stderr
    debs = sorted(p.name for p in tmp_path.glob("*.deb"))
    assert debs
    for name in debs:
        assert _sha256(out / name) == _sha256(tmp_path / name), name


def test_a_list_of_packages_from_the_archive(farm: Farm, tmp_path: Path) -> None:
    listing = tmp_path / "rebuild.list"
    listing.write_text("# what to rebuild\nhello=2.10-3  # GNU hello\nnsbuild-no-such-source\n"
                       "pv=0.0-0\n")
    proc = farm.nsbuild("farm", "submit", "--from-archive", "bookworm", "--list", str(listing),
                        "--wait", "--out", str(tmp_path))  # fmt: skip
    # Not every package built.
    assert proc.returncode == 1, proc.stderr
    # A name or version the archive lacks is bad input (EXCEPTION), not a
    # failed build; no source, so no package name: the row is named as asked.
    rows = table_rows(proc.stdout)
    assert rows["nsbuild-no-such-source"][2] == "error"
    assert rows["pv=0.0-0"][2] == "error"
    builds = farm.get("builds?field=state_string&field=results")
    assert isinstance(builds, dict)
    said = {b["state_string"] for b in builds["builds"] if b["results"] == EXCEPTION}
    assert "exception no source package nsbuild-no-such-source in bookworm" in said, said
    assert "exception no source package pv=0.0-0 in bookworm" in said, said
    assert table_rows(proc.stdout)["hello"][:1] == ["2.10-3"]
    assert table_rows(proc.stdout)["hello"][2] == "built"
    assert (tmp_path / "hello_2.10-3_amd64.deb").is_file()


def test_status_when_idle(farm: Farm, submitted: object) -> None:
    proc = farm.nsbuild("farm", "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no builds queued or running"


def test_bad_input_is_one_line_and_exit_2(farm: Farm, tmp_path: Path) -> None:
    missing = farm.nsbuild("farm", "submit", str(tmp_path / "nope_1.0.dsc"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1
    assert "nope_1.0.dsc" in missing.stderr
    env = farm.nsbuild("farm", "submit", "--env", "sid", str(fixture_dsc("hello_2.10-3")))
    assert env.returncode == 2
    assert "bookworm-amd64" in env.stderr
    name = farm.nsbuild("farm", "worker", str(tmp_path / "w"), "--master",
                        f"127.0.0.1:{farm.pb_port}", "--name", "bad name")  # fmt: skip
    assert name.returncode == 2
    assert "bad worker name" in name.stderr
    assert not (tmp_path / "w").exists()
    (tmp_path / "empty").write_text("")
    no_range = {**farm.vars, "NSBUILD_SUBUID_FILE": str(tmp_path / "empty"),
                "NSBUILD_SUBGID_FILE": str(tmp_path / "empty")}  # fmt: skip
    ranges = farm.nsbuild("farm", "worker", str(tmp_path / "w"), "--master",
                          f"127.0.0.1:{farm.pb_port}", "--name", "w3", env=no_range)  # fmt: skip
    assert ranges.returncode == 2
    assert "a worker's builds need a subordinate id range" in ranges.stderr
    assert "usermod --add-subuids" in ranges.stderr
    assert not (tmp_path / "w").exists()
    ports = farm.nsbuild("farm", "master", str(farm.master), "--port-www", "1")
    assert ports.returncode == 2
    assert "to change them, make another" in ports.stderr
    archive = farm.nsbuild("farm", "submit", "--from-archive", "bookworm", "hello;rm")
    assert archive.returncode == 2
    assert "hello;rm" in archive.stderr
    listing = tmp_path / "bad.list"
    listing.write_text("hello\nhello world\n")
    bad = farm.nsbuild("farm", "submit", "--from-archive", "bookworm", "--list", str(listing))
    assert bad.returncode == 2
    assert f"{listing}:2: not a package name[=version]: 'hello world'" in bad.stderr
    # Nothing was submitted: the list is read whole first.
    assert farm.nsbuild("farm", "status").stdout.strip() == "no builds queued or running"


def test_a_builds_output_is_kept_bounded_on_the_master(farm: Farm, tmp_path: Path) -> None:
    """A source decides how much its build prints; the master keeps
    steps.LOG_LIMIT characters of its .build log, then says it cut."""
    from nsbuild.farm.steps import LOG_LIMIT

    loud = make_package(tmp_path, "nsb-farm-loud",
                        build=f"head -c {LOG_LIMIT + (8 << 20)} /dev/zero | tr '\\0' x "
                        "| fold -w 99")  # fmt: skip
    proc = farm.nsbuild("farm", "submit", str(dsc_of(loud)), "--wait", "--out",
                        str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    builds = farm.get("builds?field=buildid&field=properties&property=nsbuild_package")
    assert isinstance(builds, dict)
    buildid = max(b["buildid"] for b in builds["builds"]
                  if b["properties"].get("nsbuild_package", [""])[0] == "nsb-farm-loud")
    steps = farm.get(f"builds/{buildid}/steps?field=stepid&field=name")
    assert isinstance(steps, dict)
    (step,) = [s["stepid"] for s in steps["steps"] if s["name"] == "nsbuild build"]
    logs = farm.get(f"steps/{step}/logs")
    assert isinstance(logs, dict)
    (build,) = [x for x in logs["logs"] if x["name"] == "build"]
    lines = build["num_lines"]
    assert lines < LOG_LIMIT // 99
    # The note ends what the master kept of the .build log.
    tail = farm.get(f"logs/{build['logid']}/contents?offset={lines - 3}&limit=3")
    assert isinstance(tail, dict)
    assert "output cut here" in str(tail)
    # The stdio log has nsbuild's own lines only.
    (stdio,) = [x for x in logs["logs"] if x["name"] == "stdio"]
    assert stdio["num_lines"] < 1000


def test_a_dsc_whose_files_the_master_lacks_is_an_error(farm: Farm, tmp_path: Path) -> None:
    """Bad input (EXCEPTION, buildd's error), not a package that failed."""
    import json

    from nsbuild.farm import submit
    from nsbuild.farm.rest import Rest

    staged = farm.master / "sources" / "lacking"
    staged.mkdir(parents=True)
    shutil.copy(fixture_dsc("hello_2.10-3"), staged)
    password = json.loads((farm.master / "nsbuild-master.json").read_text())["password"]
    rest = Rest(farm.url, "nsbuild", password)
    job = submit.Submitted("hello", "bookworm-amd64", rest.force(
        "build", "bookworm-amd64", dsc="sources/lacking/hello_2.10-3.dsc"))
    submit.wait(rest, [job], lambda _: None)
    assert submit.status_of(job) == "error"


def test_a_package_of_a_long_name_builds_and_is_fetched(farm: Farm, tmp_path: Path) -> None:
    """Buildbot refuses a step name over 50 characters: the download and
    upload steps of its files, named after them, must still fit."""
    name = "nsb-farm-a-source-package-whose-name-is-long"
    tree = make_package(tmp_path, name)
    proc = farm.nsbuild("farm", "submit", str(dsc_of(tree)), "--wait", "--out",
                        str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert table_rows(proc.stdout)[name][2] == "built"
    fetched = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert f"{name}_1.0_amd64.network.jsonl" in fetched
    assert [n for n in fetched if n.endswith(".deb")], fetched


def test_the_network_log_is_attached_to_the_build(farm: Farm, submitted: Submitted) -> None:
    import json

    found = farm.get("builds?field=buildid&field=properties&property=nsbuild_package")
    assert isinstance(found, dict)
    (hello,) = [b["buildid"] for b in found["builds"]
                if b["properties"].get("nsbuild_package", [""])[0] == "hello"][:1]  # fmt: skip
    steps = farm.get(f"builds/{hello}/steps?field=stepid&field=name")
    assert isinstance(steps, dict)
    (check,) = [s["stepid"] for s in steps["steps"] if s["name"] == "check uploads"]
    logs = farm.get(f"steps/{check}/logs")
    assert isinstance(logs, dict)
    (net,) = [x for x in logs["logs"] if x["name"] == "network"]
    text = farm.get(f"logs/{net['logid']}/contents")
    assert isinstance(text, dict)
    content = "".join(c["content"] for c in text["logchunks"])
    props = farm.get(f"builds/{hello}/properties")
    assert isinstance(props, dict)
    results = farm.master / props["properties"][0]["nsbuild_results"][0]
    (uploaded,) = results.glob("hello_*.network.jsonl")
    # The network log as uploaded and checked: a JSON record a line.
    assert content == uploaded.read_text()
    assert all(json.loads(ln) for ln in content.splitlines())
