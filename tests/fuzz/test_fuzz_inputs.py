"""Fuzzed input (hypothesis): every parser of untrusted or hand-written input
either accepts it or raises its documented one-line error; never a traceback,
never a write outside its target.

Targets: chroot.d deb822 files, the tarball safety checks, .dsc files and the
.changes a build leaves, the egress proxy's HTTP heads, and option parsing.
Examples are derived from the test's name (derandomize), so a CI failure
replays exactly; hypothesis prints the failing input."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nsbuild.envs.config import FIELDS, parse_dir
from nsbuild.envs.errors import ConfigError, UnsafeTarball
from nsbuild.envs.tarcheck import sanitize
from nsbuild.errors import NsbuildError

FUZZ = settings(max_examples=int(os.environ.get("NSBUILD_FUZZ_EXAMPLES", "1000")),
                deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def one_line(e: BaseException) -> None:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)


# ------------------------------------------------------------- chroot.d (deb822)

_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_field_line = st.builds(lambda k, sep, v: f"{k}{sep}{v}",
                        st.sampled_from([*FIELDS, *(f.lower() for f in FIELDS), "Unknown",
                                         "Name ", " Name", "#Name", "Path"]),
                        st.sampled_from([": ", ":", " : ", "::", ""]),
                        st.one_of(_values, st.sampled_from(
                            ["bookworm", "/srv/x.tar", "~/x.tar", "relative.tar",
                             "http://deb.debian.org/debian", "ftp://x", "/a:/b:ro, /c",
                             "/a:../b", "a b c", "tarball", "host", "directory", "weird"])))
_deb822 = st.lists(st.one_of(_field_line, st.sampled_from(["", " continued", "\t.", "# c"]),
                             _values), max_size=14).map("\n".join)


@FUZZ
@given(text=_deb822)
@example(text="Name: a\nPath: /x.tar\n\nName: a\nPath: /y.tar\n")
@example(text="Name: a\nName: b\n")
@example(text=" leading continuation\nName: a\n")
def test_chroot_d_parsing(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "env").write_text(text, encoding="utf-8")
        try:
            envs = parse_dir(Path(d))
        except ConfigError as e:
            one_line(e)
            assert str(e).startswith(f"{d}/env"), str(e)  # names the file
            return
    for env in envs:
        assert env.name
        assert env.path is None or env.path.is_absolute()
        for b in env.bind_mounts:
            assert b.dst.startswith("/") and ".." not in b.dst.split("/")


@FUZZ
@given(raw=st.binary(max_size=300))
def test_chroot_d_parsing_of_arbitrary_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "env").write_bytes(raw)
        with contextlib.suppress(ConfigError):
            parse_dir(Path(d))


# ---------------------------------------------------------------- tarballs

_names = st.one_of(
    st.sampled_from(["a", "a/b", "./a", "a/../b", "../x", "/etc/passwd", "link/x", "link",
                     "dir/", "dir/f", "", ".", "a//b", "dir/../../x", "link/../x", "x\\..\\y"]),
    st.text(alphabet="ab./", min_size=1, max_size=12),
)
_member = st.tuples(
    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                     tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.CONTTYPE]),
    _names,
    st.one_of(_names, st.sampled_from(["/", "/etc", "..", "../..", "a"])),
    st.binary(max_size=20),
    st.dictionaries(st.sampled_from(["path", "linkpath", "uname", "SCHILY.xattr.user.x",
                                     "SCHILY.xattr.security.capability",
                                     "SCHILY.xattr.trusted.overlay.opaque"]),
                    st.sampled_from(["../../etc/x", "/abs", "y", "root"]), max_size=2),
)


def _tar(members: list[tuple[int, str, str, bytes, dict[str, str]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, link, data, pax in members:
            info = tarfile.TarInfo(name or "x")
            info.type = kind
            info.linkname = link if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.pax_headers = dict(pax)
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _check_output_is_safe(stream: bytes) -> None:
    """An independent reading of what sanitize() passed on: every name stays in
    the target, never goes through a symlink, hard links name earlier members."""
    links: set[str] = set()
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r|") as tar:
        for m in tar:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            assert not m.name.startswith("/") and ".." not in parts, m.name
            assert not m.ischr() and not m.isblk(), m.name
            name = "/".join(parts)
            for i in range(1, len(parts)):
                assert "/".join(parts[:i]) not in links, f"{m.name} goes through a symlink"
            if m.islnk():
                assert m.linkname in seen, f"hard link {m.name} -> {m.linkname}"
            # A hard link to a symlink is extracted as a symlink.
            if m.issym() or (m.islnk() and m.linkname in links):
                links.add(name)
            assert not any(k.startswith("SCHILY.xattr.") and
                           k != "SCHILY.xattr.security.capability" for k in m.pax_headers)
            assert m.pax_headers.get("path", m.name) == m.name
            assert m.pax_headers.get("linkpath", m.linkname) == m.linkname
            seen.add(name)


_LINK_TO_SYMLINK = [(tarfile.SYMTYPE, "s", "etc", b"", {}), (tarfile.LNKTYPE, "h", "s", b"", {}),
                    (tarfile.REGTYPE, "h/x", "", b"x", {})]


def test_the_recheck_knows_a_hard_link_to_a_symlink() -> None:
    # The independent reading must itself catch a write through such a link.
    with pytest.raises(AssertionError, match="h/x goes through a symlink"):
        _check_output_is_safe(_tar(_LINK_TO_SYMLINK))


@FUZZ
@given(members=st.lists(_member, max_size=8))
@example(members=_LINK_TO_SYMLINK)
def test_tarball_checks(members: list[tuple[int, str, str, bytes, dict[str, str]]]) -> None:
    try:
        raw = _tar(members)
    except (ValueError, tarfile.TarError, UnicodeError):
        assume(False)
    out = io.BytesIO()
    try:
        sanitize(io.BytesIO(raw), out, "fuzz.tar")
    except UnsafeTarball as e:
        one_line(e)
        return
    _check_output_is_safe(out.getvalue())


@FUZZ
@given(raw=st.binary(max_size=2048), cut=st.integers(0, 4096))
def test_tarball_checks_on_corrupt_streams(raw: bytes, cut: int) -> None:
    good = _tar([(tarfile.REGTYPE, "a", "", b"data", {}), (tarfile.SYMTYPE, "l", "/", b"", {})])
    for stream in (raw, good[:cut] + raw, good[:cut]):
        out = io.BytesIO()
        try:
            sanitize(io.BytesIO(stream), out, "fuzz.tar")
        except UnsafeTarball as e:
            one_line(e)
            continue
        _check_output_is_safe(out.getvalue())


# ------------------------------------------------------------ .dsc and .changes

_dsc_field = st.sampled_from(["Format", "Source", "Version", "Architecture", "Binary",
                              "Files", "Checksums-Sha256", "Checksums-Sha1", "Build-Depends",
                              "Hash"])
_dsc_value = st.one_of(
    _values,
    st.sampled_from(["3.0 (native)", "hello", "2.10-3", "1:2.0", "any all",
                     "\n d41d8cd98f00b204e9800998ecf8427e 0 empty.tar.xz",
                     "\n e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 0 "
                     "empty.tar.xz", "\n x 1 ../../etc/passwd", "\n x y z", "\n a b",
                     "\n x 0 .hidden", "\n x 0 a/b"]),
)
_dsc = st.one_of(
    st.lists(st.builds(lambda k, v: f"{k}: {v}", _dsc_field, _dsc_value), max_size=10)
    .map("\n".join),
    st.builds(lambda body: f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{body}\n"
              "-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----\n",
              st.lists(st.builds(lambda k, v: f"{k}: {v}", _dsc_field, _dsc_value),
                       max_size=6).map("\n".join)),
    _values,
)


@FUZZ
@given(text=_dsc)
@example(text="Format: 3.0 (native)\nSource: a\nVersion: 1\nFiles:\n x 1 ../../etc/passwd\n")
def test_dsc_parsing(text: str) -> None:
    from nsbuild.debbuild.dsc import load_dsc
    from nsbuild.debbuild.errors import BuildInputError

    with tempfile.TemporaryDirectory() as d:
        Path(d, "empty.tar.xz").write_bytes(b"")
        path = Path(d, "p.dsc")
        path.write_text(text, encoding="utf-8")
        try:
            pkg = load_dsc(path)
        except BuildInputError as e:
            one_line(e)
            return
        for f in pkg.files:
            assert "/" not in f.name and not f.name.startswith(".")
            assert (Path(d) / f.name).is_file()


_changes_files_field = st.lists(
    st.one_of(st.sampled_from(["d41d8cd98f00b204e9800998ecf8427e 0 misc optional a.deb",
                               "abc", "a b c d e", "1 2", "x y z w ../../etc/passwd"]),
              _values),
    max_size=4,
).map(lambda lines: "\n".join(f" {ln}" for ln in lines))


@FUZZ
@given(files=_changes_files_field, sums=_changes_files_field)
@example(files=" abc", sums="")
def test_changes_left_by_a_build(files: str, sums: str) -> None:
    from nsbuild.debbuild.collect import changes_files

    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "p.changes")
        path.write_text(f"Format: 1.8\nSource: p\nFiles:\n{files}\nChecksums-Sha256:\n{sums}\n",
                        encoding="utf-8")
        try:
            for name, size, _sha in changes_files(path):
                assert isinstance(name, str) and isinstance(size, int)
        except NsbuildError as e:
            one_line(e)


# ------------------------------------------------------------- HTTP heads

_methods = st.sampled_from(["GET", "POST", "CONNECT", "HEAD", "G ET", "", "get", "GET\t"])
_targets = st.one_of(
    st.sampled_from(["http://127.0.0.1:8080/x", "http://a.example/", "HTTP://A.EXAMPLE:80",
                     "127.0.0.1:443", "[::1]:80", "http://[::ffff:127.0.0.1]/",
                     "http://u@h/", "http://h%2e/", "http://h\\x/", "/origin", "*",
                     "http://2130706433/", "http://0x7f.1/", "http://h:99999/",
                     "http://h:-1/", "http://[::1/", "https://h/", "http:///x"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=30),
)
_headers = st.lists(st.one_of(
    st.sampled_from(["Host: other:1", "Content-Length: 5", "Content-Length: 1",
                     "Content-Length: -1", "Content-Length: 99999999999999999",
                     "Transfer-Encoding: chunked", " folded", "X:\x00", "Connection: X-A",
                     "X-A: 1", "Proxy-Connection: keep-alive", "bad header", ": empty"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=20)),
    max_size=5)


@FUZZ
@given(method=_methods, target=_targets,
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1", ""]),
       headers=_headers, sep=st.sampled_from(["\r\n", "\n", "\r"]))
def test_proxy_request_heads(method: str, target: str, version: str, headers: list[str],
                             sep: str) -> None:
    from nsbuild.net.httphead import BadRequest, parse_request, upstream_head

    head = sep.join([f"{method} {target} {version}", *headers]).encode("latin-1", "replace")
    try:
        # What the proxy's stream reads: up to the first blank line.
        req = parse_request(head.split(b"\r\n\r\n", 1)[0])
    except BadRequest as e:
        one_line(e)
        assert 400 <= e.status < 600
        return
    # What goes upstream is one clean request: origin-form, our Host, no injected line.
    up = upstream_head(req).decode("latin-1")
    lines = up.split("\r\n")
    assert up.endswith("\r\n\r\n") and "\n" not in up.replace("\r\n", "")
    if not req.is_connect:
        assert lines[0] == f"{req.method} {req.path} HTTP/1.1" and req.path.startswith("/")
        assert " " not in req.path
    hosts = [ln for ln in lines if ln.lower().startswith("host:")]
    assert len(hosts) == 1 and req.host_text in hosts[0]
    assert not any(ln.lower().startswith(("transfer-encoding:", "proxy-connection:"))
                   for ln in lines)
    assert 0 < req.port < 65536


@FUZZ
@given(raw=st.binary(max_size=400))
def test_proxy_heads_from_raw_bytes(raw: bytes) -> None:
    from nsbuild.net.httphead import BadRequest, parse_request, response_head

    for parse in (parse_request, response_head):
        try:
            parse(raw.split(b"\r\n\r\n", 1)[0])
        except BadRequest as e:
            one_line(e)


# ---------------------------------------------------------- option parsing

_option = st.sampled_from(
    ["--bind", "--ro-bind", "--tmpfs", "--chdir", "--hostname", "--setenv", "--unsetenv",
     "--clearenv", "--user", "--net", "--allow", "--allow-from-env", "--egress-engine",
     "--net-log", "--root", "--env", "--debug", "--bogus", "-x", "--net=", "--allow="])
_option_value = st.one_of(
    st.sampled_from(["none", "allow", "host", "proxy", "nftables", "", ":", "a=b", "=b", "A",
                     "*.example.org", "127.0.0.1:99999", "[::1]", "host:0", "/nonexistent/x",
                     "a:b:c", "2130706433", "bad host", "*", "example.org:http"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
            max_size=12),
)


_FLAGS = ("--clearenv", "--allow-from-env", "--debug", "--bogus", "-x")


def _render(pairs: list[tuple[str, str, bool]]) -> list[str]:
    """Options with their values (flags alone, so no value is left to become a command)."""
    out: list[str] = []
    for option, value, joined in pairs:
        if option in _FLAGS:
            out.append(option)
        elif option.endswith("="):
            out.append(option + value)
        else:
            out += [f"{option}={value}"] if joined else [option, value]
    return out


@FUZZ
@given(pairs=st.lists(st.tuples(_option, _option_value, st.booleans()), max_size=6))
def test_run_options_never_run_anything_and_fail_in_one_line(
    pairs: list[tuple[str, str, bool]]
) -> None:
    """`nsbuild run OPTIONS` without a command: a one-line usage error (exit 2)."""
    from nsbuild.cli.main import main

    args = _render(pairs)
    # A value that is itself an option's name shifts the pairing: what is left
    # over would be a command, and this test runs none.
    assume(not any(v.startswith("-") for _, v, _ in pairs))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(["run", *args])
        except SystemExit as e:
            status = int(e.code or 0)
    err = stderr.getvalue()
    assert status == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsbuild"), err
    assert "Traceback" not in err


@FUZZ
@given(net=st.one_of(st.none(), _option_value), allow=st.lists(_option_value, max_size=3),
       from_env=st.booleans(), engine=st.one_of(st.none(), _option_value),
       log=st.one_of(st.none(), _option_value))
def test_network_options(net: str | None, allow: list[str], from_env: bool, engine: str | None,
                         log: str | None) -> None:
    import argparse

    from nsbuild.net import NetError, options_from_args

    args = argparse.Namespace(net=net, allow=allow, allow_from_env=from_env,
                              egress_engine=engine, net_log=log)
    try:
        opts = options_from_args(args)
    except NetError as e:
        one_line(e)
        return
    assert opts.mode in ("none", "allow", "host")


@FUZZ
@given(text=st.one_of(_option_value, st.from_regex(r"\A[0-9.]{1,6}[kKmMgGtT]?(i?[bB])?\Z")))
def test_limit_values(text: str) -> None:
    from nsbuild.sandbox import limits

    for parse in (limits.parse_size, limits.parse_pids):
        try:
            assert parse(text) >= 1
        except limits.LimitError as e:
            one_line(e)

