"""Tests that declare `Restrictions: needs-internet`, and the line that tells what to pass.

autopkgtest reads a package's debian/tests/control on the host and never
tells the server which test needs what. The server sees the tree cross over
(copyup of the built or unpacked tree, copydown of an unbuilt one), so it
reads the control file there. A testbed may have written that file: it is
opened without following links, checked to be a regular file of bounded
size, and only the names it gives are printed, escaped.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from nsbuild.virtserver.hostfs import host_dir, open_dir, read_bounded, shown

if TYPE_CHECKING:
    from nsbuild.virtserver.testbed import NetPolicy

# autopkgtest's own control files are a few KB.
MAX_CONTROL = 1 << 20
RESTRICTION = "needs-internet"
# Names shown in the one line, at most (then "and N more").
SHOWN = 5
_WORDS = re.compile(r"[\s,]+")


def declaring(host: str, beneath: str | None) -> list[str]:
    """The tests of the tree at the host path `host` that declare needs-internet,
    in the control file's order. `beneath`: the folder a testbed writes (the
    shared downtmp); no link below it is followed. Nothing readable: []."""
    candidates = [[b"debian", b"tests"]]
    if os.path.basename(os.path.normpath(host)) == "debian":
        candidates.append([b"tests"])
    for parts in candidates:
        try:
            top = host_dir(host, beneath)
        except OSError:
            return []
        try:
            tests = open_dir(top, parts)
        except OSError:
            continue
        finally:
            os.close(top)
        try:
            data = read_bounded("control", MAX_CONTROL, dir_fd=tests)
        except OSError:
            continue
        finally:
            os.close(tests)
        return needing(data.decode(errors="replace"))
    return []


def needing(text: str) -> list[str]:
    """The tests of a debian/tests/control text that declare needs-internet,
    named as autopkgtest names them (a Test-Command is commandN, or its
    Features: test-name=)."""
    from debian.deb822 import Deb822

    # Ordered and without repeats; a dict, as a list's `in` would make a
    # control file of many names (a testbed may write it) take minutes.
    names: dict[str, None] = {}
    commands = 0
    for para in Deb822.iter_paragraphs(text.splitlines()):
        if "Tests" in para:
            found = _words(para["Tests"])
        elif "Test-Command" in para:
            given = [f.split("=", 1)[1] for f in _words(para.get("Features", ""))
                     if f.startswith("test-name=")]  # fmt: skip
            if given:
                found = given[:1]
            else:
                commands += 1
                found = [f"command{commands}"]
        else:
            continue
        if RESTRICTION in _words(para.get("Restrictions", "")):
            names.update(dict.fromkeys(found))
    return list(names)


def _words(value: str) -> list[str]:
    return [w for w in _WORDS.split(value) if w]


def reach(policy: NetPolicy) -> str:
    """What the testbed's commands reach, in words."""
    if policy.mode == "none":
        return "this testbed has no network"
    if policy.mode == "host":
        return "this testbed shares the host's network"
    if not policy.allow:
        return "this testbed reaches only the environment's mirrors"
    mirrors = " and the environment's mirrors" if policy.allow_from_env else ""
    return f"this testbed reaches only the --allow list{mirrors}"


def advice(names: list[str], policy: NetPolicy, env: str) -> str:
    """One line: which tests need the internet, what they reach, what to pass."""
    listed = ", ".join(shown(n) for n in names[:SHOWN])
    if len(names) > SHOWN:
        listed += f" and {len(names) - SHOWN} more"
    one = len(names) == 1
    return (f"{'test' if one else 'tests'} {listed} {'declares' if one else 'declare'} "
            f"Restrictions: {RESTRICTION}, but {reach(policy)}: to give "
            f"{'it' if one else 'them'} the internet, pass --net host to the server "
            f"(autopkgtest ... -- nsbuild --net host {shown(env)})")  # fmt: skip
