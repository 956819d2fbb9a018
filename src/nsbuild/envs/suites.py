"""Which Debian suite an environment or distribution name stands for, and
the command that creates an environment for it.

Changelog distributions that are not suites of their own map onto the suite
they build against, as sbuild users expect:

    UNRELEASED                      unstable (Debian's convention for work in progress)
    sid                             unstable
    experimental, rc-buggy          unstable (experimental's own packages not enabled)
    bookworm-backports[-sloppy],    bookworm (the base suite)
    -security, -updates,
    -proposed-updates, -lts
"""

from __future__ import annotations

import contextlib
import csv
import shlex

DEFAULT_DISTRIBUTION = "unstable"
TO_UNSTABLE = ("UNRELEASED", "sid", "experimental", "rc-buggy")
SUFFIXES = (
    "-backports-sloppy",
    "-backports",
    "-proposed-updates",
    "-security",
    "-updates",
    "-lts",
)
_ALIASES = ("stable", "testing", "oldstable", "oldoldstable", "unstable", "sid", "experimental")
# Used when distro-info-data is not installed.
_KNOWN = ("buster", "bullseye", "bookworm", "trixie", "forky", "duke")
DISTRO_INFO = "/usr/share/distro-info/debian.csv"


def debian_suites() -> set[str]:
    """Names mmdebstrap can bootstrap from Debian's archive."""
    names = set(_KNOWN) | set(_ALIASES)
    with contextlib.suppress(OSError, csv.Error):
        with open(DISTRO_INFO, newline="", encoding="utf-8") as f:
            names |= {row["series"] for row in csv.DictReader(f) if row.get("series")}
    return names


def base_suite(name: str) -> str:
    """The suite `name` builds against (itself when it is no upload target)."""
    if name in TO_UNSTABLE:
        return "unstable"
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def create_command(name: str) -> str:
    """`nsbuild env create` for an environment found by `name`: one of its
    Debian suite, with `name` as an alias where the suite is named otherwise;
    for a name that is no Debian suite, one from unstable under that name."""
    suite = base_suite(name)
    if suite not in debian_suites():
        return f"nsbuild env create {shlex.quote(name)} --suite {DEFAULT_DISTRIBUTION}"
    alias = f" --alias {shlex.quote(name)}" if name != suite else ""
    return f"nsbuild env create {shlex.quote(suite)} --suite {shlex.quote(suite)}{alias}"
