"""The sections of the .build log that sbuild's readers look for, asked of
the session: the packages the build ran with ("Build environment") and what
each result .deb holds ("Package contents").

What the session answers was written by maintainer scripts running as root
there, and the .debs by the package: the answers are checked (names and
versions) or bounded (a listing) before they reach the log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from nsbuild.backends import STDOUT
from nsbuild.debbuild.steps import Steps

# sbuild's TOOLCHAIN_REGEX: the packages its "Toolchain package versions" names.
_TOOLCHAIN = re.compile(
    r"(binutils|dpkg-dev|gcc-[\d.]+|g\+\+-[\d.]+|libc6-dev|libstdc\+\+-.*-dev|linux-libc-dev)"
)
_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_VERSION = re.compile(r"[A-Za-z0-9.+~:-]+")
# What the contents of all results may take in the log: a listing is a line
# per file, and a package may hold any number of them.
CONTENTS_LIMIT = 16 << 20
# One run for all the results: each named and underlined as sbuild's
# subsections are, then `dpkg-deb -I` and `dpkg-deb -c` sorted by path.
_CONTENTS = (
    'for f do printf "\\n%s\\n" "$f"; printf "%s\\n" "$f" | sed "s/./-/g"; echo; '
    'dpkg-deb -I "$f"; echo; dpkg-deb -c "$f" | LC_ALL=C sort -k6; done'
)


def build_environment(steps: Steps, user: str, arch: str, qualified: bool = False) -> None:
    """The kernel and the installed packages with their versions, as
    sbuild's log has them once the build dependencies are in; `qualified`
    (a cross build): the packages named with their architecture."""
    log = steps.log
    log.section("Build environment")
    u = os.uname()
    log.line(f"Kernel: {u.sysname} {u.release} {u.version} {arch} ({u.machine})")
    name = "${binary:Package}" if qualified else "${Package}"
    fmt = f"${{db:Status-Abbrev}} {name} ${{Version}}\\n"
    # Its output bounded by check_output; the section shows only what it says.
    status, text = steps.backend.check_output(["dpkg-query", "-W", "-f", fmt], user=user)
    if status != 0:
        log.line(f"cannot list the installed packages (dpkg-query exit status {status})")
        return
    installed, odd = _installed(text.splitlines())
    toolchain = [p for p in installed if _TOOLCHAIN.fullmatch(p.split("_", 1)[0])]
    log.line("Toolchain package versions: " + " ".join(toolchain))
    log.line("Package versions: " + " ".join(installed))
    if odd:
        log.line(f"({odd} entries of dpkg's database not shown: not a package name and version)")


def _installed(lines: Iterable[str]) -> tuple[list[str], int]:
    """NAME_VERSION of each installed package, sorted; and how many lines
    were not a well-formed installed package."""
    found: set[str] = set()
    odd = 0
    for line in lines:
        words = line.split()
        if not words or words[0] != "ii":
            continue  # not installed: removed, or only its configuration left
        if len(words) == 3 and _NAME.fullmatch(words[1]) and _VERSION.fullmatch(words[2]):
            found.add(f"{words[1]}_{words[2]}")
        else:
            odd += 1
    return sorted(found), odd


def package_contents(steps: Steps, user: str, where: str, names: Iterable[str]) -> None:
    """`dpkg-deb -I` and `dpkg-deb -c` of each result .deb in the build
    directory `where`, in the session (the names were checked when the
    results were collected)."""
    debs = sorted(n for n in names if n.endswith((".deb", ".udeb")))
    if not debs:
        return
    log = steps.log
    log.section("Package contents")
    # No line naming the command: the section reads as sbuild's.
    with log.command_output(CONTENTS_LIMIT) as output:
        status = steps.backend.run(["sh", "-c", _CONTENTS, "contents", *debs], user=user,
                                   cwd=where, stdout=output, stderr=STDOUT)
    if status != 0:
        log.line(f"[nsbuild: listing the packages' contents exited {status}]")
