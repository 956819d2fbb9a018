"""`nsbuild build DIR`: a source package made from an unpacked tree, in a sandbox.

dpkg-source honours the tree's own configuration (debian/source/options, its
format, a VCS's config and hooks for `3.0 (git)`): a tree can make it run
programs, so it never runs on the host. What it leaves is taken in as a
source package only once load_dsc has checked it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import typing
from pathlib import Path

from nsbuild.debbuild.dsc import (
    CHUNK,
    MAX_CHANGELOG_HEAD,
    SOURCE_RE,
    VERSION_RE,
    SourcePackage,
    load_dsc,
    open_read,
)
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.printable import printable

# Inside the sandbox that makes a source package.
_TREES, _OUT, _ORIGS = "/src", "/out", "/orig"
_CHANGELOG_RE = re.compile(r"^(\S+) \(([^() \t]+)\)")


def source_from_tree(tree: str | os.PathLike[str], workdir: Path) -> SourcePackage:
    """Make a source package from an unpacked tree with debian/, in `workdir`.

    dpkg-source honours the tree's own configuration (debian/source/options, its
    format, a VCS's config and hooks for `3.0 (git)`), so it runs in a sandbox:
    the host's tools read-only, no network, no home of the user's, the tree as
    the lower layer of a throw-away overlay (patches may be applied; the tree
    itself is never written), and only `workdir` writable. What it leaves there
    is taken in only as the .dsc and the regular files it lists."""
    # Named through a link (a user's shortcut): the tree it leads to, whose
    # folder holds the upstream tarballs; links inside it stay links.
    tree = Path(tree).resolve()
    if not (tree / "debian" / "control").is_file():
        raise BuildInputError(f"{tree}: not a source tree (no debian/control or debian/changelog)")
    source, version = _changelog_head(tree / "debian" / "changelog")
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
    # The user's own neighbouring files, which dpkg-source looks for in its
    # current directory (names checked above: no glob or path characters).
    origs = sorted(
        p for p in tree.parent.glob(f"{source}_{upstream}.orig*.tar.*") if p.is_file()
    )
    for orig in origs:
        _check_owner(orig, tree)
    err = _run_dpkg_source(tree, workdir, origs)
    if err is not None:
        raise BuildInputError(f"{tree}: dpkg-source -b failed: {err}")
    dsc = workdir / f"{source}_{version.split(':', 1)[-1]}.dsc"
    return _take_in(tree, dsc, origs)


def _check_owner(orig: Path, tree: Path) -> None:
    """An upstream tarball beside the tree becomes the package's upstream
    source (files the tree lacks included: dpkg-source ignores deletions).
    The tree's folder may be shared (/tmp): only a tarball of the caller,
    of the tree's owner or of root is taken, and a link to one only if the
    link is theirs too."""
    trusted = {os.getuid(), tree.stat().st_uid, 0}
    for st in (orig.lstat(), orig.stat()):
        if st.st_uid not in trusted:
            raise BuildInputError(
                f"{orig}: owned by uid {st.st_uid}, not by you or the owner of {tree}: "
                "not taken as the upstream tarball (move it away, or build a .dsc)"
            )


def _changelog_head(changelog: Path) -> tuple[str, str]:
    """Source and version of the newest entry, read without following a link
    and without running a parser of the tree's choosing."""
    try:
        fd = os.open(changelog, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = "a symbolic link (not followed)" if e.errno == errno.ELOOP else e.strerror
        raise BuildInputError(f"{changelog}: cannot read: {why}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BuildInputError(f"{changelog}: not a regular file")
        head = f.read(MAX_CHANGELOG_HEAD).decode("utf-8", "replace")
    first = next((line for line in head.splitlines() if line.strip()), "")
    m = _CHANGELOG_RE.match(first)
    if not m or not SOURCE_RE.match(m.group(1)) or not VERSION_RE.match(m.group(2)):
        raise BuildInputError(
            f"{changelog}: cannot parse the newest entry: {printable(first, 80)}"
        )
    return m.group(1), m.group(2)


def _run_dpkg_source(tree: Path, workdir: Path, origs: list[Path]) -> str | None:
    """Run `dpkg-source -b` on `tree` in a sandbox writing to `workdir`; None on
    success, else the last line it printed (escaped)."""
    from nsbuild.envs.owner import give_to_sandbox_root
    from nsbuild.sandbox import PIPE, Bind, Overlay, Sandbox, Tmpfs, caller_idmap, host_view, spawn

    inside = f"{_TREES}/{tree.name}"
    for orig in origs:
        os.symlink(f"{_ORIGS}/{orig.name}", workdir / orig.name)
    # Run by root, the sandbox's root is its first subordinate id, which may
    # not write a folder host root made.
    give_to_sandbox_root(workdir)
    spec = Sandbox(
        argv=("dpkg-source", "-b", inside),
        idmap=caller_idmap(),
        root=Tmpfs("/"),
        mounts=(
            *host_view(),
            # dpkg-source unpacks the orig beside the tree to compare them.
            Tmpfs(_TREES),
            Overlay(lowers=(str(tree),), upper="", work="", dst=inside, tmpfs_size="50%"),
            # Not private: the sandbox cannot make setuid files here.
            Bind(str(workdir), _OUT),
            *(Bind(str(o), f"{_ORIGS}/{o.name}", readonly=True) for o in origs),
        ),
        cwd=_OUT,
        # Nothing of the user's environment or home: git and dpkg read their
        # configuration from HOME and XDG_CONFIG_HOME.
        env=(
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            ("HOME", "/tmp"),
            ("TMPDIR", "/tmp"),
            ("LANG", "C.UTF-8"),
        ),
    )
    with open(os.devnull, "wb") as null:
        proc = spawn(spec, stdout=null.fileno(), stderr=PIPE)
    assert proc.stderr is not None
    try:
        tail = _tail(proc.stderr)
        status = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stderr.close()
    if proc.exec_error:
        return f"{printable(proc.exec_error)} (is dpkg-dev installed?)"
    if status == 0:
        return None
    lines = tail.decode("utf-8", "replace").strip().splitlines()
    return printable(lines[-1]) if lines else f"exit status {status}"


def _tail(stream: typing.IO[bytes], keep: int = 4096) -> bytes:
    """The last `keep` bytes of `stream`, read to its end (a flood costs nothing)."""
    tail = b""
    while chunk := stream.read(65536):
        tail = (tail + chunk)[-keep:]
    return tail


def _take_in(tree: Path, dsc: Path, origs: list[Path]) -> SourcePackage:
    """The source package the sandbox left in dsc's directory, checked before any
    of it is read: regular files of one name each (load_dsc bounds the .dsc's
    size), and nothing but the .dsc and the files it lists (their sizes and checksums
    verified by load_dsc). The orig tarballs are copied afresh from the user's
    own: a copy, not a link, since the folder beside the tree may be shared, and
    the build copies in what load_dsc checked."""
    workdir = dsc.parent
    for orig in origs:
        # Whatever stands under the name now, the sandbox may have made it.
        try:
            (workdir / orig.name).unlink(missing_ok=True)
        except OSError:
            raise BuildInputError(
                f"{tree}: dpkg-source -b left {orig.name}, not a plain file"
            ) from None
        try:
            with open_read(orig) as src, (workdir / orig.name).open("xb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        except OSError as e:
            raise BuildInputError(f"{orig}: cannot copy: {e.strerror}") from None
    for entry in os.scandir(workdir):
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise BuildInputError(
                f"{tree}: dpkg-source -b left {printable(entry.name)}, not a plain file"
            )
    if not dsc.is_file():
        raise BuildInputError(f"{tree}: dpkg-source -b made no {dsc.name}")
    pkg = load_dsc(dsc)
    listed = {dsc.name, *(f.name for f in pkg.files)}
    extra = sorted(set(os.listdir(workdir)) - listed)
    if extra:
        raise BuildInputError(
            f"{tree}: dpkg-source -b left {printable(extra[0])}, which {dsc.name} does not list"
        )
    return pkg
