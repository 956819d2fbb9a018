"""Install build dependencies: the trusted phase, where only apt and dpkg run.

apt runs with network `allow` (the environment's mirrors, and the hosts of
the extra repositories), or a cached dependency layer stands in for the
whole install. What apt downloads is shared with later builds only from
runs of apt alone, before any maintainer script.

The question asked of apt is sbuild's: the source's relations for what is
built, with --add-depends/--add-conflicts (-arch, -indep) appended, and
restriction formulas (`<!nocheck>`) read for the build profiles (-P).
A cross build asks it for the host architecture, as sbuild does: the host
architecture added to dpkg, `apt-get -a HOST`, and the cross core
dependencies (cross.core_depends); `:native` and Multi-Arch are apt's.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsbuild.backends import Network
from nsbuild.debbuild import apt, extrarepo
from nsbuild.debbuild.cache import DepCache, answer_key, layer_key
from nsbuild.debbuild.collect import sha256_file
from nsbuild.debbuild.cross import Arches, core_depends
from nsbuild.debbuild.dsc import SourcePackage
from nsbuild.debbuild.errors import UnsatisfiableDependencies
from nsbuild.debbuild.layers import PendingLayer, use_layer
from nsbuild.debbuild.result import BuildRequest, LayerUse
from nsbuild.debbuild.steps import Steps
from nsbuild.errors import NsbuildError


@dataclass
class Installed:
    """What the phase leaves to the rest of the build."""

    seconds: float = 0.0  # the Install-Time of the log; 0 when nothing was installed
    layer: LayerUse | None = None
    pending: PendingLayer | None = None  # a layer to publish when the build ends


@dataclass
class DepsPhase:
    steps: Steps
    req: BuildRequest
    pkg: SourcePackage
    arch: Arches
    extras: tuple[Path, ...]  # private copies of the --extra-package files
    environment: str
    say: Callable[[str], None]  # a progress line

    def run(self, stack: ExitStack) -> Installed:
        log = self.steps.log
        backend = self.steps.backend
        log.section("Install package build dependencies")
        start = time.monotonic()
        caps = backend.capabilities
        if not caps.root_inside:
            log.line("Warning: the backend has no root inside; build dependencies not installed")
            return Installed()
        deps, conflicts = self._relations()
        log.line(f"Build-Depends: {deps}")
        if conflicts:
            log.line(f"Build-Conflicts: {conflicts}")
        if self.req.profiles:
            log.line(f"Build profiles: {' '.join(self.req.profiles)}")
        network: Network = "allow" if caps.network_per_phase else "host"
        if self.arch.cross:
            log.line(f"Host architecture: {self.arch.host} (build architecture {self.arch.build})")
            # Before apt reads its lists: it fetches those of dpkg's architectures.
            add = ["dpkg", "--add-architecture", self.arch.host]
            if self.steps.run(add) != 0:
                raise NsbuildError(f"cannot add the architecture {self.arch.host} to dpkg; "
                                   "see the log")  # fmt: skip
        # What the layer keys must cover besides apt's answer.
        identity = [f"profiles {','.join(self.req.profiles)}"] if self.req.profiles else []
        if self.req.extra_repositories:
            identity += self._extra_repositories(stack)
        # Without Generate=false, update deletes and rebuilds apt's caches even
        # when no list changed; the next apt run checks them against the lists
        # and rebuilds them only if they are stale.
        update = ["apt-get", *apt.APT_OPTS, "-o", "pkgCacheFile::Generate=false", "update"]
        status = self.steps.run(update, network=network, env=apt.APT_ENV)
        if status != 0:
            raise UnsatisfiableDependencies(self.steps.failure("apt-get update", status, "E: "))
        # Only apt has run in the session so far: its package lists may go
        # to the environment's shared cache.
        self._take_downloads()
        if self.req.extra_repositories:
            log.line("The apt caches are not updated: an extra repository's lists and "
                     "packages are for this build alone")  # fmt: skip
        satisfy = ["apt-get", *apt.APT_OPTS]
        if self.arch.cross:
            satisfy += ["-a", self.arch.host]
        if self.req.profiles:
            satisfy += ["-o", f"APT::Build-Profiles={','.join(self.req.profiles)}"]
        for p in self.extras:
            satisfy += ["--with-source", f"{backend.work_dir}/extra/{p.name}"]
        satisfy += ["satisfy", deps]
        if conflicts:
            satisfy.append(f"Conflicts: {conflicts}")
        base = backend.base_id()
        # A layer is reused on its key's word: the archive's packages it
        # names, as their signed archive made them. An extra package (or one
        # from a source apt does not check) is nobody's signed word, and its
        # maintainer scripts ran as root over the whole session: they may have
        # changed other packages' files, apt's configuration or keys, in ways
        # its checksum in the key does not pin (a script may act on the time,
        # on chance, on what it finds). Such a session is used once.
        layers = bool(caps.dependency_layers and base and self.req.use_cache)
        if layers and (self.req.extra_packages or apt.unchecked_sources(backend)):
            log.line(
                "No dependency layer is kept: an extra package, or an apt source or "
                "setting that lets unchecked packages in, puts unsigned packages in this session"
            )
            layers = False
        # An external command may have changed the session before apt ran (or,
        # through the exec escape, while it runs): a layer would keep that.
        touched = [s for s in ("pre-build", "chroot-setup") if self.req.commands_for(s)]
        if layers and touched:
            log.line(
                "No dependency layer is used or kept: external commands "
                f"({', '.join(f'--{s}-commands' for s in touched)}) may change the session"
            )
            layers = False
        if not layers or base is None:
            # No layer to look up or to store: apt installs at once, and is
            # asked what it would do only if that fails (to name what is unmet).
            self._install(satisfy, network)
            self._end_extra_repositories()
            return Installed(time.monotonic() - start)

        cache = DepCache()
        extra_sums = [sha256_file(p) for p in self.extras] + identity
        # apt's answer is a function of the question and of what it knows:
        # when both are as in an earlier build, so is the answer (its layer).
        status, lists = backend.check_output(["sh", "-c", apt.LISTS_STATE], network=network)
        question = (
            answer_key(base, self._arch_key(), satisfy, extra_sums, lists)
            if status == 0 and lists.strip()
            else None
        )
        known = cache.recall(question) if question else None
        if known and self._use(stack, cache, known, known=True):
            return Installed(time.monotonic() - start, LayerUse(known, cached=True))
        resolution = self._resolve(satisfy, network)
        log.line(f"Resolved: {len(resolution)} package actions")
        for line in resolution:
            log.line(f"  {line}")
        key = layer_key(base, self._arch_key(), resolution, extra_sums)
        if question:
            cache.remember(question, key)
        if self._use(stack, cache, key, known=False):
            return Installed(time.monotonic() - start, LayerUse(key, cached=True))
        self._install(satisfy, network)
        # Not in the layer: its key covers them, and the build goes without.
        self._end_extra_repositories()
        took = time.monotonic() - start
        meta: dict[str, object] = {
            "environment": self.environment,
            "base": base,
            "architecture": self.arch.build,
            "host_architecture": self.arch.host,
            "packages": resolution,
            "extra_packages": [p.name for p in self.extras],
            "profiles": list(self.req.profiles),
            "extra_repositories": list(self.req.extra_repositories),
        }
        pending = PendingLayer.keep(backend, cache, key, meta)
        stack.callback(pending.drop, backend)
        log.line(f"Kept dependency layer {key[:16]} (published when the build ends)")
        return Installed(took, LayerUse(key, cached=False), pending)

    def _relations(self) -> tuple[str, str]:
        """The build dependencies and conflicts of what is built, each with
        the request's additions appended (sbuild's --add-depends and kin)."""
        pkg, req = self.pkg, self.req
        deps = [*core_depends(self.arch), pkg.build_depends, *req.add_depends]
        conflicts = [pkg.build_conflicts, *req.add_conflicts]
        if req.arch_any:
            deps += [pkg.build_depends_arch, *req.add_depends_arch]
            conflicts += [pkg.build_conflicts_arch, *req.add_conflicts_arch]
        if req.arch_all:
            deps += [pkg.build_depends_indep, *req.add_depends_indep]
            conflicts += [pkg.build_conflicts_indep, *req.add_conflicts_indep]
        return ", ".join(filter(None, deps)), ", ".join(filter(None, conflicts))

    def _arch_key(self) -> str:
        """The architectures the keys name: a native build's as before, a
        cross build's both (its layer holds the host's packages)."""
        return f"{self.arch.build} host {self.arch.host}" if self.arch.cross else self.arch.build

    def _extra_repositories(self, stack: ExitStack) -> list[str]:
        """Put the extra repositories' source entry and keys in the session,
        from what was checked on the host; what the layer keys must cover."""
        repos = [extrarepo.parse(line) for line in self.req.extra_repositories]
        keys = extrarepo.keys(self.req)
        log, backend = self.steps.log, self.steps.backend
        text = extrarepo.sources(repos, keys)
        log.line(f"Extra repositories ({extrarepo.SOURCES}):")
        for line in text.splitlines():
            log.line(f"  {line}")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nsbuild-extra-")))
        for key in keys:
            (tmp / key.name).write_bytes(key.data)
            backend.copy_in(tmp / key.name, f"{extrarepo.KEYRINGS}/{key.name}",
                            limit=len(key.data))  # fmt: skip
        name = Path(extrarepo.SOURCES).name
        (tmp / name).write_text(text)
        backend.copy_in(tmp / name, extrarepo.SOURCES, limit=len(text.encode()))
        return extrarepo.identity(repos, keys)

    def _end_extra_repositories(self) -> None:
        """The extra repositories serve the dependency phase alone."""
        if not self.req.extra_repositories:
            return
        keys = [f"{extrarepo.KEYRINGS}/nsbuild-extra-{i}.{ext}"
                for i in range(1, len(self.req.extra_repository_keys) + 1)
                for ext in ("asc", "gpg")]  # fmt: skip
        if self.steps.run(["rm", "-f", "--", extrarepo.SOURCES, *keys]) != 0:
            raise NsbuildError("cannot remove the extra repositories from the session")

    def _use(self, stack: ExitStack, cache: DepCache, key: str, *, known: bool) -> bool:
        if not use_layer(stack, self.steps.backend, cache, key, self.steps.log, known):
            return False
        self.say(f"      using cached dependency layer {key[:16]}")
        return True

    def _install(self, satisfy: list[str], network: Network) -> None:
        self.steps.run(["sh", "-c", apt.MAN_DB_OFF])
        # Downloads first, in a run of apt alone, which checks each package
        # against the signed indexes: those may go to the shared cache. Then
        # dpkg runs the packages' maintainer scripts, and from then on
        # nothing of the session is taken (they could plant anything).
        download = [satisfy[0], "--download-only", *satisfy[1:]]
        if self.steps.run(download, network=network, env=apt.APT_ENV) == 0:
            self._take_downloads()
        status = self.steps.run(satisfy, network=network, env=apt.APT_ENV)
        if status != 0:
            # The resolver names the unmet dependencies.
            self._resolve(satisfy, network)
            raise UnsatisfiableDependencies(
                f"installing build dependencies failed (exit status {status}); see the log"
            )
        # No `apt-get clean`: the downloaded packages are in the apt cache
        # mount (kept for the next build), or in a session that is thrown away.

    def _take_downloads(self) -> None:
        # What an extra repository serves was checked against its own key
        # alone: in the environment's shared cache, a package of an archive
        # package's name and size would stand in for it in later builds
        # (apt takes a cached .deb on its size), and its lists would vouch
        # for that in the next take. Commands that ran as root in the session
        # before apt (pre-build's %e, chroot-setup) may have planted lists,
        # sources or packages: nothing of such a session is shared either.
        if self.req.extra_repositories or any(
            self.req.commands_for(s) for s in ("pre-build", "chroot-setup")
        ):
            return
        for line in self.steps.backend.take_downloads():
            self.steps.log.line(line)

    def _resolve(self, satisfy: list[str], network: Network) -> list[str]:
        """apt's own answer to "what would satisfy these?", without installing.
        Unmet dependencies end the build (UnsatisfiableDependencies)."""
        argv = [satisfy[0], "-s", *satisfy[1:]]
        status, text = self.steps.ask(argv, env=apt.APT_ENV, network=network)
        unmet = apt.unmet(text)
        if status != 0 or unmet or "E: " in text:
            self.steps.log.write(text)
            if not unmet:
                unmet = [ln[3:] for ln in text.splitlines() if ln.startswith("E: ")]
            listing = "; ".join(unmet) or f"apt-get exit status {status}"
            raise UnsatisfiableDependencies(
                f"unsatisfiable build dependencies: {listing}", tuple(unmet)
            )
        return apt.actions(text)
