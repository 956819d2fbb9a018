"""`nsbuild build`'s settings: each option is a spelling of one setting.

The command line, the configuration file (nsbuild.cli.config) and `nsbuild
config` all read this one table. Options are parsed with argparse defaults
suppressed, so that what the command line gave (the namespace's `given`) is
told apart from what it left to the file or the default. sbuild's options
that nsbuild has no use for are refused, each in one line, never ignored.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# sbuild's external command stages, as nsbuild.debbuild.hooks.STAGES names
# them (not imported: the help must not load the build's modules).
COMMAND_STAGES = (
    "pre-build",
    "chroot-setup",
    "build-deps-failed",
    "starting-build",
    "build-failed",
    "finished-build",
    "chroot-cleanup",
    "post-build",
    "post-build-failed",
)


class BadSetting(ValueError):
    """A value that does not parse, or settings that do not go together."""


# -- values --


def _int_at_least(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise BadSetting(f"not a number: {text!r}") from None
        if value < low:
            raise BadSetting(f"must be at least {low} (got {value})")
        return value

    return convert


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise BadSetting(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return convert


def _breaks(text: str, allowed: str = "") -> bool:
    """Whether `text` holds a control character (C0, DEL, C1) or a Unicode
    line or paragraph separator, other than those `allowed`: Python's
    splitlines(), and so python-debian reading a .changes, ends a line at
    U+0085 and U+2028, where dpkg does not."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") and c not in allowed for c in text)


def _text(text: str) -> str:
    """A line of text that lands in a Debian file (.changes, changelog)."""
    if not text.strip() or _breaks(text):
        raise BadSetting(f"{text!r} is empty or holds a control character or line separator")
    return text


def _entry(text: str) -> str:
    """A changelog entry's text: lines, as sbuild takes it (binnmu.py indents them)."""
    if not text.strip() or _breaks(text, "\n"):
        raise BadSetting(f"{text!r} is empty or holds a control character or line separator "
                         "other than newline")  # fmt: skip
    return text


def _word(text: str) -> str:
    """A name or a command line: no control characters, not empty."""
    if not text or _breaks(text, "\t"):
        raise BadSetting(f"{text!r} is empty or holds a control character or line separator")
    return text


_PROFILE = re.compile(r"[a-z0-9][a-z0-9+.-]*")


def _arch(text: str) -> str:
    """A Debian architecture name (whether dpkg knows it is asked inside)."""
    from nsbuild.envs.arches import ARCH_RE
    from nsbuild.printable import printable

    if not ARCH_RE.match(text):
        raise BadSetting(f"bad architecture name '{printable(text, 40)}' "
                         "(e.g. amd64, arm64, armhf, i386)")  # fmt: skip
    return text


def profiles(text: str) -> tuple[str, ...]:
    """sbuild's -P: profile names separated by commas (or, as in
    DEB_BUILD_PROFILES, by white space)."""
    names = tuple(n for n in re.split(r"[,\s]+", text) if n)
    for name in names:
        if not _PROFILE.fullmatch(name):
            raise BadSetting(f"not a build profile name: {name!r}")
    return names


# -- the settings and their spellings --


@dataclass(frozen=True)
class Setting:
    name: str  # the BuildRequest-like name, also argparse's dest
    default: object
    convert: Callable[[str], object] | None = None  # one value from text
    repeat: bool = False  # a list: the file's entries, then the command line's
    path: bool = False  # file names: `~` is expanded in the configuration file


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]  # the first long one is the setting's name in the file
    setting: str
    # "true"/"false": a flag setting the boolean; "store": one value, the last
    # wins; "append": one item; "split": items split on white space.
    action: str
    help: str
    metavar: str | None = None
    sbuild: bool = True  # sbuild's own spelling (said in --help)


