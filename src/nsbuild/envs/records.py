"""The JSON records nsbuild keeps in its cache, written private and read bounded.

session.json, overlay-probe.json, config-cache.json, the store's digest
records: nsbuild writes them, but each sits next to trees that code in a
sandbox shaped, and a record found there is read back as data, never
trusted to be what it should: it is opened without following a link and
without blocking (a FIFO never hangs a reader), and read only if it is a
regular file of at most MAX_RECORD bytes. A record that fails is one line
(`EnvError`), which callers either say or take as "not recorded".
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from nsbuild.envs.errors import EnvError
from nsbuild.envs.owner import tmp_name

# The largest record nsbuild writes is a config cache of a few hundred
# environments: far below this.
MAX_RECORD = 4 << 20

class UnreadableRecord(EnvError):
    """A record that is not what nsbuild writes; `why` says it in a few words."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.why = why


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if os.path.islink(path):
            raise EnvError("a symlink, not a record nsbuild wrote") from None
        raise EnvError(e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EnvError("not a regular file")
        if st.st_size > limit:
            raise EnvError(f"larger than {limit} bytes")
        data = os.read(fd, limit + 1)
        if len(data) > limit:  # it grew since the fstat
            raise EnvError(f"larger than {limit} bytes")
        return data
    except OSError as e:
        raise EnvError(e.strerror or str(e)) from None
    finally:
        os.close(fd)


def read_record(path: Path, limit: int = MAX_RECORD) -> Any:
    """The JSON value in the record at `path`. Raises UnreadableRecord saying,
    in one line, why it is not readable (missing, a link, not a regular
    file, too large, not JSON)."""
    try:
        data = _read_bytes(path, limit)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise EnvError(f"not valid JSON ({str(e)[:100]})") from None
    except EnvError as e:
        raise UnreadableRecord(path, str(e)) from None


def write_record(path: Path, value: object) -> None:
    """Write `value` as JSON to `path` (mode 0600), replacing it atomically.

    Made under a fresh name first (O_EXCL: never through a link someone
    left), then renamed over whatever `path` was."""
    tmp = path.with_name(f"{tmp_name()}.json")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
