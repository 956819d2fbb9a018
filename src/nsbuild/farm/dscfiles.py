"""The files a .dsc names, for sending a source package with it. The names
are checked plain (a .dsc naming ../x is refused) and the .dsc is read
bounded; its checksums are checked by `nsbuild build` on the worker."""

from __future__ import annotations

from pathlib import Path

from nsbuild.farm.errors import FarmError
from nsbuild.farm.outcome import plain_name

DSC_LIMIT = 1 << 20


class DscError(FarmError):
    """A .dsc that cannot be sent: unreadable, too big, or naming odd files."""


def dsc_files(dsc: Path) -> list[str]:
    """The names of the files `dsc` lists (Files, Checksums-Sha256)."""
    from debian.deb822 import Dsc

    from nsbuild.userfile import read_small

    try:
        # Not a plain open: a FIFO would block (in the master, its reactor).
        data = read_small(dsc, DSC_LIMIT)
    except OSError as e:
        raise DscError(f"cannot read {dsc}: {e.strerror}") from None
    except ValueError as e:
        raise DscError(f"{dsc}: {e}") from None
    doc = Dsc(data)
    names: list[str] = []
    for field in ("Files", "Checksums-Sha256"):
        for entry in doc.get(field) or []:
            name = entry.get("name", "")
            if not plain_name(name):
                raise DscError(f"{dsc}: names an odd file {name!r}")
            if name not in names:
                names.append(name)
    if not names:
        raise DscError(f"{dsc}: lists no files")
    return names