S = Setting
SETTINGS = {s.name: s for s in (
    S("env", None, _word),
    S("dist", None, _word),
    S("out", None, Path, path=True),
    S("arch_any", True),
    S("arch_all", True),
    S("source", False),
    S("source_only_changes", False),
    S("jobs", None, _int_at_least(1)),
    S("host_arch", None, _arch),
    S("build_arch", None, _arch),
    S("profiles", (), profiles),
    S("debbuildopts", [], _word, repeat=True),
    S("extra_packages", [], Path, repeat=True, path=True),
    S("extra_repositories", [], _word, repeat=True),
    S("extra_repository_keys", [], Path, repeat=True, path=True),
    *(S(f"add_{rel}{part}", [], _word, repeat=True)
      for rel in ("depends", "conflicts") for part in ("", "_arch", "_indep")),
    S("binnmu", None, _int_at_least(0)),
    S("make_binnmu", None, _entry),
    S("append_to_version", None, _word),
    S("maintainer", None, _text),
    S("uploader", None, _text),
    S("build_path", None, _word),
    S("clean_source", True),
    S("purge_build", "always", _choice("always", "successful", "never")),
    S("verbose", False),
    S("create_env", True),
    S("use_cache", True),
    S("shell_on_failure", False),
    S("json", False),
    S("log_file", None, Path, path=True),
    S("egress_engine", "proxy", _choice("proxy", "nftables")),
    S("backend", "local", _word),
    *(S(f"{stage.replace('-', '_')}_commands", [], _word, repeat=True)
      for stage in COMMAND_STAGES),
    *(S(name, False) for name in ("run_lintian", "run_autopkgtest", "run_piuparts")),
    *(S(f"{name}_opts", [], _word, repeat=True) for name in ("lintian", "autopkgtest")),
)}  # fmt: skip

