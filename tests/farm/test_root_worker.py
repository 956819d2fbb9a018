"""A farm worker run as root: refused without --as-root; with it, its builds
take the kernel firewall (`--egress-engine nftables`), the firewall seed 000
built by hand for pbuilder on Buildbot. The master runs as root too: a
worker connects only to a master port its own user holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from debbuild.conftest import make_package
from inputs import bookworm_config
from waiting import wait_for

from .conftest import dsc_of, free_port, table_rows

pytestmark = [pytest.mark.root, pytest.mark.slow]


@dataclass
class RootFarm:
    top: Path
    vars: dict[str, str]
    pb_port: int
    url: str

    def nsbuild(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nsbuild", *args], env=self.vars, cwd="/",
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip

    def connected(self) -> list[str]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}api/v2/workers?field=name&field=connected_to",
                                    timeout=30) as r:  # fmt: skip
            found = json.loads(r.read())
        return sorted(w["name"] for w in found["workers"] if w["connected_to"])


@pytest.fixture
def root_farm() -> Iterator[RootFarm]:
    if os.geteuid() != 0:
        pytest.skip("a root worker is root's (marker root)")
    # Not pytest's tmp_path: for root that is below a 0700 folder, which the
    # subordinate ids of the builds cannot walk.
    top = Path(tempfile.mkdtemp(prefix="nsbuild-root-farm-", dir="/var/tmp"))
    top.chmod(0o755)
    bookworm_config(top / "config")
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(top / "config")
    env["XDG_CACHE_HOME"] = str(top / "cache")
    www = free_port()
    farm = RootFarm(top, env, free_port(), f"http://127.0.0.1:{www}/")
    try:
        made = farm.nsbuild("farm", "master", str(top / "master"), "--port-www", str(www),
                            "--port-pb", str(farm.pb_port))  # fmt: skip
        assert made.returncode == 0, made.stderr
        yield farm
    finally:
        for folder in ("worker", "master"):
            if (top / folder).exists():
                farm.nsbuild("farm", "stop", str(top / folder))
        subprocess.run([sys.executable, "-m", "nsbuild", "gc"], env=env, capture_output=True)
        from nsbuild.envs.remove import remove_tree

        remove_tree(top)


def test_a_root_workers_builds_go_through_the_kernel_firewall(root_farm: RootFarm) -> None:
    worker = root_farm.top / "worker"
    args = ("farm", "worker", str(worker), "--master", f"127.0.0.1:{root_farm.pb_port}",
            "--name", "r1")  # fmt: skip
    refused = root_farm.nsbuild(*args)
    assert refused.returncode == 2 and "--as-root" in refused.stderr, refused.stderr
    assert not worker.exists()
    made = root_farm.nsbuild(*args, "--as-root")
    assert made.returncode == 0, made.stderr
    assert (worker / "info" / "nsbuild-egress-engine").read_text() == "nftables\n"
    wait_for(lambda: root_farm.connected() == ["r1"], "the root worker connected")

    # bc comes from the mirror in the dependency phase.
    tree = make_package(root_farm.top / "src", "nsb-root-farm", build_depends="bc")
    for path in (root_farm.top / "src", *(root_farm.top / "src").rglob("*")):
        path.chmod(0o755 if path.is_dir() or path.name == "rules" else 0o644)
    out = root_farm.top / "out"
    done = root_farm.nsbuild("farm", "submit", str(dsc_of(tree)), "--wait", "--out", str(out))
    summaries = sorted((root_farm.top / "master" / "results").rglob("summary.json"))
    assert done.returncode == 0, [p.read_text()[:2000] for p in summaries]
    assert table_rows(done.stdout)["nsb-root-farm"][1:3] == ["r1", "built"]
    log = (out / "nsb-root-farm_1.0_amd64.build").read_text()
    assert "egress engine nftables" in log, log[:1500]
    assert "Unpacking bc " in log
    netlog = out / "nsb-root-farm_1.0_amd64.network.jsonl"
    records = [json.loads(line) for line in netlog.read_text().splitlines()]
    assert records and {r["engine"] for r in records} == {"nftables"}
    assert any(r["decision"] == "allow" and r["bytes_in"] > 0 for r in records), records
