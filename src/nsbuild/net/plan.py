"""`network(opts)`: turn NetOptions into what the sandbox needs, and serve it.

    with network(opts, mirrors=env_mirrors) as plan:
        spec = Sandbox(..., share_net=plan.share_net, inside_sockets=plan.inside_sockets,
                       mounts=base_mounts + plan.mounts, env=base_env + plan.env,
                       cgroup=plan.cgroup)
        proc = spawn(spec)
        plan.serve(proc.sockets)        # right after spawn; background threads
        status = proc.wait()
    print(plan.denied_summary())        # when not None (escaped for a terminal)

Inside sockets replace the issue's "Unix socket bound into the sandbox": the
runtime creates the proxy's listening socket and the DNS socket inside the
sandbox's own network namespace and hands them over; the host side accepts
on them and connects out from the host namespace. No relay process runs
inside and no path socket is bound in.
"""

from __future__ import annotations

from nsbuild.net.errors import NetError
from nsbuild.net.netlog import NetLog
from nsbuild.sandbox.spec import File, InsideSocket

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable, Generator, Sequence
    from types import TracebackType
    from typing import Any

    from nsbuild.net.allowlist import Allowlist
    from nsbuild.net.netlog import NetSummary
    from nsbuild.net.options import NetOptions
    from nsbuild.sandbox.spec import Mount

PROXY_PORT = 3128  # inside the sandbox's own namespace: no clash possible
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
RESOLV_CONF = File("/etc/resolv.conf", b"nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")


class NetPlan:
    """What the caller copies into the Sandbox, and the host-side services."""

    def __init__(
        self,
        log: NetLog,
        *,
        share_net: bool = False,
        inside_sockets: tuple[InsideSocket, ...] = (),
        mounts: tuple[Mount, ...] = (),
        env: tuple[tuple[str, str], ...] = (),
        cgroup: str | None = None,
    ) -> None:
        self.share_net = share_net
        self.inside_sockets = inside_sockets
        self.mounts = mounts
        self.env = env
        self.cgroup = cgroup
        self._log = log
        self._services: list[Any] = []
        # One service per inside socket that needs one: (index into the
        # inside sockets, what makes the service from that socket).
        self._service_for: list[tuple[int, Callable[[_socket.socket], Any]]] = []
        self._serving = False

    def serve(self, sockets: list[_socket.socket]) -> None:
        """Serve the inside sockets (proc.sockets, in inside_sockets order),
        each from a thread of its own."""
        if self._serving or not self._service_for:
            return
        if len(sockets) < len(self.inside_sockets):
            raise NetError(
                f"expected {len(self.inside_sockets)} inside sockets, got {len(sockets)}"
            )
        self._serving = True
        for index, make in self._service_for:
            sock = sockets[index]
            try:
                service = make(sock)
                service.start()
            except BaseException:
                sock.close()
                raise
            self._services.append(service)  # stop() stops only what started

    def stop(self) -> None:
        services, self._services = self._services, []
        for service in services:
            service.stop()

    def denied_summary(self) -> str | None:
        return self._log.denied_summary()

    def log_error(self) -> str | None:
        """Why the network log file lost records (once the plan is closed), or None."""
        return self._log.error

    def records(self) -> list[dict[str, Any]]:
        """The first netlog.MAX_RECORDS records of this run (the file has all)."""
        return self._log.records()

    def summary(self) -> NetSummary:
        """Counts of this run's attempts, bounded whatever the sandbox did; add
        several runs' with NetSummary.merge, print with denied_line()."""
        return self._log.summary()


class Network:
    """Context manager: enter -> NetPlan (nothing runs yet); exit -> stop serving,
    remove the nftables table and cgroup, close the network log."""

    def __init__(self, opts: NetOptions, *, mirrors: Sequence[str] = (),
                 trusted_mirrors: Sequence[str] = (), debug: bool = False):
        self._opts = opts
        self._mirrors = tuple(mirrors)
        self._trusted_mirrors = tuple(trusted_mirrors)
        self._debug = debug
        self._log: NetLog | None = None
        self._plan: NetPlan | None = None
        self._engine: Generator[tuple[str, File], None, None] | None = None

    def __enter__(self) -> NetPlan:
        opts = self._opts
        # Validate before anything is opened or started.
        allowlist = (_allowlist(opts, self._mirrors, self._trusted_mirrors)
                     if opts.mode == "allow" else None)
        log = self._log = NetLog(opts.log_path)
        try:
            if opts.mode == "host":
                self._plan = NetPlan(log, share_net=True)
            elif opts.mode == "none":
                self._plan = _none_plan(log)
            elif opts.engine == "proxy":
                assert allowlist is not None
                self._plan = _proxy_plan(allowlist, log)
            else:
                from nsbuild.net.nftables_engine import nftables_engine

                assert allowlist is not None
                self._engine = nftables_engine(allowlist, log, self._debug)
                cgroup, hosts = next(self._engine)
                self._plan = NetPlan(log, share_net=True, cgroup=cgroup, mounts=(hosts,))
        except BaseException:
            log.close()
            raise
        return self._plan

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._plan is not None:
                self._plan.stop()
            if self._engine is not None:
                self._engine.close() if exc is not None else next(self._engine, None)
        finally:
            if self._log is not None:
                self._log.close()


def _none_plan(log: NetLog) -> NetPlan:
    plan = NetPlan(
        log,
        inside_sockets=(InsideSocket("udp", "127.0.0.1", 53),),
        mounts=(RESOLV_CONF,),
    )

    def dns(sock: _socket.socket) -> Any:
        from nsbuild.net.dns import DnsResponder

        return DnsResponder(sock, log, "--net none: no network")

    plan._service_for = [(0, dns)]
    return plan


def _allowlist(opts: NetOptions, mirrors: Sequence[str],
               trusted_mirrors: Sequence[str]) -> Allowlist:
    """--allow, then the trusted mirrors (the environment's Mirror:, the
    user's own), then the rest (apt sources read from a root a sandbox may
    have written: global addresses only). The first rule that matches wins."""
    from nsbuild.net.allowlist import Allowlist, rule_from_url

    allowlist = opts.allowlist or Allowlist(())
    if opts.allow_from_env:
        if not mirrors and not trusted_mirrors:
            raise NetError("--allow-from-env: the environment names no mirror or apt source")
        allowlist = allowlist.extend(
            [rule_from_url(m, trusted=True) for m in trusted_mirrors]
            + [rule_from_url(m) for m in mirrors if m not in trusted_mirrors])
    return allowlist


def _proxy_plan(allowlist: Allowlist, log: NetLog) -> NetPlan:
    from nsbuild.net.dns import DnsResponder
    from nsbuild.net.proxy import EgressProxy

    plan = NetPlan(
        log,
        inside_sockets=(
            InsideSocket("tcp", "127.0.0.1", PROXY_PORT),
            InsideSocket("udp", "127.0.0.1", 53),
        ),
        mounts=(RESOLV_CONF,),
        env=tuple((n, PROXY_URL) for n in ("http_proxy", "https_proxy",
                                             "HTTP_PROXY", "HTTPS_PROXY")),
    )
    plan._service_for = [
        (0, lambda sock: EgressProxy(sock, allowlist, log)),
        (1, lambda sock: DnsResponder(sock, log,
                                      "--net allow: names are resolved by the egress proxy")),
    ]
    return plan