Opt = Option
OPTIONS: tuple[Option, ...] = (
    Opt(("--env", "-c", "--chroot"), "env", "store",
      "environment by name or alias (default: the one named after the changelog's "
      "distribution, or -d's); -c/--chroot is sbuild's spelling", "NAME", sbuild=False),
    Opt(("--dist", "-d"), "dist", "store",
      "the distribution to build for: picks the environment as the changelog's would, "
      "and is the .changes' Distribution", "SUITE"),
    Opt(("--out", "--build-dir"), "out", "store",
      "where results go (default: next to the input; --build-dir is sbuild's spelling)",
      "DIR", sbuild=False),
    Opt(("--arch-any",), "arch_any", "true", "build architecture-dependent packages (default)"),
    Opt(("--no-arch-any",), "arch_any", "false", "do not build architecture-dependent packages"),
    Opt(("--arch-all", "-A"), "arch_all", "true",
      "build architecture-independent packages (default; added to the rest, not alone)"),
    Opt(("--no-arch-all",), "arch_all", "false", "do not build architecture-independent packages"),
    Opt(("--source", "-s"), "source", "true", "build the source package too"),
    Opt(("--no-source",), "source", "false", "do not build the source package (default)"),
    Opt(("--source-only-changes",), "source_only_changes", "true",
      "also write a .changes of the source alone, for a source-only upload"),
    Opt(("--no-source-only-changes",), "source_only_changes", "false", "(default)"),
    Opt(("--host-arch", "--host"), "host_arch", "store",
      "cross-build packages for ARCH in the environment (of another architecture): "
      "dpkg-buildpackage -aARCH, build dependencies for ARCH, crossbuild-essential-ARCH; "
      "as sbuild, profiles `cross nocheck` and no arch-all packages unless asked for "
      "(--host is sbuild's spelling)", "ARCH"),
    Opt(("--build",), "build_arch", "store",
      "the build architecture: only the environment's own (for another, make an "
      "environment of it: nsbuild env create NAME --arch ARCH)", "ARCH"),
    Opt(("--jobs", "-j"), "jobs", "store",
      "parallel jobs: DEB_BUILD_OPTIONS parallel=N (default: the caller's parallel=, "
      "else the CPUs)", "N"),
    Opt(("--profiles", "-P"), "profiles", "store",
      "build profiles, comma-separated: DEB_BUILD_PROFILES, also when choosing build "
      "dependencies (<!nocheck>...); default: the caller's DEB_BUILD_PROFILES", "P1,P2"),
    Opt(("--debbuildopt",), "debbuildopts", "append",
      "one more dpkg-buildpackage argument (repeatable, in order)", "OPT"),
    Opt(("--debbuildopts",), "debbuildopts", "split",
      "more dpkg-buildpackage arguments, split on white space (repeatable)", "OPTS"),
    Opt(("--extra-package",), "extra_packages", "append",
      "make FILE.deb available to the build-dependency resolver (repeatable)", "FILE.deb"),
    Opt(("--extra-repository",), "extra_repositories", "append",
      "one more apt source, 'deb URL SUITE [COMPONENT...]', for the dependency phase "
      "only; its host joins that phase's network allowlist (repeatable)", "LINE"),
    Opt(("--extra-repository-key",), "extra_repository_keys", "append",
      "an OpenPGP key (armoured or binary) the extra repositories are signed with "
      "(repeatable)", "FILE"),
    *(Opt((f"--add-{rel}{part.replace('_', '-')}",), f"add_{rel}{part}", "append",
        f"one more Build-{rel.capitalize()}{part.replace('_', '-').title()} relation (repeatable)",
        "RELATION")
      for rel in ("depends", "conflicts") for part in ("", "_arch", "_indep")),
    Opt(("--binNMU",), "binnmu", "store", "the binNMU number N: versions get +bN", "N"),
    Opt(("--make-binNMU",), "make_binnmu", "store",
      "make a binNMU with this changelog entry (default --binNMU 1); arch-dependent "
      "packages only", "TEXT"),
    Opt(("--append-to-version",), "append_to_version", "store",
      "append this to the version of the binary packages", "SUFFIX"),
    Opt(("--maintainer", "-m"), "maintainer", "store", "the .changes' Maintainer", "NAME"),
    Opt(("--uploader", "-e"), "uploader", "store", "the .changes' Changed-By", "NAME"),
    Opt(("--build-path",), "build_path", "store",
      "where the package is built inside: its tree is PATH/PKG-VERSION", "PATH"),
    Opt(("--clean-source",), "clean_source", "true",
      "unpack the .dsc made from a source tree afresh (default)"),
    Opt(("--no-clean-source",), "clean_source", "false",
      "build a source tree as it is, with dpkg-buildpackage --no-pre-clean (sbuild's "
      "skips only the host's clean before dpkg-source -b; nsbuild never runs one there)"),
    Opt(("--purge-build", "--purge", "-p", "--purge-session"), "purge_build", "store",
      "remove the session after the build: always (default), successful (only a "
      "successful build's), never (keep it, and say how to enter it); the session holds "
      "the build and its dependencies, so sbuild's -p/--purge and --purge-session mean "
      "the same here", "WHEN"),
    Opt(("--verbose", "-v"), "verbose", "true", "show the build's output as it runs"),
    Opt(("--quiet", "-q"), "verbose", "false", "do not show the build's output (default)"),
    Opt(("--create",), "create_env", "true",
      "create a missing environment with mmdebstrap (default)", sbuild=False),
    Opt(("--no-create",), "create_env", "false",
      "never create an environment on the way: fail if there is none", sbuild=False),
    Opt(("--cache",), "use_cache", "true", "use and store dependency layers (default)",
      sbuild=False),
    Opt(("--no-cache",), "use_cache", "false",
      "neither use nor store a dependency layer; no apt caches", sbuild=False),
    Opt(("--shell-on-failure",), "shell_on_failure", "true",
      "open a shell in the failed build tree before cleaning up", sbuild=False),
    Opt(("--json",), "json", "true", "print a JSON summary on stdout", sbuild=False),
    Opt(("--log-file",), "log_file", "store",
      "also write the .build log to FILE as the build runs (a build farm follows it)",
      "FILE", sbuild=False),
    Opt(("--egress-engine",), "egress_engine", "store",
      "what limits the dependency phase's network to the mirror: proxy (rootless, "
      "default) or nftables (root: a kernel firewall matching the build's cgroup)",
      "proxy|nftables", sbuild=False),
    Opt(("--backend",), "backend", "store",
      "where to build (default: local); what follows a final `--` goes to the "
      "backend, e.g. `--backend autopkgtest -- autopkgtest-virt-unshare ...`", "NAME",
      sbuild=False),
    *(Opt((f"--{stage}-commands",), f"{stage.replace('-', '_')}_commands", "append",
        f"run this /bin/sh command at sbuild's {stage} stage (repeatable)", "CMD")
      for stage in COMMAND_STAGES),
    *(opt for name in ("lintian", "autopkgtest") for opt in (
        Opt((f"--run-{name}",), f"run_{name}", "true", f"run {name} after a successful build"),
        Opt((f"--no-run-{name}",), f"run_{name}", "false", f"do not run {name} (default)"),
        Opt((f"--{name}-opt",), f"{name}_opts", "append",
          f"one more {name} argument (repeatable)", "OPT"),
        Opt((f"--{name}-opts",), f"{name}_opts", "split",
          f"more {name} arguments, split on white space (repeatable)", "OPTS"),
    )),
    Opt(("--run-piuparts",), "run_piuparts", "true",
      "run nsbuild's install check after a successful build (piuparts' core: install, "
      "configure, purge, files left behind)"),
    Opt(("--no-run-piuparts",), "run_piuparts", "false", "do not run the install check (default)"),
)  # fmt: skip
del Opt, S

_ARCH_REFUSED = ("nsbuild builds on the environment's architecture: to cross-build, use "
                 "--host-arch ARCH; to build natively for ARCH, use an environment of it "
                 "(nsbuild env create NAME --arch ARCH, then -c NAME)")
