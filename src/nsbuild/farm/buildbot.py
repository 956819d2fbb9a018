"""nsbuild for a Buildbot master.cfg: a build factory, builders per
environment and architecture, the force scheduler `nsbuild farm submit`
uses, and the whole configuration `nsbuild farm master` writes.

In a master.cfg of your own:

    from nsbuild.farm.buildbot import builder, force_scheduler
    c["builders"] = [builder("bookworm/amd64", ["w1", "w2"])]
    c["schedulers"] = [force_scheduler(c["builders"])]
    c["collapseRequests"] = False   # else queued builds of one builder merge

A build's properties: `dsc`, a .dsc under the master's sources/ (it and its
files are sent to the worker), or `source`, `name[=version]` fetched by
apt-get source in the worker's environment. What it sets: nsbuild_status
(built, failed, dep-wait, error), nsbuild_package, nsbuild_version,
nsbuild_unmet (dep-wait), nsbuild_results (its folder under the master's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from buildbot.plugins import schedulers, steps, util, worker

from nsbuild.farm import settings, tls
from nsbuild.farm.steps import LOG_FILE, OUT, SRC, FetchSource, NsbuildBuild

BUILD_WORKDIR = "build"  # Buildbot's default: WORKER/BUILDER/build


def factory(env: str) -> util.BuildFactory:
    """The steps of one build in environment `env` (its name on the workers)."""
    f = util.BuildFactory()
    # The workdir is kept between builds: start from nothing (the worker
    # would take an older build's log file for this one's). One step, not
    # one per folder: each step costs the build a round trip and writes.
    f.addStep(steps.ShellCommand(command=["sh", "-c", f"rm -rf -- {SRC} {OUT} {LOG_FILE} "
                                                      f"&& mkdir {SRC}"],
                                 workdir=BUILD_WORKDIR, name="clean", haltOnFailure=True,
                                 logEnviron=False))  # fmt: skip
    f.addStep(FetchSource(env, haltOnFailure=True))
    f.addStep(NsbuildBuild(env))
    return f


def _can_start(pair: str) -> Any:
    """A worker runs a builder's builds only if it said, when it connected,
    that it has the environment (its info/nsbuild-envs)."""

    def check(_builder: Any, wfb: Any, _request: Any) -> bool:
        said = wfb.worker.info.getProperty("nsbuild-envs") if wfb.worker else None
        return isinstance(said, str) and pair in said.split()

    return check


def builder(pair: str, workernames: list[str]) -> util.BuilderConfig:
    """The builder of ENV/ARCH, named ENV-ARCH, on these workers."""
    env, arch = pair.split("/")
    return util.BuilderConfig(
        name=settings.builder_name(pair), workernames=workernames, factory=factory(env),
        canStartBuild=_can_start(pair), tags=settings.builder_tags(pair),
        properties={"nsbuild_env": env, "nsbuild_arch": arch},
    )  # fmt: skip


def force_scheduler(builders: list[util.BuilderConfig], name: str = "build") -> Any:
    """A force scheduler for these builders; each build takes the property
    `dsc` or `source` (see the module's text), nothing of version control."""
    fixed = {k: util.FixedParameter(k, "") for k in ("branch", "revision", "repository",
                                                      "project")}  # fmt: skip
    return schedulers.ForceScheduler(
        name=name, builderNames=[b.name for b in builders], buttonName="Build",
        codebases=[util.CodebaseParameter("", hide=True, **fixed)],
        properties=[
            util.StringParameter("dsc", label="a .dsc under the master's sources/", default=""),
            util.StringParameter("source", label="or name[=version] from the archive",
                                 default=""),
        ],
    )  # fmt: skip


def web_login(password: str) -> dict[str, Any]:
    """Anyone who reaches the web port may read; starting, stopping and
    cancelling builds (Buildbot's control endpoints) needs the login
    settings.WEB_USER with `password`."""
    return {
        "auth": util.UserPasswordAuth({settings.WEB_USER: password}),
        "authz": util.Authz(
            allowRules=[util.AnyControlEndpointMatcher(role="builders")],
            roleMatchers=[util.RolesFromUsername(roles=["builders"],
                                                 usernames=[settings.WEB_USER])],
        ),
    }  # fmt: skip


class NsbuildWorker(worker.Worker):  # type: ignore[misc]
    """Buildbot keeps a worker idle after a build that ended EXCEPTION (10 s,
    doubling up to an hour), taking it for the worker's fault. A build's
    error here is mostly its input's (buildd's error: a name the archive
    lacks, a .dsc the master lacks): a rebuild list with a few of those in
    a row would idle its workers for minutes. A short pause stays."""

    quarantine_initial_timeout = quarantine_max_timeout = 5


def master_config(basedir: str | os.PathLike[str]) -> dict[str, Any]:
    """The configuration of a master `nsbuild farm master` made: its settings
    and its workers read from the files in `basedir`."""
    base = Path(basedir)
    s = settings.master_settings(base)

    def port(number: int, address: str) -> str:
        # A strports description: ":" of an IPv6 address escaped; on TLS
        # (`farm master --tls`), with the master's own key.
        escaped = address.replace(":", "\\:")
        description = f"tcp:{number}:interface={escaped}"
        return tls.strport(description, base) if s.tls else description

    entries = settings.workers(base)
    pairs = settings.builder_pairs(entries)
    builders = [builder(p, [w.name for w in entries if p in w.envs]) for p in pairs]
    c: dict[str, Any] = {
        "title": "nsbuild farm",
        "titleURL": s.url,
        "buildbotURL": s.url,
        # Buildbot's default sends usage figures to buildbot.net.
        "buildbotNetUsageData": None,
        "db": {"db_url": "sqlite:///state.sqlite"},
        "protocols": {"pb": {"port": port(s.pb_port, s.pb_address)}},
        "www": {"port": port(s.www_port, s.interface),
                "plugins": {"waterfall_view": {}, "console_view": {}, "grid_view": {}},
                **web_login(s.password)},
        # Buildbot merges queued requests of a builder by default, whatever
        # their properties: each submitted package must build.
        "collapseRequests": False,
        "workers": [NsbuildWorker(w.name, w.password, max_builds=1) for w in entries],
        "builders": builders,
        "schedulers": [force_scheduler(builders)] if builders else [],
    }
    if not entries:
        # Buildbot refuses a configuration without workers or builders,
        # except for a master of several; a new farm has none yet.
        c["multiMaster"] = True
    return c
