"""The network log: one record per attempt to reach the network, allowed or denied.

A record is a dict that becomes one JSON line in `--net-log FILE`:

    {"time": "2024-05-01T10:00:00.123Z", "engine": "proxy", "kind": "CONNECT",
     "host": "deb.debian.org", "port": 443, "decision": "allow",
     "rule": "deb.debian.org:80,443", "bytes_out": 517, "bytes_in": 40213}

`kind` is the HTTP method, "dns" (a name asked of the inside resolver) or the
transport ("tcp", "udp", ...) for the nftables engine. Thread-safe; the file
is written and flushed record by record so a crash loses nothing.

Names and counts come from inside the sandbox, which may send as many as it
likes: records stream to the file and are not kept, but for the first
MAX_RECORDS (`records()`); the summary counts attempts by (kind, host, port)
for the first MAX_NAMES of those and only counts the rest. Refused attempts
are written at LOG_RATE a second at most (they cost the sandbox nothing);
the rest are counted, and the file ends with a record of how many. The memory of
nsbuild's own process stays bounded whatever the sandbox does. The file
keeps each name as it came (JSON escapes control characters); what is
printed goes through `printable`.

The path may lie in a folder a sandbox could write (the working folder of
`nsbuild run` is bound writable), so a run may have left a link or a FIFO
there: the file is opened without following a symbolic link and without
blocking, and written only if it is a regular file of the user's with no
other name (or a character device, which no sandbox can make: /dev/null).
"""

from __future__ import annotations

import _thread  # threading's core: see the run path's import rule in cli/main.py
import os
import stat
import time

from nsbuild.net.errors import NetError
from nsbuild.printable import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

MAX_NAMES = 256  # distinct (kind, host, port) counted one by one
MAX_RECORDS = 1000  # records kept in memory for records()
MAX_TEXT = 256  # characters of a string field kept in memory (the file keeps all)
MAX_DROPPED_COUNTED = 1 << 16  # distinct names past MAX_NAMES counted exactly
SHOWN = 5  # names in the denied line
LOG_RATE, LOG_BURST = 100.0, 1000  # refused attempts written a second, and at once
# Attempts counted but not written one by one, as the denied line says them.
DNS_OVER_RATE = "DNS queries over the rate limit were neither answered nor logged one by one"
PACKETS_OVER_RATE = "packets over the log rate were refused and not logged one by one"
REFUSED_OVER_RATE = "refused attempts over the log rate were not logged one by one"

Key = tuple[bool, str, str, int]  # (denied, kind, host, port)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _clip(value: Any) -> Any:
    return value[:MAX_TEXT] if isinstance(value, str) else value