# sbuild's options that nsbuild has no use for: each refused in one line.
# name -> (takes a value, why).
REFUSED: dict[str, tuple[bool, str]] = {
    "-a": (True, _ARCH_REFUSED),
    "--arch": (True, _ARCH_REFUSED),
    "--batch": (False, "nsbuild writes no build-progress file"),
    "-b": (False, "nsbuild writes no build-progress file"),
    "--binNMU-timestamp": (True, "the binNMU entry is dated by SOURCE_DATE_EPOCH"),
    "--binNMU-changelog": (True, "use --make-binNMU and --binNMU"),
    "--chroot-mode": (True, "nsbuild is its own chroot mode (rootless namespaces); "
                            "for another, see --backend"),
    "--autopkgtest-virt-server": (True, "use --backend autopkgtest -- SERVER ARGS..."),
    "--autopkgtest-virt-server-opt": (True, "use --backend autopkgtest -- SERVER ARGS..."),
    "--autopkgtest-virt-server-opts": (True, "use --backend autopkgtest -- SERVER ARGS..."),
    "--apt-clean": (False, "the session and its apt cache are thrown away anyway"),
    "--no-apt-update": (False, "the dependency phase always updates the package lists"),
    "--apt-upgrade": (False, "nsbuild never upgrades a session; use `nsbuild env update`"),
    "--apt-distupgrade": (False, "nsbuild never upgrades a session (dependency layers are "
                                 "keyed on the base); use `nsbuild env update`"),
    "--force-orig-source": (False, "not supported"),
    "--mailfrom": (True, "nsbuild sends no mail"),
    "--mail-log-to": (True, "nsbuild sends no mail"),
    "--sbuild-mode": (True, "not supported"),
    "--keyid": (True, "nsbuild does not sign; sign the .changes with debsign"),
    "-k": (True, "nsbuild does not sign; sign the .changes with debsign"),
    "--dpkg-file-suffix": (True, "not supported"),
    "--dpkg-source-opt": (True, "not supported"),
    "--dpkg-source-opts": (True, "not supported"),
    "--nolog": (False, "nsbuild always writes the .build log"),
    "-n": (False, "nsbuild always writes the .build log"),
    "--purge-deps": (True, "the dependencies go with the session; see --purge-build"),
    "--archive": (True, "not supported"),
    "--stats-dir": (True, "not supported"),
    "--setup-hook": (True, "use --chroot-setup-commands"),
    "--use-snapshot": (False, "not supported"),
    "--build-dep-resolver": (True, "nsbuild resolves build dependencies with apt"),
    "--aspcud-criteria": (True, "nsbuild resolves build dependencies with apt"),
    "--no-resolve-alternatives": (False, "apt chooses among every alternative (sbuild's "
                                         "--resolve-alternatives), never only the first"),
    "--chroot-update-failed-commands": (True, "nsbuild does not update the session"),
    "--anything-failed-commands": (True, "use --build-failed-commands and "
                                         "--post-build-failed-commands"),
    "--log-external-command-output": (False, "nsbuild logs external commands' output always"),
    "--log-external-command-error": (False, "nsbuild logs external commands' output always"),
    "--piuparts-opt": (True, "nsbuild's install check takes no piuparts options"),
    "--piuparts-opts": (True, "nsbuild's install check takes no piuparts options"),
    "--piuparts-root-arg": (True, "the checks run inside nsbuild's own sessions"),
    "--piuparts-root-args": (True, "the checks run inside nsbuild's own sessions"),
    "--autopkgtest-root-arg": (True, "the checks run inside nsbuild's own sessions"),
    "--autopkgtest-root-args": (True, "the checks run inside nsbuild's own sessions"),
    "--dsc-dir": (True, "not supported"),
    "--purge-extra-packages": (False, "not supported"),
    "--bd-uninstallable-explainer": (True, "nsbuild names the unmet dependencies apt reports"),
}  # fmt: skip
# sbuild's options whose meaning nsbuild has anyway: accepted, and said so.
NO_OPS = {
    "--apt-update": "the dependency phase always updates the package lists",
    "--no-apt-upgrade": "nsbuild never upgrades a session",
    "--no-apt-distupgrade": "nsbuild never upgrades a session",
    "--no-apt-clean": "nsbuild never runs apt-get clean in a session",
    "--resolve-alternatives": "apt considers every alternative",
}


def key_of(option: Option) -> str:
    """The setting's name in the configuration file: the option's long name."""
    return next(f for f in option.flags if f.startswith("--"))[2:]


