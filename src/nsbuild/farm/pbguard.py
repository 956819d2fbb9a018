"""Imported by a worker's buildbot.tac, in the worker's twistd: before each
connection to a master on this machine, the master's port must be held by
the master's user; to a master on TLS (`farm master --tls`), the master
must show the certificate the worker pinned (farm.tls).

A PB login proves the worker to the master, never the master to the worker,
and a worker reconnects by itself (every 10 s at most) whenever its master
is gone: any local user who binds the port meanwhile, or anyone on the way
to a master elsewhere, would be sent the worker's login and could run
commands as the worker's user.
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


def pinned(cert: str) -> Any:
    """TLS options trusting the PEM certificate in the file `cert` alone
    (no system authority, no host name: the certificate is the master's own)."""
    from pathlib import Path

    from twisted.internet.ssl import Certificate, CertificateOptions

    from nsbuild.farm.tls import read_cert

    return CertificateOptions(trustRoot=Certificate.loadPEM(read_cert(Path(cert)).encode()))


def guard(worker: Any, host: Any, port: Any, uid: int, cert: str | None = None) -> None:
    """Put the worker's connection behind OwnedEndpoint when the master is
    on this machine, and on TLS pinned to `cert` when one is given; a master
    elsewhere without a certificate is left as Buildbot made it."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import wrapClientTLS

    if not (isinstance(host, str) and isinstance(port, int)):
        return
    # However the master is spelled, if it is this machine the port is
    # checked, and the address checked is the one connected to.
    address = listeners.local_address(host)
    local = address is not None
    if not (local or cert):
        return
    services = [s for s in worker if isinstance(s, ClientService)]
    if len(services) != 1:
        raise FarmError("the worker has not the one connection nsbuild expects: "
                        "buildbot-worker changed")  # fmt: skip
    worker.removeService(services[0])  # added with addService: it has no .parent
    address = address or host.strip("[]")
    kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
    endpoint: Any = kind(reactor, address, port)
    if cert:
        endpoint = wrapClientTLS(pinned(cert), endpoint)
    if local:
        endpoint = OwnedEndpoint(endpoint, port, uid)
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
