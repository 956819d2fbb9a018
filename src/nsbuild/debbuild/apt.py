"""What the build asks of apt, and how it reads apt's answers."""

from __future__ import annotations

import re

from nsbuild.backends import Backend

# apt's binary caches of the package lists live beside the downloaded
# packages: with the local backend's apt cache mount they are shared by the
# apt runs of a build (update, resolve, install: each would parse the lists
# again) and by the next builds (apt checks them against the lists and the
# dpkg status, and rebuilds them when stale), and they never bloat a kept
# dependency layer.
APT_OPTS = (
    "-o", "Dir::Cache::pkgcache=/var/cache/apt/archives/nsbuild-pkgcache.bin",
    "-o", "Dir::Cache::srcpkgcache=/var/cache/apt/archives/nsbuild-srcpkgcache.bin",
    "-o", "Acquire::Languages=none",
    "-o", "APT::Install-Recommends=false",
    "-o", "APT::Get::Assume-Yes=true",
    "-o", "Dpkg::Use-Pty=false",
    "-o", "quiet=1",
    # update would delete the lists of every architecture dpkg lacks: a
    # native build (or a check's session) would take a cross build's lists
    # out of the shared cache, and the next cross build fetch them again.
    # apt reads only the lists of the architectures it is given.
    "-o", "APT::Get::List-Cleanup=false",
)  # fmt: skip
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true"}
# Nothing a build reads comes from man-db's index of manual pages, which
# takes seconds to build when man-db is installed.
MAN_DB_OFF = "echo 'man-db man-db/auto-update boolean false' | debconf-set-selections"
# What apt knows of the archive: every file of its lists (name, size, time)
# and the checksum of each Release file, which pins the package lists.
LISTS_STATE = (
    "cd /var/lib/apt/lists || exit 1; for f in *; do "
    "[ -f \"$f\" ] && [ \"$f\" != lock ] && stat -c '%n %s %Y' -- \"$f\"; done; "
    "for f in *Release; do [ -f \"$f\" ] && sha256sum -- \"$f\"; done; true"
)

# A source that may let an unsigned package in: an option about trust or
# insecurity (any spelling, any value), or a local repository (whose
# Release file, if any, is whoever made it).
_UNCHECKED_SOURCE = re.compile(
    r"trusted|allow-insecure|allow-weak|allow-downgrade|\b(file|copy|cdrom):", re.IGNORECASE
)
# A line of `apt-config dump`, and the settings that let unsigned packages in
# (at any scope, as Binary::apt::APT::Get::AllowUnauthenticated), unless off.
_APT_SETTING = re.compile(r'^(\S+) "(.*)";$', re.MULTILINE)
_UNCHECKED_SETTING = re.compile(
    r"AllowUnauthenticated|AllowInsecure|AllowDowngrade|AllowWeak|allow-unauthenticated",
    re.IGNORECASE,
)
_OFF = {"0", "no", "false", "off", "without", "disable"}
# An action of `apt-get -s`: "Inst NAME [OLD] (NEW ... [ARCH])" or "Remv NAME ...".
_ACTION = re.compile(r"^(Inst|Remv) (\S+)(?: \[([^\]]*)\])?(?: \((\S+)[^)]*\[(\S+)\]\))?")
_UNMET = re.compile(r"(?:Depends|Conflicts|Breaks|PreDepends): (.*)$")


def unchecked_sources(backend: Backend) -> bool:
    """Whether apt in this session may install packages no signature
    vouches for. apt spells its booleans many ways (yes, true, 1, on...),
    so no value is interpreted: a source with any option about trust or
    insecurity, or a local (file:, copy:, cdrom:) one, is enough; so is
    an Allow* setting of apt's that is not plainly off, or any failure
    to tell. Run before any maintainer script, by apt's own tools."""
    # The source lists where apt's configuration (which may move them) says.
    sources = (
        'eval "$(apt-config shell SL Dir::Etc::sourcelist/f SP Dir::Etc::sourceparts/d)" '
        '&& cat -- "$SL" "$SP"*.list "$SP"*.sources 2>/dev/null; true'
    )
    status, text = backend.check_output(["sh", "-c", sources])
    if status != 0:
        return True
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    if any(_UNCHECKED_SOURCE.search(ln) for ln in lines):
        return True
    status, text = backend.check_output(["apt-config", "dump"])
    if status != 0:
        return True
    for m in _APT_SETTING.finditer(text):
        if _UNCHECKED_SETTING.search(m.group(1)) and m.group(2).lower() not in _OFF:
            return True
    return False


def actions(text: str) -> list[str]:
    """The package actions of `apt-get -s` output ("install NAME VERSION ARCH",
    "remove NAME"), sorted."""
    out = []
    for line in text.splitlines():
        m = _ACTION.match(line)
        if m:
            verb, name, _old, new, arch = m.groups()
            out.append(
                f"{'install' if verb == 'Inst' else 'remove'} {name}"
                + (f" {new} {arch}" if new else "")
            )
    return sorted(out)


def unmet(text: str) -> list[str]:
    """The dependencies apt names after "The following packages have unmet dependencies"."""
    out: list[str] = []
    lines = text.splitlines()
    try:
        i = next(n for n, ln in enumerate(lines) if "have unmet dependencies" in ln)
    except StopIteration:
        return out
    for line in lines[i + 1 :]:
        if not line.startswith(" "):
            break
        m = _UNMET.search(line)
        if m:
            out.append(m.group(1).strip())
    return out
