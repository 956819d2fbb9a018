"""Safe tarball extraction: check every member, and pass on only what is safe.

The tarball is read once, as a stream, by this module on the host; a cleaned
tar stream is written to `tar --extract` running in a user namespace (so
ownership and modes are kept under the subuid map). `tar` therefore never
sees a hostile member, and what is checked is exactly what is extracted (no
check-then-use race on the file). Refused, with the member named:

- absolute names and names with a `..` component (also in hard-link targets);
- a member whose path goes through an earlier symlink member (the classic
  "symlink to / then write through it"), or a hard link to one, or that
  replaces a symlink;
- a hard link to something not extracted before it.

Neutralised: device nodes are skipped (they cannot be created in a user
namespace, and the sandbox mounts its own /dev), extended attributes other
than `security.capability` are dropped (a `user.overlay.*` attribute in a
lower layer would steer overlayfs), and every pax header that could carry a
path is rebuilt from the checked name.

Bounded: an extended header (pax, GNU long name) of more than _MAX_HEADER
bytes is refused before tarfile reads it whole into memory, and no member's
headers (with a GNU sparse map) may take more than twice that; the members'
sizes (a sparse member counts at its full size, as tar writes it) and a
header's worth per member add up to at most the caller's limit, checked
before a member is passed on: a small compressed or sparse tarball cannot
fill the disk.

Extraction also runs in a sandbox that can write only to its target, so even
a mistake here cannot write outside the store.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

from nsbuild.envs.errors import UnsafeTarball

_KEPT_XATTRS = ("SCHILY.xattr.security.capability",)
# What a member costs besides its data (its header, about an inode).
_MEMBER_COST = 512
# tarfile reads an extended header whole: bound it (real ones hold a path).
_MAX_HEADER = 1 << 20
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
             tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _Budget:
    """The tar stream as a member's header sees it: reads past `left` bytes
    raise, so no header (a pax record, a GNU sparse map in extension blocks
    or in the data of a sparse 1.0 member) makes tarfile read without bound."""

    def __init__(self, inner: Any, left: int) -> None:
        self.inner = inner
        self.left = left

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise tarfile.HeaderError(f"a member's headers take more than {2 * _MAX_HEADER} bytes")
        self.left -= n
        data: bytes = self.inner.read(n)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose headers are bounded before tarfile reads them whole."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > _MAX_HEADER:
            raise tarfile.HeaderError(
                f"extended header of {self.size} bytes (at most {_MAX_HEADER})"
            )
        inner = tarfile_.fileobj
        tarfile_.fileobj = _Budget(inner, 2 * _MAX_HEADER)  # type: ignore[assignment]
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]
        finally:
            tarfile_.fileobj = inner


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


@dataclass
class TarReport:
    members: int = 0
    bytes: int = 0
    skipped_devices: list[str] = field(default_factory=list)


def clean_name(name: str) -> str:
    """`name` relative to the target root ('' for the root itself), or raise ValueError."""
    if name.startswith("/"):
        raise ValueError("absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("'..' component")
    if any("\0" in p for p in parts):
        raise ValueError("NUL in name")
    return "/".join(parts)


class _Checker:
    """Remembers what was extracted so far, to judge the next member."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.symlinks: set[str] = set()
        self.seen: set[str] = set()

    def refuse(self, member: tarfile.TarInfo, why: str) -> UnsafeTarball:
        name = member.name if len(member.name) <= 200 else member.name[:200] + "..."
        return UnsafeTarball(f"{self.label}: refusing member {name!r}: {why}")

    def _through_symlink(self, path: str) -> str | None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                return prefix
        return None

    def check(self, m: tarfile.TarInfo) -> str:
        try:
            name = clean_name(m.name)
        except ValueError as e:
            raise self.refuse(m, str(e)) from None
        link = self._through_symlink(name)
        if link is not None:
            raise self.refuse(m, f"its path goes through the symlink {link!r}")
        if name in self.symlinks:
            raise self.refuse(m, "it replaces an earlier symlink")
        if m.islnk():
            try:
                target = clean_name(m.linkname)
            except ValueError as e:
                raise self.refuse(m, f"hard link target {m.linkname!r}: {e}") from None
            if self._through_symlink(target) is not None or target not in self.seen:
                raise self.refuse(
                    m, f"hard link to {m.linkname!r}, which is not a member before it"
                )
            m.linkname = target
            if target in self.symlinks:
                # tar makes a hard link to a symlink as another symlink: a
                # later member under this name would be written through it.
                self.symlinks.add(name)
        if m.issym():
            if name == "":
                raise self.refuse(m, "the root is a symlink")
            self.symlinks.add(name)
        self.seen.add(name)
        return name


def _scrub(m: tarfile.TarInfo, name: str) -> None:
    m.name = name or "."
    # The pax headers win over the fields when tarfile writes a member: keep
    # none that could smuggle a path or an id back in.
    m.pax_headers = {k: v for k, v in m.pax_headers.items() if k in _KEPT_XATTRS}
    m.uname = m.gname = ""  # extraction uses --numeric-owner


def sanitize(
    src: IO[bytes], dst: IO[bytes], label: str, limit: int | None = None, hint: str = ""
) -> TarReport:
    """Copy the tar stream `src` (optionally gz/bz2/xz) to `dst` as a checked pax stream.

    Raises UnsafeTarball on the first hostile member, or on the member that
    would take what is written past `limit` bytes (`hint` then says how to
    raise it); whatever was written to `dst` by then must be discarded by the
    caller."""
    report = TarReport()
    checker = _Checker(label)
    written = 0
    try:
        with (
            tarfile.open(fileobj=src, mode="r|*", tarinfo=_BoundedTarInfo) as tin,
            tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT) as tout,
        ):
            for m in tin:
                if m.ischr() or m.isblk():
                    report.skipped_devices.append(m.name)
                    continue
                if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
                    raise checker.refuse(m, f"unsupported member type {m.type!r}")
                name = checker.check(m)
                written += _MEMBER_COST + (m.size if m.isreg() else 0)
                if limit is not None and written > limit:
                    raise checker.refuse(
                        m, f"unpacked, it would exceed the limit of {human_size(limit)}{hint}"
                    )
                data = tin.extractfile(m) if m.isreg() else None
                _scrub(m, name)
                tout.addfile(m, data)
                report.members += 1
                report.bytes += m.size if m.isreg() else 0
    except tarfile.TarError as e:
        raise UnsafeTarball(f"{label}: not a readable tarball: {e}") from e
    return report
