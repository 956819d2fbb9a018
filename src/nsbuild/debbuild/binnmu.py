"""sbuild's binary-only uploads: --make-binNMU, --binNMU and --append-to-version.

sbuild writes a changelog entry at the top of the unpacked tree's
debian/changelog (Sbuild/Build.pm, "Hack binNMU version"); the build then
gives its .debs, .changes and .buildinfo that entry's version. The same
entry is made here, word for word, so that a maintainer's tools read it
alike.
"""

from __future__ import annotations

import os
import re
import time

from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.result import BuildRequest

# What --append-to-version may add: version characters, no hyphen (which
# would move the split between upstream version and Debian revision).
_SUFFIX = re.compile(r"[A-Za-z0-9.+~]{1,64}")
# "Name <address>", as dpkg reads a changelog's trailer.
_PERSON = re.compile(r"[^<>\x00-\x1f\x7f]{1,200} <[^<>\s\x00-\x1f\x7f]{1,200}>")
MAX_TEXT = 4096
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def wanted(req: BuildRequest) -> bool:
    """Whether the build makes a binary-only changelog entry (sbuild: only
    --make-binNMU or --append-to-version do; --binNMU alone changes nothing)."""
    return req.make_binnmu is not None or bool(req.append_to_version)


def check(req: BuildRequest) -> None:
    """Refuse, in one line, what sbuild refuses or would silently ignore."""
    if req.binnmu is not None and not wanted(req):
        raise BuildInputError(
            "--binNMU needs --make-binNMU TEXT or --append-to-version (alone it changes nothing)"
        )
    if req.binnmu is not None and not 0 <= req.binnmu <= 9999:
        raise BuildInputError(f"--binNMU {req.binnmu}: not a number from 0 to 9999")
    if req.append_to_version is not None and not _SUFFIX.fullmatch(req.append_to_version):
        raise BuildInputError(
            f"--append-to-version {req.append_to_version!r}: only letters, digits and '.+~' "
            "(at most 64)"
        )
    if req.append_to_version and req.source:
        raise BuildInputError("--append-to-version cannot be used with --source (as sbuild)")
    if req.make_binnmu is not None:
        text = req.make_binnmu
        if not text.strip() or len(text) > MAX_TEXT or any(
            (ord(c) < 32 and c != "\n") or ord(c) == 127 for c in text
        ):
            raise BuildInputError(
                "--make-binNMU: give one to a few lines of text, without control characters"
            )
    for option, value in (("--maintainer", req.maintainer), ("--uploader", req.uploader)):
        if value is not None and not _PERSON.fullmatch(value):
            raise BuildInputError(f"{option} {value!r}: not 'Full Name <address>' on one line")
    if wanted(req) and maintainer(req) is None:
        raise BuildInputError(
            "--make-binNMU/--append-to-version: no maintainer for the changelog entry; "
            "give -m/--maintainer 'Full Name <address>' (or set DEBFULLNAME and DEBEMAIL)"
        )


def maintainer(req: BuildRequest) -> str | None:
    """Who signs the entry: -m, else -e (as sbuild), else dch's DEBFULLNAME
    and DEBEMAIL."""
    if req.maintainer or req.uploader:
        return req.maintainer or req.uploader
    name, mail = os.environ.get("DEBFULLNAME", ""), os.environ.get("DEBEMAIL", "")
    person = f"{name} <{mail}>"
    return person if name and mail and _PERSON.fullmatch(person) else None


def version(source_version: str, req: BuildRequest) -> str:
    """The version the entry gives (sbuild's binNMU_version): the source's,
    the appended text, then +bN. --make-binNMU alone means +b1."""
    if not wanted(req):
        return source_version
    number = req.binnmu if req.binnmu is not None else (1 if req.make_binnmu is not None else 0)
    return source_version + (req.append_to_version or "") + (f"+b{number}" if number else "")


def build_type(req: BuildRequest) -> str:
    """dpkg-buildpackage's --build: a binary-only upload has no arch:all
    packages and no source (sbuild: --make-binNMU and --append-to-version
    imply --no-arch-all; a binNMU drops --source)."""
    if not wanted(req):
        return req.build_type()
    return "any" if req.arch_any else ""


def entry(source: str, new_version: str, dist: str, arch: str, req: BuildRequest,
          when: float | None = None) -> str:  # fmt: skip
    """The changelog entry, as sbuild writes it, dated now (UTC)."""
    lines = [f"{source} ({new_version}) {dist}; urgency=low, binary-only=yes", ""]
    if req.append_to_version:
        lines.append(f"  * Append {req.append_to_version} to version number; no source changes")
    if req.make_binnmu is not None:
        lines.append(f"  * Binary-only non-maintainer upload for {arch}; no source changes.")
        lines.append("  * " + "    ".join(req.make_binnmu.split("\n")))
    t = time.gmtime(time.time() if when is None else when)
    # Debian Policy's date (as `date -R`), in English whatever the locale.
    date = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")  # fmt: skip
    lines += ["", f" -- {maintainer(req)}  {date}", "", ""]
    return "\n".join(lines)
