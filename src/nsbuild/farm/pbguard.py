"""Imported by a worker's buildbot.tac, in the worker's twistd: before each
connection to a master on this machine, the master's port must be held by
the master's user.

A PB login proves the worker to the master, never the master to the worker,
and a worker reconnects by itself (every 10 s at most) whenever its master
is gone: any local user who binds the port meanwhile would be sent the
worker's password and could run commands as the worker's user.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python import log
from zope.interface import implementer  # type: ignore[import-untyped]

from nsbuild.farm import listeners
from nsbuild.farm.errors import FarmError

MAX_DELAY = 10.0  # as create-worker's --maxdelay


@implementer(IStreamClientEndpoint)
class OwnedEndpoint:
    """A TCP endpoint that connects only while every listener on its port
    belongs to `uid`."""

    def __init__(self, inner: Any, port: int, uid: int) -> None:
        self.inner, self.port, self.uid = inner, port, uid

    def connect(self, factory: Any) -> Any:
        try:
            found = [x for x in listeners.listening() if x.port == self.port]
            for x in found:
                if x.uid != self.uid:
                    raise FarmError(f"the master's port {self.port} is held by uid {x.uid}, "
                                    f"not the master's user (uid {self.uid}): "
                                    "not connecting")  # fmt: skip
        except FarmError as e:
            log.msg(f"nsbuild farm: {e}")
            refused: Any = error.ConnectError
            return defer.fail(refused(string=str(e)))
        return self.inner.connect(factory)


def guard(worker: Any, host: Any, port: Any, uid: int) -> None:
    """Put the worker's connection to a master on this machine behind
    OwnedEndpoint; a master elsewhere is left as it is."""
    from twisted.internet import reactor

    if not (isinstance(host, str) and isinstance(port, int) and listeners.is_local(host)):
        return
    services = [s for s in worker if isinstance(s, ClientService)]
    if len(services) != 1:
        raise FarmError("the worker has not the one connection nsbuild expects: "
                        "buildbot-worker changed")  # fmt: skip
    worker.removeService(services[0])  # added with addService: it has no .parent
    # localhost: the IPv4 loopback, as the master listens on by default.
    address = "::1" if ":" in host else ("127.0.0.1" if host.lower() in listeners.LOCAL_NAMES
                                          else host)  # fmt: skip
    kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
    endpoint: Any = OwnedEndpoint(kind(reactor, address, port), port, uid)
    new: Any = ClientService(endpoint, worker.bf, retryPolicy=backoffPolicy(maxDelay=MAX_DELAY))
    worker.addService(new)
    worker.addService(_EndTimers(worker.bf))


class _EndTimers(Service):  # type: ignore[misc]
    """The worker's stop waits for its connection factory to say it is
    done, which it says only once a connection was tried; a worker that
    never got past the guard would wait for ever."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def stopService(self) -> Any:
        self.factory.stopTimers()
        stop: Any = Service.stopService
        return stop(self)
