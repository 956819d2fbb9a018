"""nsbuild.net.launch: a sandbox run under a network plan, in real sandboxes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nsbuild import net
from nsbuild.net.launch import Launch, planned, run_under
from nsbuild.sandbox import Sandbox, caller_idmap, host_view, spawn

NAME_LOOKUP = "getent hosts example.org; echo status $?"


def _spec(*argv: str, env: tuple[tuple[str, str], ...] = ()) -> Sandbox:
    return Sandbox(argv=argv, idmap=caller_idmap(), mounts=host_view(), env=env)


def _output(path: Path) -> str:
    return path.read_text(errors="replace")


def test_planned_adds_the_plans_network_and_its_variables_win() -> None:
    opts = net.NetOptions(mode="allow", allow_from_env=False)
    spec = _spec("true", env=(("http_proxy", "mine"), ("KEEP", "1")))
    with net.network(opts) as plan:
        got = planned(spec, plan)
    assert got.inside_sockets == plan.inside_sockets and not got.share_net
    assert got.mounts == (*spec.mounts, *plan.mounts)
    assert dict(got.env)["http_proxy"] == dict(plan.env)["http_proxy"]
    assert dict(got.env)["KEEP"] == "1"
    assert len(got.env) == len(dict(got.env))


@pytest.mark.userns
def test_run_under_serves_the_plan_and_gives_the_status(tmp_path: Path) -> None:
    log, out = tmp_path / "net.jsonl", tmp_path / "out"
    with open(out, "wb") as f, \
            net.network(net.NetOptions(mode="none", log_path=str(log))) as plan:  # fmt: skip
        status = run_under(plan, _spec("sh", "-c", f"{NAME_LOOKUP}; exit 3"),
                           stdout=f.fileno(), stderr=f.fileno())  # fmt: skip
        records = plan.records()
    assert status == 3, _output(out)
    # The DNS responder of --net none answered (a refusal), and logged the name.
    assert "status 2" in _output(out)
    assert {r["host"] for r in records} == {"example.org"}


@pytest.mark.userns
def test_a_command_that_cannot_run_is_named_on_its_stderr(tmp_path: Path) -> None:
    err = tmp_path / "err"
    with open(err, "wb") as f, net.network(net.NetOptions(mode="none")) as plan:
        status = run_under(plan, _spec("no-such-command-xyz"), stderr=f.fileno())
    assert status != 0
    assert _output(err) == "nsbuild: no-such-command-xyz: command not found\n"


@pytest.mark.userns
def test_a_failure_in_the_block_kills_the_sandbox_and_closes_its_sockets() -> None:
    with net.network(net.NetOptions(mode="none")) as plan:
        spec = planned(_spec("sleep", "600"), plan)
        with pytest.raises(RuntimeError), Launch(plan, lambda: spawn(spec)) as proc:
            raise RuntimeError("the caller failed")
        assert proc.returncode is not None  # killed and waited for
        assert proc.sockets and all(s.fileno() == -1 for s in proc.sockets)
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)
