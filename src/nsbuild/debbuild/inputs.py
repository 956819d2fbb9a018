"""What a build starts from, checked on the host before any environment is
used: the source package (a .dsc, or a tree made into one), --out, the
--extra-package files, and the build's private work folder."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsbuild.backends.base import CopyRefused, open_regular
from nsbuild.debbuild.dsc import SourcePackage, load_dsc
from nsbuild.debbuild.errors import BuildInputError
from nsbuild.debbuild.result import BuildRequest
from nsbuild.debbuild.srctree import source_from_tree

# The largest extra package taken (the largest .debs are a few GiB).
MAX_EXTRA = 8 << 30


@dataclass(frozen=True)
class Inputs:
    pkg: SourcePackage
    out: Path  # absolute; made only when the build succeeded
    extras: tuple[Path, ...]  # private copies of the --extra-package files


def check_inputs(req: BuildRequest, tmp: Path) -> Inputs:
    """The request's inputs, checked, with private copies in `tmp`."""
    src = req.input
    if src.is_dir():
        made = tmp / "source"
        made.mkdir()
        pkg = source_from_tree(src, made)
        default_out = src.absolute().parent
    else:
        # The build copies in what load_dsc checked, not whatever stands
        # next to the .dsc by then: that folder may be the package author's.
        checked = tmp / "checked"
        checked.mkdir()
        pkg = load_dsc(src, keep=checked)
        default_out = pkg.directory
    out = (req.out or default_out).absolute()
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"--out {out}: not a directory")
    if not (req.arch_any or req.arch_all or req.source):
        raise BuildInputError("nothing to build: give --arch-any, --arch-all or --source")
    extras = tmp / "extra"
    extras.mkdir()
    return Inputs(pkg, out, tuple(take_extra(extra, extras) for extra in req.extra_packages))


def take_extra(path: Path, folder: Path) -> Path:
    """A private copy, in `folder`, of the package the user named with
    --extra-package: the user's own path followed once, the file it leads to
    opened once (no link followed then), checked to be a regular file of
    bounded size and copied as it is read. The build gets this copy: the
    named file may be swapped (for a link to the user's home, say) once checked."""
    if not path.name.endswith((".deb", ".udeb")):
        raise BuildInputError(f"--extra-package {path}: not a .deb file")
    try:
        source = open_regular(path.resolve(), MAX_EXTRA)
    except CopyRefused as e:
        raise BuildInputError(f"--extra-package {path}: {e}") from None
    copy = folder / path.name
    try:
        with source, copy.open("xb") as out:
            left = os.fstat(source.fileno()).st_size
            while left >= 0 and (block := source.read(min(1 << 20, left + 1))):
                out.write(block)
                left -= len(block)
    except OSError as e:
        raise BuildInputError(f"--extra-package {path}: {e.strerror}") from None
    if left != 0:
        raise BuildInputError(f"--extra-package {path}: changed while it was read")
    return copy


def work_dir(stack: ExitStack) -> Path:
    """The build's private host directory (log in progress, results before they
    move to --out), removed when `stack` ends. It lives in nsbuild's cache under
    a name that says which process made it, so `nsbuild gc` removes it after a
    crash."""
    from nsbuild.envs.owner import tmp_name
    from nsbuild.envs.paths import builds_root
    from nsbuild.envs.remove import remove_tree

    # Under the cache's top, which no other user may walk into (builds_root
    # makes sure): the build directory, the session's and the results may
    # hold setuid files.
    root = builds_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_name()
    tmp.mkdir(mode=0o700)
    stack.callback(remove_tree, tmp)
    return tmp
