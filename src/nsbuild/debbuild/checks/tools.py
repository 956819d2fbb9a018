"""A check's tools (lintian) installed in its session once, then kept as a
layer the way build dependencies are (cache.py, layers.py): the key covers
the environment's base, the architecture and what apt resolved, so a later
check on the same base and package lists installs and downloads nothing."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from nsbuild.backends import Network
from nsbuild.debbuild import apt
from nsbuild.debbuild.cache import DepCache, answer_key, layer_key
from nsbuild.debbuild.checks.session import CheckError
from nsbuild.debbuild.layers import PendingLayer, use_layer
from nsbuild.debbuild.result import LayerUse
from nsbuild.debbuild.steps import Steps


@dataclass
class Tools:
    """How the tools came to be in the session."""

    layer: LayerUse | None = None  # None: installed in the session alone (or already there)
    pending: PendingLayer | None = None  # a new layer, to publish once the session is closed

    def publish(self, steps: Steps) -> None:
        """Store the new layer, if any; only once nothing runs in the session."""
        pending, self.pending = self.pending, None
        if pending is not None and not pending.publish(steps.log):
            self.layer = None


def install_tools(
    stack: ExitStack, steps: Steps, packages: list[str], arch: str, environment: str,
    use_cache: bool,
) -> Tools:  # fmt: skip
    """Install `packages` (apt's names) as root with the environment's mirrors,
    or build on the layer an earlier check kept. Raises CheckError when apt fails."""
    backend, log = steps.backend, steps.log
    caps = backend.capabilities
    if not caps.root_inside:
        raise CheckError(f"cannot install {' '.join(packages)}: the backend has no root inside")
    query = ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\\n", *packages]
    with log.command_output() as err:  # "no packages found": the log's
        status, text = backend.check_output(query, stderr=err)
    if status == 0 and all(ln.startswith("ii") for ln in text.splitlines()):
        log.line(f"Already installed in the environment: {' '.join(packages)}")
        return Tools()
    network = apt_network(steps)
    apt_update(steps, network)
    install = ["apt-get", *apt.APT_OPTS, "install", *packages]
    base = backend.base_id()
    layers = bool(caps.dependency_layers and base and use_cache)
    if layers and apt.unchecked_sources(backend):
        log.line("No layer is kept: an apt source or setting lets unchecked packages in")
        layers = False
    if not layers or base is None:
        _install(steps, install, network)
        return Tools()
    cache = DepCache()
    status, lists = backend.check_output(["sh", "-c", apt.LISTS_STATE], network=network)
    question = answer_key(base, arch, install, [], lists) if status == 0 and lists.strip() else None
    known = cache.recall(question) if question else None
    if known and use_layer(stack, backend, cache, known, log, True):
        return Tools(LayerUse(known, cached=True))
    argv = [install[0], "-s", *install[1:]]
    status, text = steps.ask(argv, network=network, env=apt.APT_ENV)
    if status != 0:
        log.write(text)
        raise CheckError(f"apt cannot install {' '.join(packages)}; see the log")
    resolution = apt.actions(text)
    key = layer_key(base, arch, resolution)
    if question:
        cache.remember(question, key)
    if use_layer(stack, backend, cache, key, log, False):
        return Tools(LayerUse(key, cached=True))
    _install(steps, install, network)
    meta: dict[str, object] = {
        "environment": environment,
        "base": base,
        "architecture": arch,
        "packages": resolution,
        "extra_packages": [],
    }
    pending = PendingLayer.keep(backend, cache, key, meta)
    stack.callback(pending.drop, backend)
    log.line(f"Kept layer {key[:16]} for {' '.join(packages)} (published after the check)")
    return Tools(LayerUse(key, cached=False), pending)


def apt_network(steps: Steps) -> Network:
    """The environment's mirrors alone, where the backend can say so."""
    return "allow" if steps.backend.capabilities.network_per_phase else "host"


def apt_update(steps: Steps, network: Network) -> None:
    """apt's package lists, shared with the environment's later runs."""
    update = ["apt-get", *apt.APT_OPTS, "-o", "pkgCacheFile::Generate=false", "update"]
    if steps.run(update, network=network, env=apt.APT_ENV) != 0:
        raise CheckError("apt-get update failed; see the log")
    _take_downloads(steps)


def apt_install(steps: Steps, install: list[str], network: Network) -> int:
    """Run `apt-get ... install ...`; its exit status."""
    steps.run(["sh", "-c", apt.MAN_DB_OFF])
    # Downloads first, by apt alone (checked against the signed indexes):
    # those may go to the shared cache, before any maintainer script runs.
    download = [install[0], "--download-only", *install[1:]]
    if steps.run(download, network=network, env=apt.APT_ENV) == 0:
        _take_downloads(steps)
    return steps.run(install, network=network, env=apt.APT_ENV)


def _install(steps: Steps, install: list[str], network: Network) -> None:
    status = apt_install(steps, install, network)
    if status != 0:
        raise CheckError(f"installing {' '.join(install[len(apt.APT_OPTS) + 2:])} failed "
                         f"(exit status {status}); see the log")  # fmt: skip


def _take_downloads(steps: Steps) -> None:
    for line in steps.backend.take_downloads():
        steps.log.line(line)
