"""What the apt cache reads of apt's files: Release fields, SHA256 lists, Packages stanzas, keys.

Parsed with python-debian, and only ever from text whose origin was checked
first: a Release is the output of gpgv for an InRelease it accepted (the
caller checks the signature, the size and the framing before), a Packages
index one whose size and SHA256 a verified Release gives, a key one of the
environment's own pristine layers. Where a value could be read two ways, it
is read the stricter way: a one-line field folded over lines counts as
missing, a file the SHA256 list names twice with different sums is not
vouched for.
"""

from __future__ import annotations

import binascii
import email.utils
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from debian.deb822 import Deb822

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_SIZE_RE = re.compile(r"[0-9]+")
# apt names a .deb NAME_VERSION_ARCH.deb, with the epoch's ':' as %3a.
DEB_RE = re.compile(r"([a-z0-9][a-z0-9.+-]*)_([A-Za-z0-9.+~%-]+)_([a-z0-9-]+)\.deb")
_KEY_BLOCK = re.compile(
    rb"^-----BEGIN PGP PUBLIC KEY BLOCK-----[ \t\r]*\n(.*?)^-----END PGP PUBLIC KEY BLOCK-----",
    re.M | re.S,
)

Sums = dict[str, tuple[int, str]]


def parse_release(text: str) -> Deb822:
    """The first paragraph of a Release text (what apt reads of it), its
    fields as written: the SHA256 list is read line by line below."""
    from debian.deb822 import Deb822

    return Deb822(text)


def field(paragraph: Deb822, name: str) -> str:
    """A one-line field; "" when missing or folded over lines (no value the
    cache compares, a suite, a date, a size, has a second line)."""
    value = paragraph.get(name, "")
    return "" if not isinstance(value, str) or "\n" in value else value.strip()


def sha256_entries(release: Deb822) -> Sums:
    """The SHA256 list of a Release: path -> (size, hash). A line that is not
    exactly those three words is left out; so is a path listed twice with
    different sums, and a list that starts on the field's own line."""
    entries: Sums = {}
    twice: set[str] = set()
    first, *lines = str(release.get("SHA256", "")).split("\n")
    for line in lines if not first.strip() else ():
        words = line.split()
        if len(words) != 3:
            continue
        digest, size, name = words
        if not _SIZE_RE.fullmatch(size) or not _SHA256_RE.fullmatch(digest):
            continue
        sums = (int(size), digest.lower())
        if entries.setdefault(name, sums) != sums:
            twice.add(name)
    return {name: sums for name, sums in entries.items() if name not in twice}


def names_its_suite(fname: str, release: Deb822) -> bool:
    """Whether the InRelease names the suite its file name says: apt names it
    ..._dists_DIST_InRelease, with DIST's '/' as '_' (a flat archive has no
    suite to check and is not cached)."""
    head, sep, dist = fname.removesuffix("_InRelease").rpartition("_dists_")
    if not sep or not head:
        return False
    named = {field(release, "Codename"), field(release, "Suite")} - {""}
    return dist in {n.replace("/", "_") for n in named}


def identity(release: Deb822) -> tuple[str, ...]:
    # Which archive and release: not Suite, which moves on at each Debian
    # release (stable -> oldstable) while the archive stays the same.
    return tuple(field(release, f) for f in ("Origin", "Label", "Codename"))


def date(release: Deb822) -> float:
    """The Release's Date as a timestamp (0 when missing or malformed)."""
    return _timestamp(field(release, "Date"))


def expired(release: Deb822) -> bool:
    until = _timestamp(field(release, "Valid-Until"))
    return 0 < until < time.time()


def _timestamp(text: str) -> float:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp() if text else 0.0
    except (TypeError, ValueError):
        return 0.0


def deb_sums(stanzas: Iterable[bytes], wanted: set[str]) -> Sums:
    """archive file name -> (size, SHA256) of the `wanted` .debs that these
    Packages stanzas describe."""
    from debian.deb822 import Packages

    found: Sums = {}
    for stanza in stanzas:
        pkg = Packages(stanza.decode(errors="replace"))
        name, version, arch, size, digest = (
            field(pkg, f) for f in ("Package", "Version", "Architecture", "Size", "SHA256")
        )
        fname = f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
        if fname in wanted and _SIZE_RE.fullmatch(size) and _SHA256_RE.fullmatch(digest):
            found[fname] = (int(size), digest.lower())
    return found


def dearmor(data: bytes) -> bytes:
    """The public key blocks of an ASCII-armoured key file, as binary (what
    gpgv reads). python-debian has no OpenPGP armour; a block whose base64
    does not decode is left out."""
    keys = b""
    for block in _KEY_BLOCK.finditer(data):
        # Armour headers up to the first empty line, then the base64 lines;
        # the last may be the CRC-24 checksum ("=" and four characters).
        text = b"\n" + block.group(1).replace(b"\r", b"")
        _headers, _blank, body = text.partition(b"\n\n")
        lines = body.split()
        if lines and lines[-1].startswith(b"=") and len(lines[-1]) == 5:
            lines.pop()
        try:
            keys += binascii.a2b_base64(b"".join(lines), strict_mode=True)
        except binascii.Error:
            continue
    return keys
