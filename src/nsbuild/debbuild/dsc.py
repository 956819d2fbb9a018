"""Reading and checking a source package before anything else happens.

Everything here runs on the host and never executes the package's code: the
.dsc is parsed with python-debian (imported lazily, so `nsbuild run` never pays
for it), every file it lists is checked for presence, size and checksum, and the
changelog is read straight out of the debian tarball to learn the target
distribution. What a .dsc brings is the package author's, in a folder they may
control: each listed file is opened once and hashed from that descriptor (and,
given a private folder, copied there while hashing, so that the build copies in
what was checked), and the tarball or diff is read with bounds on its headers,
its members and the bytes it decompresses to.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import os
import re
import stat
import tarfile
import typing
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nsbuild.debbuild.errors import BuildInputError
from nsbuild.envs.tarcheck import _EXTENDED, _BoundedTarInfo, _Budget
from nsbuild.printable import printable

# Policy 5.6.1 / 5.6.12: names and versions as dpkg accepts them.
SOURCE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
VERSION_RE = re.compile(r"^(?:[0-9]+:)?[0-9][A-Za-z0-9.+~:-]*$")
# A .dsc is a few KiB (a large Package-List stays well under a MiB).
_MAX_DSC = 4 << 20
_MAX_LISTED = 8 << 30  # one file a .dsc lists (the largest Debian sources are far smaller)
# Listed files are read, hashed and copied in pieces of this size.
CHUNK = 1 << 20
_HASHES = (("Checksums-Sha256", "sha256"), ("Checksums-Sha1", "sha1"), ("Files", "md5"))


@dataclass(frozen=True)
class SourceFile:
    name: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class SourcePackage:
    """A checked source package: the .dsc and the files it lists, all present."""

    dsc: Path
    source: str
    version: str
    format: str
    architecture: tuple[str, ...]
    binaries: tuple[str, ...]
    files: tuple[SourceFile, ...]
    # Raw relationship fields, exactly as the .dsc spells them ("" when absent).
    build_depends: str
    build_depends_arch: str
    build_depends_indep: str
    build_conflicts: str
    build_conflicts_arch: str
    build_conflicts_indep: str
    # The private folder holding what was checked (the .dsc's bytes as parsed,
    # each listed file as hashed), when load_dsc was given one.
    kept: Path | None = None

    @property
    def upstream_less_epoch(self) -> str:
        """The version as it appears in file names: no epoch."""
        return self.version.split(":", 1)[1] if ":" in self.version else self.version

    @property
    def directory(self) -> Path:
        return self.dsc.parent

    def paths(self) -> tuple[Path, ...]:
        """The .dsc first, then every file it lists: the private copies of what
        was checked when there are some (the originals may have changed since),
        else the files next to the .dsc."""
        folder = self.kept or self.directory
        return (folder / self.dsc.name, *(folder / f.name for f in self.files))

    def distribution(self) -> str | None:
        """The distribution of the newest changelog entry, read from the tarball
        (or diff) that carries debian/ without unpacking anything; None when it
        has no debian/changelog. Raises BuildInputError when that file cannot be
        read within bounds.

        The .dsc has no distribution field (only a .changes has one), so this
        is the one thing read from inside the package on the host; it is only
        asked for when the user names no environment."""
        text = _changelog_text(self)
        if text is None:
            return None
        m = re.match(r"^\S+ \([^)]*\) ([^;]+);", text.lstrip())
        return m.group(1).split()[0] if m else None


def load_dsc(path: str | os.PathLike[str], keep: Path | None = None) -> SourcePackage:
    """Parse and verify `path`. Raises BuildInputError naming the first problem.

    With `keep` (an empty folder only the caller can write), the .dsc as parsed
    and each listed file as hashed are copied there, and paths() names those
    copies: the folder of the .dsc may belong to the package's author, who can
    swap a file (for a link to the user's home, say) once it has been checked."""
    dsc = Path(path).absolute()
    raw = _read_dsc(dsc)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BuildInputError(f"{dsc}: not UTF-8 text (byte {e.start})") from None
    fields = _parse(dsc, text)

    for name in ("Format", "Source", "Version"):
        if not fields.get(name, "").strip():
            raise BuildInputError(f"{dsc}: malformed .dsc: no {name} field")
    source = fields["Source"].strip()
    version = fields["Version"].strip()
    if not SOURCE_RE.match(source):
        raise BuildInputError(f"{dsc}: malformed .dsc: bad Source {source!r}")
    if not VERSION_RE.match(version):
        raise BuildInputError(f"{dsc}: malformed .dsc: bad Version {version!r}")

    files = _file_list(dsc, fields)
    for f in files:
        _verify(dsc, f, fields, keep)
    if keep is not None:
        try:
            with (keep / dsc.name).open("xb") as copy:
                copy.write(raw)
        except OSError as e:
            raise BuildInputError(f"{dsc}: cannot copy it to {keep}: {e.strerror}") from None

    def rel(name: str) -> str:
        return " ".join(fields.get(name, "").split())

    return SourcePackage(
        dsc=dsc,
        source=source,
        version=version,
        format=fields["Format"].strip(),
        architecture=tuple(fields.get("Architecture", "any").split()),
        binaries=tuple(b.strip() for b in fields.get("Binary", "").split(",") if b.strip()),
        files=tuple(SourceFile(name, size, sha) for name, size, sha in files),
        build_depends=rel("Build-Depends"),
        build_depends_arch=rel("Build-Depends-Arch"),
        build_depends_indep=rel("Build-Depends-Indep"),
        build_conflicts=rel("Build-Conflicts"),
        build_conflicts_arch=rel("Build-Conflicts-Arch"),
        build_conflicts_indep=rel("Build-Conflicts-Indep"),
        kept=keep,
    )


def _read_dsc(dsc: Path) -> bytes:
    """The bytes of a .dsc: a regular file of bounded size (not a FIFO that
    hangs the read, nor a device or a huge file that fills memory)."""
    try:
        fd = os.open(dsc, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BuildInputError(f"cannot read {dsc}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BuildInputError(f"{dsc}: not a regular file")
        if st.st_size > _MAX_DSC:
            raise BuildInputError(f"{dsc}: over {_MAX_DSC} bytes, too large for a .dsc")
        return f.read(_MAX_DSC + 1)


def _parse(dsc: Path, text: str) -> dict[str, str]:
    from debian.deb822 import Deb822

    body = _strip_signature(dsc, text)
    paragraphs = list(Deb822.iter_paragraphs(io.StringIO(body), use_apt_pkg=False))
    if not paragraphs:
        raise BuildInputError(f"{dsc}: malformed .dsc: no fields found")
    if len(paragraphs) > 1:
        raise BuildInputError(f"{dsc}: malformed .dsc: more than one paragraph")
    return {k: str(v) for k, v in paragraphs[0].items()}


def _strip_signature(dsc: Path, text: str) -> str:
    """The signed body of a clearsigned .dsc (or the text as is when unsigned).
    The signature is not verified here: trust in the source is the caller's."""
    lines = text.splitlines()
    if not lines or lines[0] != "-----BEGIN PGP SIGNED MESSAGE-----":
        if any(line.startswith("-----BEGIN PGP") for line in lines):
            raise BuildInputError(f"{dsc}: malformed .dsc: PGP armor in the wrong place")
        return text
    try:
        start = lines.index("", 1) + 1  # armor headers end at the first blank line
        end = lines.index("-----BEGIN PGP SIGNATURE-----", start)
    except ValueError:
        raise BuildInputError(f"{dsc}: malformed .dsc: broken PGP signature block") from None
    # Dash-escaped lines ("- foo") stand for "foo" (RFC 4880, 7.1).
    return "\n".join(ln[2:] if ln.startswith("- ") else ln for ln in lines[start:end]) + "\n"


def _entries(dsc: Path, fields: dict[str, str], field: str) -> list[tuple[str, int, str]]:
    out = []
    for line in fields.get(field, "").splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit():
            raise BuildInputError(f"{dsc}: malformed .dsc: bad {field} line {line.strip()!r}")
        digest, size, name = parts
        # A listed file must sit next to the .dsc: a name with a path in it could
        # make us read (and copy into the sandbox) anything on the host.
        if "/" in name or name.startswith(".") or not name.isprintable():
            raise BuildInputError(f"{dsc}: malformed .dsc: file name {name!r} is not plain")
        if name == dsc.name:
            raise BuildInputError(f"{dsc}: malformed .dsc: it lists itself")
        out.append((name, int(size), digest.lower()))
    return out


def _file_list(dsc: Path, fields: dict[str, str]) -> list[tuple[str, int, str | None]]:
    listings = {f: _entries(dsc, fields, f) for f, _ in _HASHES if fields.get(f, "").strip()}
    if not listings:
        raise BuildInputError(f"{dsc}: malformed .dsc: no Checksums-Sha256 or Files field")
    names: list[str] | None = None
    for field, entries in listings.items():
        these = sorted(n for n, _, _ in entries)
        if len(set(these)) != len(these):
            raise BuildInputError(f"{dsc}: malformed .dsc: a file is listed twice in {field}")
        if names is not None and these != names:
            raise BuildInputError(f"{dsc}: malformed .dsc: checksum fields list different files")
        names = these
    first = next(iter(listings.values()))
    sha256 = {n: d for n, _, d in listings.get("Checksums-Sha256", [])}
    return [(n, size, sha256.get(n)) for n, size, _ in first]


def _verify(
    dsc: Path, entry: tuple[str, int, str | None], fields: dict[str, str], keep: Path | None
) -> None:
    """Check one listed file from a single descriptor, hashing (and copying to
    `keep`) the very bytes whose size and checksum are checked. A link is
    followed once, when opened: tools leave orig tarballs as links."""
    name, size, _ = entry
    if size > _MAX_LISTED:
        # Copied whole into the build's private folder: a sparse file of a
        # huge listed size would fill the disk before any check failed.
        raise BuildInputError(
            f"{dsc}: listed file {name} is {size} bytes, more than the {_MAX_LISTED >> 30} GiB "
            "nsbuild takes of one source file"
        )
    try:
        fd = _open_regular(dsc.parent / name)
    except FileNotFoundError:
        raise BuildInputError(f"{dsc}: listed file {name} is missing") from None
    except OSError as e:
        raise BuildInputError(f"{dsc}: cannot read listed file {name}: {e.strerror}") from None
    if fd is None:
        raise BuildInputError(f"{dsc}: listed file {name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        actual_size = os.fstat(fd).st_size
        if actual_size != size:
            raise BuildInputError(
                f"{dsc}: size mismatch for {name}: .dsc says {size}, file has {actual_size}"
            )
        field, algo, expected = _expected_digest(dsc, fields, name)
        try:
            actual, length = _hash_copy(f, size, algo, keep / name if keep else None)
        except OSError as e:
            raise BuildInputError(f"{dsc}: cannot copy {name} to {keep}: {e.strerror}") from None
    if length != size:
        raise BuildInputError(f"{dsc}: {name} changed while it was read")
    if actual != expected:
        raise BuildInputError(
            f"{dsc}: checksum mismatch for {name} ({field}): "
            f"expected {expected}, file has {actual}"
        )


def _expected_digest(dsc: Path, fields: dict[str, str], name: str) -> tuple[str, str, str]:
    """The field, algorithm and digest to check `name` by: the strongest
    present; Files (md5) only when nothing better is."""
    for field, algo in _HASHES:
        for listed, _, digest in _entries(dsc, fields, field):
            if listed == name:
                return field, algo, digest
    raise AssertionError(f"{name} is in no checksum field")  # _file_list took it from one


def _open_regular(path: Path) -> int | None:
    """A descriptor to read `path`, or None when it is not a regular file: a
    FIFO would hang the read and opening a device can have effects, so the
    type is checked on a descriptor that does not open the file itself."""
    handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            return None
        # Opens the very file just checked, whatever its name leads to now.
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)


def open_read(path: Path) -> typing.BinaryIO:
    fd = _open_regular(path)
    if fd is None:
        raise OSError(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def _hash_copy(
    f: typing.BinaryIO, size: int, algo: str, copy: Path | None
) -> tuple[str, int]:
    """The digest of `f` and its length, reading at most one byte past `size`
    (a file growing meanwhile is not read on and on); written as read to
    `copy`, a new file."""
    digest = hashlib.new(algo)
    length = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(copy.open("xb")) if copy is not None else None
        while length <= size and (chunk := f.read(min(CHUNK, size + 1 - length))):
            digest.update(chunk)
            length += len(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest(), length


# What the host reads of a package to learn its distribution. A debian
# tarball is small, with debian/changelog near its start; a native one holds
# the whole source, with debian/ rarely far into it.
_MAX_SCAN_BYTES = 512 << 20
_MAX_SCAN_MEMBERS = 50_000
# An extended header holds a path (of at most PATH_MAX) or a few attributes,
# and a member has a few: tarfile reads each whole, in recursion.
_MAX_MEMBER_HEADER = 64 << 10
_MAX_HEADER_CHAIN = 8
_MAX_DIFF_LINE = 4096
# What is read of a changelog: its newest entry is at its head.
MAX_CHANGELOG_HEAD = 65536


class _OverBound(Exception):
    """Finding the changelog would read past a bound."""


class _SourceTarInfo(_BoundedTarInfo):
    """A member header as a source package's tarball has them: small extended
    headers, a few in a row, nothing sparse (refused before tarfile reads a
    sparse map, which it keeps whole)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.HeaderError("a sparse member")
        if self.type in _EXTENDED and self.size > _MAX_MEMBER_HEADER:
            raise tarfile.HeaderError(
                f"an extended header of {self.size} bytes (at most {_MAX_MEMBER_HEADER})"
            )
        # Each header of the chain before a member wraps the stream in a budget.
        depth, stream = 0, tarfile_.fileobj
        while isinstance(stream, _Budget):
            depth, stream = depth + 1, stream.inner
        if depth >= _MAX_HEADER_CHAIN:
            raise tarfile.HeaderError(f"more than {_MAX_HEADER_CHAIN} headers for one member")
        return super()._proc_member(tarfile_)


def _changelog_text(pkg: SourcePackage) -> str | None:
    native = pkg.format.startswith("3.0 (native)")
    for f, path in zip(pkg.files, pkg.paths()[1:], strict=True):
        try:
            if ".debian.tar." in f.name or (native and ".tar." in f.name):
                text = _changelog_in_tar(path)
            elif f.name.endswith(".diff.gz"):
                text = _changelog_in_diff(path)
            else:
                continue
        except (OSError, EOFError, zlib.error, tarfile.TarError, _OverBound) as e:
            why = (e.strerror if isinstance(e, OSError) else None) or str(e)
            raise BuildInputError(
                f"{f.name}: cannot read debian/changelog: {printable(why, 200)}; "
                "name the environment to build in with --env"
            ) from None
        if text is not None:
            return text
    return None


def _changelog_in_tar(path: Path) -> str | None:
    with (
        open_read(path) as f,
        tarfile.open(fileobj=f, mode="r|*", tarinfo=_SourceTarInfo) as tar,
    ):
        for _ in range(_MAX_SCAN_MEMBERS):
            member = tar.next()
            if member is None:
                return None
            # The stream mode keeps every member read; none is needed again.
            tar.members.clear()  # type: ignore[attr-defined]
            if member.isfile() and _is_changelog(member.name):
                fh = tar.extractfile(member)
                assert fh is not None
                return fh.read(MAX_CHANGELOG_HEAD).decode("utf-8", "replace")
            # The next header is there: reaching it decompresses this member.
            if tar.offset > _MAX_SCAN_BYTES:
                raise _OverBound(f"not within its first {_MAX_SCAN_BYTES >> 20} MiB")
        raise _OverBound(f"not within its first {_MAX_SCAN_MEMBERS} members")


def _is_changelog(name: str) -> bool:
    """debian/changelog of a debian tarball, or of the one top folder of a native one."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return parts[-2:] == ["debian", "changelog"] and len(parts) <= 3


def _changelog_in_diff(path: Path) -> str | None:
    import gzip

    with open_read(path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        lines = _diff_lines(gz)
        for line in lines:
            words = line.split()
            if words[:1] == [b"+++"] and len(words) > 1 and words[1].endswith(
                b"/debian/changelog"
            ):
                next(lines, None)  # the hunk's "@@" line
                hunk = itertools.islice(lines, 38)
                return "\n".join(
                    ln[1:].rstrip(b"\n").decode("utf-8", "replace")
                    for ln in hunk
                    if ln.startswith(b"+")
                )
    return None


def _diff_lines(stream: io.BufferedIOBase) -> Iterator[bytes]:
    """The lines of a decompressed diff, each cut to its first _MAX_DIFF_LINE
    bytes, read no further than _MAX_SCAN_BYTES: a small .diff.gz can expand
    to gigabytes, in one line or in many."""
    total = 0
    while True:
        line = piece = stream.readline(_MAX_DIFF_LINE)
        total += len(piece)
        while piece and not piece.endswith(b"\n") and total <= _MAX_SCAN_BYTES:
            piece = stream.readline(_MAX_DIFF_LINE)  # the rest of a long line
            total += len(piece)
        if total > _MAX_SCAN_BYTES:
            raise _OverBound(f"not within its first {_MAX_SCAN_BYTES >> 20} MiB")
        if not line:
            return
        yield line


