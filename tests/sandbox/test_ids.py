"""User namespace: ids inside, the subordinate range, --user, the fallback."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from sandbox_helpers import (
    SETUP_FAILED,
    USAGE,
    SubRange,
    explain,
    nonblank_lines,
    nsbuild,
    ok,
    one_line_error,
    parse_idmap,
    sh,
)

pytestmark = pytest.mark.userns


def test_caller_is_uid_and_gid_0_inside(tmp_path: Path) -> None:
    r = ok(nsbuild("--", *sh("id -u; id -g; id -un"), cwd=tmp_path))
    assert r.stdout.split() == ["0", "0", "root"]
    assert r.stderr == ""


def mapped_count(text: str) -> int:
    """How many ids a uid_map/gid_map maps, whatever namespace level it is read at."""
    return sum(count for _, _, count in parse_idmap(text))


@pytest.mark.parametrize("inside", [1, 100, 1000, 65534, 65535])
def test_full_range_is_mapped_onto_subordinate_ids(
    tmp_path: Path, scratch: Path, subids: tuple[SubRange, SubRange], inside: int
) -> None:
    # uid n inside (1..65535) is the (n-1)th subordinate id on the host.
    subuid, subgid = subids
    ok(nsbuild("--bind", f"{scratch}:/out", "--", "setpriv", f"--reuid={inside}",
               f"--regid={inside}", "--clear-groups", "touch", "/out/f", cwd=tmp_path))
    st = os.stat(scratch / "f")
    assert (st.st_uid, st.st_gid) == (subuid.start + inside - 1, subgid.start + inside - 1)


def test_65536_ids_are_mapped(tmp_path: Path, subids: tuple[SubRange, SubRange]) -> None:
    r = ok(nsbuild("--", *sh("cat /proc/self/uid_map; echo --; cat /proc/self/gid_map"),
                   cwd=tmp_path))
    uid_map, gid_map = r.stdout.split("--")
    assert (mapped_count(uid_map), mapped_count(gid_map)) == (65536, 65536), r.stdout


def test_setpriv_to_uid_100_writes_files_owned_by_a_subordinate_uid(
    tmp_path: Path, scratch: Path, subids: tuple[SubRange, SubRange]
) -> None:
    subuid, subgid = subids
    r = ok(nsbuild(
        "--bind", f"{scratch}:/out", "--",
        *sh("setpriv --reuid 100 --regid 100 --clear-groups touch /out/f && stat -c %u:%g /out/f"),
        cwd=tmp_path,
    ))
    assert r.stdout.strip() == "100:100"
    st = os.stat(scratch / "f")
    assert (st.st_uid, st.st_gid) == (subuid.start + 99, subgid.start + 99)
    assert st.st_uid in subuid and st.st_gid in subgid


def test_files_made_by_root_inside_belong_to_the_caller(tmp_path: Path) -> None:
    ok(nsbuild("--", "touch", "made-inside", cwd=tmp_path))
    st = os.stat(tmp_path / "made-inside")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_host_root_files_appear_as_nobody(tmp_path: Path) -> None:
    # /usr belongs to host root, which is not mapped: the overflow id shows.
    r = ok(nsbuild("--", "stat", "-c", "%u:%g", "/usr", cwd=tmp_path))
    assert r.stdout.strip() == "65534:65534"


def test_user_by_name_is_resolved_against_etc_passwd(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    r = ok(nsbuild("--chdir", "/", "--user", "nobody", "--", *sh("id -u; id -g"), cwd=tmp_path))
    assert r.stdout.split() == [str(nobody.pw_uid), str(nobody.pw_gid)]


def test_user_by_uid_and_gid(tmp_path: Path) -> None:
    r = ok(nsbuild("--chdir", "/", "--user", "1234:2345", "--", *sh("id -u; id -g; id -G"),
                   cwd=tmp_path))
    assert r.stdout.split() == ["1234", "2345", "2345"]


def test_user_by_uid_only(tmp_path: Path) -> None:
    r = ok(nsbuild("--chdir", "/", "--user", "4321", "--", "id", "-u", cwd=tmp_path))
    assert r.stdout.strip() == "4321"


def test_unknown_user_is_one_clear_line(tmp_path: Path) -> None:
    r = nsbuild("--user", "no-such-user-nsbuild", "--", "true", cwd=tmp_path)
    assert r.returncode in (USAGE, SETUP_FAILED), explain(r)
    assert "no-such-user-nsbuild" in one_line_error(r)


def test_user_who_cannot_enter_the_working_directory_gets_one_line(tmp_path: Path) -> None:
    # tmp_path's parents are private to the caller: uid 1234 inside may not enter.
    r = nsbuild("--user", "1234:1234", "--", "true", cwd=tmp_path)
    assert r.returncode == SETUP_FAILED, explain(r)
    assert str(tmp_path) in one_line_error(r)


def _empty_subid_env(tmp_path: Path, content: str) -> dict[str, str]:
    f = tmp_path / "subid"
    f.write_text(content)
    return {**os.environ, "NSBUILD_SUBUID_FILE": str(f), "NSBUILD_SUBGID_FILE": str(f)}


@pytest.mark.parametrize(
    "content", ["", "someone-else:100000:65536\n"], ids=["empty", "other-user-only"]
)
def test_without_subordinate_range_one_id_is_mapped_with_one_warning(
    tmp_path: Path, content: str
) -> None:
    env = _empty_subid_env(tmp_path, content)
    r = ok(nsbuild("--", *sh("id -u; cat /proc/self/uid_map; touch made-inside"),
                   cwd=tmp_path, env=env))
    out = r.stdout.splitlines()
    assert out[0] == "0"
    assert mapped_count("\n".join(out[1:])) == 1, r.stdout
    st = os.stat(tmp_path / "made-inside")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    lines = nonblank_lines(r.stderr)
    assert len(lines) == 1, explain(r)
    assert "warning" in lines[0] and "subuid" in lines[0], lines[0]
    # It says how to add a range.
    assert "usermod" in lines[0], lines[0]


def test_without_subordinate_range_changing_uid_fails(tmp_path: Path) -> None:
    env = _empty_subid_env(tmp_path, "")
    r = nsbuild("--", "setpriv", "--reuid", "100", "--regid", "100", "--clear-groups", "true",
                cwd=tmp_path, env=env)
    assert r.returncode != 0, explain(r)


def test_subordinate_range_given_by_numeric_uid_is_used(
    tmp_path: Path, scratch: Path, subids: tuple[SubRange, SubRange]
) -> None:
    subuid, subgid = subids
    uidf, gidf = tmp_path / "subuid", tmp_path / "subgid"
    uidf.write_text(f"{os.getuid()}:{subuid.start}:{subuid.count}\n")
    gidf.write_text(f"{os.getuid()}:{subgid.start}:{subgid.count}\n")
    env = {**os.environ, "NSBUILD_SUBUID_FILE": str(uidf), "NSBUILD_SUBGID_FILE": str(gidf)}
    r = ok(nsbuild("--bind", f"{scratch}:/out", "--", "setpriv", "--reuid=100", "--regid=100",
                   "--clear-groups", "touch", "/out/f", cwd=tmp_path, env=env))
    assert r.stderr == ""
    st = os.stat(scratch / "f")
    assert (st.st_uid, st.st_gid) == (subuid.start + 99, subgid.start + 99)