# -- argparse --


class _Setting(argparse.Action):
    """Record a setting as the command line gives it; nothing when absent."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        self.how = kw.pop("how")
        self.convert = kw.pop("convert")
        if self.how in ("true", "false"):
            kw["nargs"] = 0
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        given: dict[str, object] = ns.__dict__.setdefault("given", {})
        try:
            if self.how in ("true", "false"):
                given[self.dest] = self.how == "true"
            elif self.how == "store":
                given[self.dest] = self.convert(values) if self.convert else values
            else:
                items = values.split() if self.how == "split" else [values]
                old = given.get(self.dest, [])
                assert isinstance(old, list)
                given[self.dest] = [*old, *(self.convert(i) if self.convert else i
                                            for i in items)]  # fmt: skip
        except BadSetting as e:
            parser.error(f"{option_string}: {e}")
        flags: list[str] = ns.__dict__.setdefault("flags", [])
        flags.append(option_string or self.dest)


class _Refused(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        why = REFUSED[self.option_strings[0]][1]
        parser.error(f"sbuild's {option_string} is not supported"
                     + ("" if why == "not supported" else f": {why}"))


class _NoOp(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        ns.__dict__.setdefault("no_ops", []).append(option_string)


def add_setting_options(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """The options of every setting, grouped, each saying whose spelling it is."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        if opt.setting in skip:
            continue
        group_name = _group(opt.setting)
        group = groups.get(group_name) or groups.setdefault(
            group_name, p.add_argument_group(group_name)
        )
        setting = SETTINGS[opt.setting]
        mark = " [sbuild]" if opt.sbuild else ""
        group.add_argument(*opt.flags, dest=opt.setting, action=_Setting, how=opt.action,
                           convert=setting.convert, default=argparse.SUPPRESS,
                           metavar=opt.metavar, help=f"{opt.help}{mark}")  # fmt: skip
    for name, (takes_value, _why) in REFUSED.items():
        p.add_argument(name, action=_Refused, nargs="?" if takes_value else 0,
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
    for name in NO_OPS:
        p.add_argument(name, action=_NoOp, nargs=0, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # fmt: skip
    take_dashed_values(p)


def take_dashed_values(p: argparse.ArgumentParser) -> None:
    """Let an option's value begin with '-', as sbuild's Getopt::Long does
    (`--debbuildopts -sa`, `--lintian-opts "-i -I"`): argparse would take it
    for an option. Each such pair is joined (`--debbuildopts=-sa`) before
    parsing."""
    takes_value = {f for o in OPTIONS if o.action not in ("true", "false") for f in o.flags}
    takes_value |= {name for name, (value, _) in REFUSED.items() if value}
    parse = p.parse_known_args

    def joined(args: Any = None, namespace: Any = None) -> Any:
        out: list[str] = []
        items = list(args or [])
        i = 0
        while i < len(items):
            arg = items[i]
            if arg in takes_value and i + 1 < len(items) and items[i + 1][:1] == "-":
                sep = "=" if arg.startswith("--") else ""
                out.append(f"{arg}{sep}{items[i + 1]}")
                i += 2
                continue
            out.append(arg)
            i += 1
        return parse(out, namespace)

    p.parse_known_args = joined  # type: ignore[method-assign]


def _group(setting: str) -> str:
    if setting.endswith("_commands"):
        return "external commands (sbuild's stages; see `man sbuild`)"
    if setting.startswith(("run_", "lintian", "autopkgtest", "piuparts")):
        return "checks after a successful build"
    if setting.startswith(("arch_", "source")):
        return "what to build (default: --arch-any --arch-all)"
    if setting.startswith(("add_", "extra_", "profiles")):
        return "build dependencies"
    if setting in ("binnmu", "make_binnmu", "append_to_version", "maintainer", "uploader"):
        return "versions and names"
    return "the build"


def check_conflicts(given: dict[str, object], flags: list[str]) -> None:
    """sbuild's refusals of options that contradict each other on one command line."""
    said = set(flags)
    pairs = (("--arch-all", "--no-arch-all"), ("-A", "--no-arch-all"),
             ("--arch-any", "--no-arch-any"))  # fmt: skip
    for a, b in pairs:
        if a in said and b in said:
            raise BadSetting(f"{a} cannot be used together with {b}")
    if given.get("arch_all") is True and ("make_binnmu" in given or "append_to_version" in given):
        raise BadSetting("--arch-all cannot be used together with --make-binNMU or "
                         "--append-to-version (a binNMU rebuilds arch-dependent packages)")
