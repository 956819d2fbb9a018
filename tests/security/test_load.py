"""Load: 8 sandboxed runs and 4 package builds at once on a 2-core machine.
All succeed, each isolated from the others (files, ports, processes), and the
host keeps answering (a host-side server serves a request during the load)."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from security_helpers import NSBUILD, EnvHome, explain, tiny_package
from waiting import HANG_GUARD

pytestmark = [pytest.mark.userns, pytest.mark.slow]

RUNS = 8
BUILDS = 4

# Each run: listen on the same fixed port, leave a file in its own /tmp, say
# so, and wait until every run has (the test says go); then connect to its own
# port, which only itself can answer, and report what it sees of the others
# (processes, files).
RUN = r"""
import json, os, socket, sys
me = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8000)); s.listen(1)
open(f"/tmp/{me}", "w").write(me)
print("up", flush=True)
assert sys.stdin.readline() == "go\n"
c = socket.create_connection(("127.0.0.1", 8000)); peer, _ = s.accept()
c.sendall(me.encode()); got = peer.recv(64).decode()
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print(json.dumps({"port": got, "tmp": sorted(os.listdir("/tmp")), "pids": len(pids)}))
"""


def test_eight_runs_and_four_builds_at_once(tmp_path: Path, env_home: EnvHome) -> None:
    builds = []
    for n in range(BUILDS):
        tree = tiny_package(tmp_path / f"b{n}", f"nsbload{n}")
        out = tmp_path / f"out{n}"
        argv = [*NSBUILD, "build", "--env", "bookworm", "--out", str(out), str(tree)]
        builds.append((subprocess.Popen(argv, env=env_home.vars(), cwd=tmp_path,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True), out, n))
    runs = []
    for n in range(RUNS):
        argv = [*NSBUILD, "run", "--", "/usr/bin/python3", "-c", RUN, f"run{n}"]
        runs.append(subprocess.Popen(argv, env=env_home.vars(), cwd=tmp_path,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.PIPE, text=True))
    # All runs are up at once, each with its file and its port, before any
    # looks at the others.
    for proc in runs:
        assert proc.stdout is not None
        if proc.stdout.readline() != "up\n":
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(explain(subprocess.CompletedProcess(proc.args, proc.returncode,
                                                                     out, err)))

    # The host stays usable: a host-side server answers while all of that runs.
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(url, timeout=HANG_GUARD) as reply:
            assert reply.status == 200
    finally:
        server.shutdown()

    for n, proc in enumerate(runs):
        out, err = proc.communicate("go\n", timeout=HANG_GUARD)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert proc.returncode == 0, explain(r)
        seen = json.loads(out)
        # Its own port answered with its own name; only its own file; only
        # its own processes (init and python).
        assert seen["port"] == f"run{n}", explain(r)
        assert [f for f in seen["tmp"] if f.startswith("run")] == [f"run{n}"], explain(r)
        assert seen["pids"] <= 2, explain(r)
    for proc, out_dir, n in builds:
        out, err = proc.communicate(timeout=HANG_GUARD)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert proc.returncode == 0, explain(r)
        assert (out_dir / f"nsbload{n}_1.0_all.deb").is_file()
        assert not any(f"nsbload{m}" in p.name for m in range(BUILDS) if m != n
                       for p in out_dir.iterdir())
