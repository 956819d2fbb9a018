"""The network log: one record per attempt to reach the network, allowed or denied.

A record is a dict that becomes one JSON line in `--net-log FILE`:

    {"time": "2024-05-01T10:00:00.123Z", "engine": "proxy", "kind": "CONNECT",
     "host": "deb.debian.org", "port": 443, "decision": "allow",
     "rule": "deb.debian.org:80,443", "bytes_out": 517, "bytes_in": 40213}

`kind` is the HTTP method, "dns" (a name asked of the inside resolver) or the
transport ("tcp", "udp", ...) for the nftables engine. Thread-safe; the file
is written and flushed record by record so a crash loses nothing.
"""

from __future__ import annotations

import _thread  # threading's core: threading itself costs ~2 ms on every run
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class NetLog:
    def __init__(self, path: str | None = None) -> None:
        self._lock = _thread.allocate_lock()
        self._records: list[dict[str, Any]] = []
        self._path = path
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None
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
            self._records.append(record)
            if self._file is not None:
                import json

                try:
                    self._file.write(json.dumps(record, sort_keys=False) + "\n")
                    self._file.flush()
                except OSError as e:
                    self._failed(e)
        return record

    def _failed(self, e: OSError) -> None:
        """Stop writing the file; records stay in memory (the summary)."""
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
        with self._lock:
            return list(self._records)

    def denied_summary(self) -> str | None:
        """One line naming what was denied, or None when nothing was."""
        denied: dict[str, int] = {}
        for r in self.records():
            if r["decision"] == "allow":
                continue
            host = f"[{r['host']}]" if ":" in str(r["host"]) else str(r["host"])
            what = f"{host} (dns)" if r["kind"] == "dns" else f"{host}:{r['port']}"
            denied[what] = denied.get(what, 0) + 1
        if not denied:
            return None
        total = sum(denied.values())
        shown = sorted(denied, key=lambda k: -denied[k])
        listed = ", ".join(f"{k} x{denied[k]}" if denied[k] > 1 else k for k in shown[:5])
        if len(shown) > 5:
            listed += f", and {len(shown) - 5} more"
        noun = "attempt" if total == 1 else "attempts"
        return f"network: {total} {noun} denied: {listed}"

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                    self._file = None
                except OSError as e:
                    self._failed(e)
