"""A build's use of the dependency-layer store: build on a stored layer, or
keep the installed state as a new one and publish it when the build ends."""

from __future__ import annotations

import contextlib
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsbuild.backends import Backend
from nsbuild.debbuild.cache import DepCache, Syncer
from nsbuild.debbuild.log import BuildLog

ANSWER_KNOWN = "the same question on the same package lists as a build before"


def use_layer(
    stack: ExitStack, backend: Backend, cache: DepCache, key: str, log: BuildLog, known: bool
) -> bool:
    """Build on the stored layer `key`, if there is one (held until `stack`
    ends). `known`: found by the question asked, not by apt's answer, whose
    record the log then quotes."""
    layer = stack.enter_context(cache.use(key))
    if layer is None:
        return False
    backend.use_layer(layer.path)
    why = ANSWER_KNOWN if known else "same resolution"
    log.line(f"Using cached dependency layer {key[:16]} ({why}; {layer.path})")
    if known:
        with contextlib.suppress(OSError, ValueError, TypeError):
            packages = json.loads((layer.path.parent / "layer.json").read_text())["packages"]
            log.line(f"Resolved (as before): {len(packages)} package actions")
            for line in packages:
                log.line(f"  {line}")
    return True


@dataclass
class PendingLayer:
    """A layer this build kept, in its staging directory until published.

    The session ran with fsync off, so the layer's files may still be only in
    memory: a background syncfs writes them out while the package builds,
    and the layer is published under its key only after that, at the end of
    the build. Until then it serves this build from its staging directory,
    which gc leaves alone while we live and removes if we die."""

    cache: DepCache
    staging: Path
    key: str
    meta: dict[str, object]
    syncer: Syncer
    settled: bool = False  # published, or dropped

    @classmethod
    def keep(
        cls, backend: Backend, cache: DepCache, key: str, meta: dict[str, object]
    ) -> PendingLayer:
        """Set the session's installed state aside as a layer and build on it at once."""
        staging = cache.staging()
        try:
            backend.keep_layer(staging / "layer")
            backend.use_layer(staging / "layer")
            syncer = Syncer(staging)
        except BaseException:
            cache.discard(staging)
            raise
        return cls(cache, staging, key, meta, syncer)

    def publish(self, log: BuildLog) -> bool:
        """Publish the layer once its files are on disk; False if it was not
        stored. Runs when nothing runs inside any more: publishing moves the
        directory the session has as a lower."""
        self.settled = True
        try:
            took = self.syncer.wait()
        except OSError as e:
            log.line(f"Dependency layer {self.key[:16]} not stored: {e}")
            self.cache.discard(self.staging)
            return False
        if self.cache.commit(self.staging, self.key, self.meta) is None:
            # Another build stored the same layer first: that one serves.
            self.cache.discard(self.staging)
        log.line(f"Stored dependency layer {self.key[:16]} (written to disk in {took:.1f}s, "
                 "during the build)")  # fmt: skip
        return True

    def drop(self, backend: Backend) -> None:
        """An unpublished layer (interrupted build) goes with the build, once
        the session that has it as a lower is closed."""
        if self.settled:
            return
        self.settled = True
        with contextlib.suppress(OSError):
            self.syncer.wait()
        backend.close()
        self.cache.discard(self.staging)
