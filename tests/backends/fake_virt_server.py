"""A misbehaving autopkgtest virt server, for fault injection only.

    fake_virt_server.py MODE STATE_DIR

It writes its own pid and that of a child it keeps (`sleep`, in its process
group, as real servers keep helpers) to STATE_DIR/pids, and every command it
receives to STATE_DIR/commands. Until MODE says otherwise it behaves like a
null server (commands run on the host, as the caller, in a scratch folder).

Modes:
    die-at-open      exits 3 when asked to open
    die-mid-copy     exits 3 on the first copydown
    garbage          answers `open` with a line that is not `ok`
    hang             never answers `open`, and ignores SIGTERM
    silent           never even greets
    false-exec       every command in the testbed fails (exit 1)
    huge-arch        every command in the testbed prints one name of 100 000 letters
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, unquote


def main() -> int:
    mode, state = sys.argv[1], Path(sys.argv[2])
    child = subprocess.Popen(["sleep", "1000"])
    (state / "pids").write_text(f"{os.getpid()}\n{child.pid}\n")
    commands = open(state / "commands", "a", buffering=1)
    if mode == "silent":
        _forever()
    print("ok", flush=True)
    scratch = state / "scratch"
    for line in sys.stdin:
        words = [unquote(w) for w in line.split()]
        if not words:
            continue
        commands.write(line)
        verb = words[0]
        if verb == "open":
            if mode == "die-at-open":
                print("fake server: crashing on open", file=sys.stderr, flush=True)
                return 3
            if mode == "garbage":
                print("this is not the protocol", flush=True)
                continue
            if mode == "hang":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                _forever()
            scratch.mkdir(exist_ok=True)
            print(f"ok {quote(str(scratch))}", flush=True)
        elif verb == "capabilities":
            print("ok isolation-machine", flush=True)
        elif verb == "print-execute-command":
            program = {"false-exec": ["/bin/false"],
                       "huge-arch": ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' a; echo"],
                       }.get(mode, ["env"])  # fmt: skip
            print("ok " + ",".join(quote(p) for p in program), flush=True)
        elif verb == "copydown":
            if mode == "die-mid-copy":
                print("fake server: crashing mid-copy", file=sys.stderr, flush=True)
                return 3
            shutil.copy(words[1], words[2])
            print("ok", flush=True)
        elif verb == "copyup":
            shutil.copy(words[1], words[2])
            print("ok", flush=True)
        elif verb == "close":
            shutil.rmtree(scratch, ignore_errors=True)
            print("ok", flush=True)
        elif verb == "quit":
            print("ok", flush=True)
            child.kill()
            return 0
        else:
            print(f"unknown command {verb}", flush=True)
    return 1


def _forever() -> None:
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