class TokenBucket:
    """take() is True at most `burst` times at once and `rate` times a second
    on average. Not thread-safe: the caller serialises."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class NetSummary:
    """Counts of attempts by (kind, host, port), bounded: the first MAX_NAMES
    distinct ones are counted by name, the rest only in number. Several runs'
    summaries add up with merge()."""

    def __init__(self) -> None:
        self.attempts = 0
        self.denied = 0
        self.counts: dict[Key, int] = {}
        # Denied attempts to names past the cap, and those names (as hashes:
        # a count, not the names), exact up to MAX_DROPPED_COUNTED of them.
        self.denied_unnamed = 0
        self._dropped: set[int] = set()
        self._dropped_more = False
        # Attempts not written to the file one by one (over a rate: a DNS
        # query unanswered, a packet refused unlogged), by what they were.
        self.unlogged: dict[str, int] = {}

    def count(self, denied: bool, kind: str, host: str, port: int, n: int = 1) -> None:
        self.attempts += n
        self.denied += n if denied else 0
        key = (denied, _clip(kind), _clip(host), port)
        if key in self.counts or len(self.counts) < MAX_NAMES:
            self.counts[key] = self.counts.get(key, 0) + n
        elif denied:
            self.denied_unnamed += n
            self._drop(hash(key))

    def _drop(self, h: int) -> None:
        if len(self._dropped) < MAX_DROPPED_COUNTED:
            self._dropped.add(h)
        elif h not in self._dropped:
            self._dropped_more = True

    @property
    def names_dropped(self) -> int:
        """Distinct denied names past the cap (at least this many, see dropped_exact)."""
        return len(self._dropped)

    @property
    def dropped_exact(self) -> bool:
        return not self._dropped_more

    def merge(self, other: NetSummary) -> NetSummary:
        """A new summary of both (the cap applies again)."""
        out = NetSummary()
        for part in (self, other):
            for (denied, kind, host, port), n in part.counts.items():
                out.count(denied, kind, host, port, n)
            out.attempts += part.attempts - sum(part.counts.values())
            out.denied += part.denied - sum(n for k, n in part.counts.items() if k[0])
            out.denied_unnamed += part.denied_unnamed
            for h in part._dropped:
                out._drop(h)
            out._dropped_more |= part._dropped_more
            for what, n in part.unlogged.items():
                out.unlogged[what] = out.unlogged.get(what, 0) + n
        return out

    def denied_line(self) -> str | None:
        """One line naming what was denied, escaped for a terminal; None when nothing was."""
        denied = {k: n for k, n in self.counts.items() if k[0]}
        if not self.denied:
            return None
        shown = sorted(denied, key=lambda k: -denied[k])
        parts = []
        for key in shown[:SHOWN]:
            n = denied[key]
            parts.append(_what(key) + (f" x{n}" if n > 1 else ""))
        listed = ", ".join(parts)
        more = len(shown) - SHOWN + self.names_dropped
        if more > 0:
            listed += f", and {more}{'' if self.dropped_exact else '+'} more"
        noun = "attempt" if self.denied == 1 else "attempts"
        line = f"network: {self.denied} {noun} denied: {listed}"
        if self.names_dropped:
            at_least = "" if self.dropped_exact else "over "
            line += (f" ({at_least}{self.names_dropped} more names past the first "
                     f"{MAX_NAMES} were not counted by name)")
        for what, n in self.unlogged.items():
            line += f"; {n} {what}"
        return line


def _what(key: Key) -> str:
    _, kind, host, port = key
    if kind == "invalid":
        return "a malformed request"
    shown = printable(host, 100)
    if kind == "dns":
        return f"{shown} (dns)"
    return f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"


_REFUSED = "nsbuild appends only to a regular file of yours that has no other name"
_OPEN_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
               | os.O_NONBLOCK | os.O_CLOEXEC)


def open_log(path: str) -> IO[str]:
    """`path` opened for appending, or NetError (one line) when it is not a
    file nsbuild may write: a symbolic link, a hard link, a FIFO, a socket, a
    folder or a file of someone else's."""
    import errno

    try:
        fd = os.open(path, _OPEN_FLAGS, 0o600)
    except OSError as e:
        why = {errno.ELOOP: "is a symbolic link",
               errno.ENXIO: "is a FIFO or socket"}.get(e.errno or 0, e.strerror or str(e))
        raise NetError(f"--net-log {path}: {why}; {_REFUSED}") from None
    try:
        _check_log(path, os.fstat(fd))
        os.set_blocking(fd, True)  # a terminal may make a write wait
        return open(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _check_log(path: str, st: os.stat_result) -> None:
    if stat.S_ISCHR(st.st_mode):
        return  # /dev/null, /dev/full, a terminal: a sandbox cannot make one
    if not stat.S_ISREG(st.st_mode):
        why = "is a FIFO" if stat.S_ISFIFO(st.st_mode) else "is not a regular file"
    elif st.st_uid != os.geteuid():
        why = f"is owned by uid {st.st_uid}, not by you"
    elif st.st_nlink != 1:
        why = f"is a hard link ({st.st_nlink} names for one file)"
    else:
        return
    raise NetError(f"--net-log {path}: {why}; {_REFUSED}")


class NetLog:
    def __init__(self, path: str | None = None) -> None:
        self._lock = _thread.allocate_lock()
        self._records: list[dict[str, Any]] = []
        self._summary = NetSummary()
        self._unlogged_as: dict[str, tuple[str, str, int]] = {}  # (engine, kind, port)
        self._refusals = TokenBucket(LOG_RATE, LOG_BURST)
        self._path = path
        self._file: IO[str] | None = open_log(path) if path else None
        # The first write that failed (a full disk): said once, at the end.
        self.error: str | None = None

    def add(
        self,
        *,
        engine: str,
        kind: str,
        host: str,
        port: int,
        decision: str,
        rule: str,
        bytes_out: int = 0,
        bytes_in: int = 0,
        **extra: Any,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": _now(),
            "engine": engine,
            "kind": kind,
            "host": host,
            "port": port,
            "decision": decision,
            "rule": rule,
            "bytes_out": bytes_out,
            "bytes_in": bytes_in,
        }
        record.update(extra)
        with self._lock:
            if decision != "allow" and not self._refusals.take():
                self._summary.count(True, kind, host, port)
                self._unlogged(engine, kind, port, REFUSED_OVER_RATE, 1)
                return record
            self._summary.count(decision != "allow", kind, host, port)
            if len(self._records) < MAX_RECORDS:
                self._records.append({k: _clip(v) for k, v in record.items()})
            self._write(record)
        return record

    def tally(self, *, engine: str, kind: str, host: str, port: int, decision: str,
              what: str) -> None:
        """Count an attempt that is not written one by one (a DNS query over
        the responder's rate: `what` says so in the denied line)."""
        with self._lock:
            self._summary.count(decision != "allow", kind, host, port)
            self._unlogged(engine, kind, port, what, 1)

    def refused_unlogged(self, n: int, *, engine: str, kind: str, what: str) -> None:
        """Count `n` refused attempts nobody saw one by one (packets over the
        log rate of the nftables engine, known from its counters)."""
        with self._lock:
            self._summary.attempts += n
            self._summary.denied += n
            self._unlogged(engine, kind, 0, what, n)

    def _unlogged(self, engine: str, kind: str, port: int, what: str, n: int) -> None:
        unlogged = self._summary.unlogged
        unlogged[what] = unlogged.get(what, 0) + n
        self._unlogged_as.setdefault(what, (engine, kind, port))

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        import json

        try:
            self._file.write(json.dumps(record, sort_keys=False) + "\n")
            self._file.flush()
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        """Stop writing the file; the summary goes on counting."""
        self.error = self.error or (f"--net-log {self._path}: {e.strerror or e} (the "
                                    "records from then on are not in the file, and its "
                                    "last line may be cut short)")
        file, self._file = self._file, None
        try:
            if file is not None:
                file.close()
        except OSError:
            pass  # what it could not flush is what failed

    def records(self) -> list[dict[str, Any]]:
        """The first MAX_RECORDS records (string fields cut to MAX_TEXT
        characters); the rest are in the file only."""
        with self._lock:
            return list(self._records)

    def summary(self) -> NetSummary:
        """A copy of the counts so far."""
        with self._lock:
            return NetSummary().merge(self._summary)

    def denied_summary(self) -> str | None:
        """One line naming what was denied (escaped for a terminal), or None."""
        return self.summary().denied_line()

    def close(self) -> None:
        with self._lock:
            # The file says how many attempts it holds no line for.
            for what, n in self._summary.unlogged.items():
                engine, kind, port = self._unlogged_as[what]
                self._write({"time": _now(), "engine": engine, "kind": kind, "host": "",
                             "port": port, "decision": "dropped", "rule": what,
                             "bytes_out": 0, "bytes_in": 0, "count": n})
            if self._file is not None:
                try:
                    self._file.close()
                    self._file = None
                except OSError as e:
                    self._failed(e)
