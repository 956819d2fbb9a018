"""Network policy: `none` (loopback only), `allow` (an egress allowlist), `host`.

Engines for `allow`: `proxy` (rootless HTTP/CONNECT proxy serving a socket
that lives inside the sandbox's network namespace) and `nftables` (root: a
cgroup v2 of the run's own and an nftables table matching it). Every attempt
goes to a network log.

API (cheap to import; engines load lazily):

    add_arguments(parser)                 # --net --allow --allow-from-env
                                          # --egress-engine --net-log
    opts = options_from_args(args)        # NetOptions, or NetError (one line)
    with network(opts, mirrors=(...), trusted_mirrors=(...), debug=False) as plan:
        status = launch.run_under(plan, spec)   # or launch.Launch (net/launch.py)
    plan.denied_summary()                 # one line, escaped; None if nothing was denied
    plan.summary()                        # NetSummary: bounded counts, .merge(), .denied_line()
    plan.records()                        # the first netlog.MAX_RECORDS records only
    nftables_engine.gc()                  # leftovers of dead runs (root engine)
"""

from __future__ import annotations

from nsbuild.net.errors import NetError
from nsbuild.net.options import NetOptions, add_arguments, options_from_args

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from nsbuild.net.plan import Network

__all__ = [
    "NetError",
    "NetOptions",
    "add_arguments",
    "network",
    "options_from_args",
]


def network(opts: NetOptions, *, mirrors: Sequence[str] = (),
            trusted_mirrors: Sequence[str] = (), debug: bool = False) -> Network:
    """A context manager yielding the NetPlan; stops serving and cleans up on exit.

    With --allow-from-env: `trusted_mirrors` (the environment's Mirror:, the
    user's own config) may reach any address; `mirrors` (apt sources read
    from a root, which a sandbox may have written) global addresses only."""
    from nsbuild.net.plan import Network

    return Network(opts, mirrors=mirrors, trusted_mirrors=trusted_mirrors, debug=debug)

