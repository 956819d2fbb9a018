"""`nsbuild farm`: a Buildbot build farm of nsbuild workers.

Arguments only here; the work is nsbuild.farm's, imported by each handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WWW_PORT, PB_PORT, INTERFACE = 8010, 9989, "127.0.0.1"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    farm = sub.add_parser("farm", help="a Buildbot build farm: master, workers, submitting")
    f_sub = farm.add_subparsers(dest="farm_command", metavar="ACTION", required=True)

    p = f_sub.add_parser("master", help="make and start a Buildbot master",
                         description="Make a Buildbot master in DIR (unless one is there) and "
                         "start it: a sqlite database, a builder per environment and "
                         "architecture of its workers, a force scheduler, the web UI.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--port-www", type=int, metavar="N",
                   help=f"the web UI's and REST port (default: {WWW_PORT})")
    p.add_argument("--port-pb", type=int, metavar="N",
                   help=f"the port workers connect to (default: {PB_PORT}, Buildbot's)")
    p.add_argument("--interface",
                   help=f"the address the web UI listens on (default: {INTERFACE}, this "
                   "machine only)")
    p.add_argument("--pb-interface", metavar="ADDRESS",
                   help="the address the worker port listens on (default: the web's; "
                   "0.0.0.0 for workers on other machines, the web staying local)")
    p.add_argument("--tls", action="store_true",
                   help="both ports on TLS with a certificate of the master's own (in "
                   "DIR/tls/), which workers and submitters on other machines pin "
                   "(--master-cert)")
    p.add_argument("--no-start", action="store_true", help="only write it")
    p.set_defaults(func=cmd_master)

    p = f_sub.add_parser("worker", help="make, register and start a Buildbot worker",
                         description="Make a worker in DIR that builds with nsbuild, as you; "
                         "register it with the master (a master on this machine directly, "
                         "else print what to run there) with the environments and "
                         "architectures `nsbuild env list` has; run `nsbuild gc`; start it.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--master", required=True, metavar="HOST:PORT",
                   help="the master's worker port")
    p.add_argument("--name", required=True, help="the worker's name")
    p.add_argument("--master-dir", type=Path, metavar="DIR",
                   help="the master's folder on this machine (default: the one "
                   "`nsbuild farm master` made, if its worker port is PORT)")
    p.add_argument("--master-cert", type=Path, metavar="FILE",
                   help="the master's certificate to trust, alone (a copy of its "
                   "tls/cert.pem; needed for a master on another machine)")
    p.add_argument("--no-start", action="store_true", help="only write and register it")
    p.add_argument("--as-root", action="store_true",
                   help="allow running it as root (its master's commands then run as root); "
                   "its builds then use --egress-engine nftables, the kernel firewall")
    p.set_defaults(func=cmd_worker)

    p = f_sub.add_parser("add-worker", help="register a worker made on another machine",
                         description="Add worker NAME, building for ENV/ARCH..., to the master "
                         "in DIR; its password is read from stdin (`nsbuild farm worker` "
                         "prints the whole command).")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("name")
    p.add_argument("envs", nargs="+", metavar="ENV/ARCH")
    p.set_defaults(func=cmd_add_worker)

    p = f_sub.add_parser("stop", help="stop a master or worker")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.set_defaults(func=cmd_stop)

    p = f_sub.add_parser("submit", help="hand source packages to the farm",
                         description="Submit builds to the master's force scheduler: .dsc "
                         "files (sent through the master's folder: a master on this "
                         "machine), or with --from-archive packages fetched by apt-get "
                         "source on the worker.")
    p.add_argument("packages", nargs="*", metavar="PKG.dsc | PKG[=VER]")
    p.add_argument("--from-archive", metavar="SUITE",
                   help="PKG[=VER] from the archive of environment SUITE")
    p.add_argument("--list", type=Path, metavar="FILE",
                   help="with --from-archive: more PKG[=VER], one a line (# comments)")
    p.add_argument("--env", help="the environment to build in (default: the only builder's)")
    p.add_argument("--arch", help="the architecture to build on")
    p.add_argument("--wait", action="store_true",
                   help="wait for the builds, fetch their files and print a table")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="with --wait: where the files go (default: here)")
    p.add_argument("--master", metavar="URL", help="the master's web URL "
                   "(default: the one `nsbuild farm master` made on this machine)")
    _master_cert(p)
    p.set_defaults(func=cmd_submit)

    p = f_sub.add_parser("status", help="the builds queued or running")
    p.add_argument("--master", metavar="URL", help="the master's web URL")
    _master_cert(p)
    p.set_defaults(func=cmd_status)


def _master_cert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master-cert", type=Path, metavar="FILE",
                   help="the certificate of a master on TLS to trust, alone (a copy of its "
                   "tls/cert.pem; the local master's is found in its folder)")


def cmd_master(args: argparse.Namespace) -> int:
    from nsbuild.farm import daemons, master, settings

    for port in (args.port_www, args.port_pb):
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
    folder = args.dir.absolute()
    given = (args.port_www, args.port_pb, args.interface, args.pb_interface)
    if daemons.is_master(folder):
        have = settings.master_settings(folder)
        if args.tls and not have.tls:
            raise ValueError(f"the master in {folder} was made without --tls; "
                             "to have it, make another")  # fmt: skip
        if any(g is not None and g != h
               for g, h in zip(given, (have.www_port, have.pb_port, have.interface,
                                       have.pb_address), strict=True)):  # fmt: skip
            raise ValueError(f"the master in {folder} listens on {have.interface} port "
                             f"{have.www_port} (web) and {have.pb_address} port "
                             f"{have.pb_port} (workers) (its {settings.MASTER_FILE}); to "
                             "change them, make another")  # fmt: skip
    made = master.create(folder, args.port_www or WWW_PORT, args.port_pb or PB_PORT,
                         args.interface or INTERFACE, args.pb_interface or "",
                         args.tls)  # fmt: skip
    settings.note_local_master(folder)
    s = settings.master_settings(folder)
    print(f"nsbuild farm: master {'made' if made else 'found'} in {folder}", file=sys.stderr)
    if not args.no_start:
        master.start(folder)
        print(f"nsbuild farm: master running: web UI {s.url}, workers connect to "
              f"{s.pb_address}:{s.pb_port}", file=sys.stderr)  # fmt: skip
    if made:
        print(f"nsbuild farm: to start builds in the web UI, log in as {settings.WEB_USER} "
              f"with the password in {folder / settings.MASTER_FILE}", file=sys.stderr)
    print(s.url)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from nsbuild.farm import worker

    master_dir = args.master_dir or worker.local_master_for(args.master)
    cert = worker.master_cert_for(args.master, master_dir, args.master_cert)
    setup = worker.create(args.dir, args.master, args.name, args.as_root, cert)
    if master_dir is not None:
        worker.register_locally(setup, master_dir.absolute())
        print(f"nsbuild farm: worker {setup.name} registered with {master_dir}: "
              f"{' '.join(setup.envs)}", file=sys.stderr)  # fmt: skip
    else:
        print("nsbuild farm: register it on the master's machine with:\n  "
              + worker.register_line(setup), file=sys.stderr)
    if not args.no_start:
        worker.start(setup.folder)
        print(f"nsbuild farm: worker {setup.name} started in {setup.folder}", file=sys.stderr)
    return 0


def cmd_add_worker(args: argparse.Namespace) -> int:
    from nsbuild.farm import master, settings

    password = sys.stdin.readline().strip()
    if len(password) < 16:
        raise ValueError("add-worker: give the worker's password (16 characters or more) "
                         "on stdin")
    settings.register(args.dir, settings.WorkerEntry(args.name, password, tuple(args.envs)))
    master.reconfig(args.dir)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from nsbuild.farm import daemons

    if not daemons.stop(args.dir.absolute()):
        print(f"nsbuild farm: {args.dir} was not running", file=sys.stderr)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from nsbuild.cli import exits
    from nsbuild.farm import submit

    packages = list(args.packages)
    if args.list is not None:
        if not args.from_archive:
            raise ValueError("submit: --list is for --from-archive")
        packages += submit.read_list(args.list)
    if not packages:
        raise ValueError("submit: nothing to build (PKG.dsc..., or --from-archive SUITE PKG...)")
    rest, master_dir = submit.master_for(args.master, args.master_cert)
    env = args.env or args.from_archive
    builder = submit.choose_builder(rest, env, args.arch)
    dscs = [] if args.from_archive else [Path(p).absolute() for p in packages]
    sources = packages if args.from_archive else []
    jobs = submit.submit(rest, builder, master_dir, dscs, sources)
    for job in jobs:
        print(f"nsbuild farm: {job.label}: request {job.request} on {job.builder}",
              file=sys.stderr)
    if not args.wait:
        return 0
    submit.wait(rest, jobs, submit.say)
    if master_dir is not None:
        for job in jobs:
            submit.fetch(master_dir, job, args.out)
            submit.unstage(job)
    print(submit.table(jobs))
    return 0 if all(submit.status_of(j) == "built" for j in jobs) else exits.BUILD_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from nsbuild.farm import submit

    rest, _ = submit.master_for(args.master, args.master_cert)
    print(submit.queue(rest))
    return 0
