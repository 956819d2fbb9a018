"""The user's defaults for `nsbuild build`, and `nsbuild config`, which shows them.

The file is $XDG_CONFIG_HOME/nsbuild/config.toml (~/.config/nsbuild/config.toml
without it), read with the standard library's tomllib: a format with real
booleans, numbers and lists, which a user edits by hand without quoting
rules to learn, and which runs no code (sbuild's ~/.sbuildrc is Perl).
Its one table, [build], takes the long names of `nsbuild build`'s options
as keys:

    [build]
    jobs = 4
    arch-all = false                     # or: no-arch-all = true
    run-lintian = true
    lintian-opts = "--info --display-info"   # a string is split, as on the command line
    extra-repository = ["deb http://deb.example.org/debian bookworm main"]
    extra-repository-key = ["~/keys/example.asc"]

The command line overrides a value of the file; for an option that may be
given more than once, its values come after the file's (sbuild's order).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nsbuild.cli.buildopts import (
    OPTIONS,
    SETTINGS,
    BadSetting,
    Option,
    add_setting_options,
    key_of,
)
from nsbuild.errors import NsbuildError

FILE_NAME = "config.toml"
MAX_FILE = 1 << 20
TABLE = "build"
COMMAND_LINE = "command line"
DEFAULT = "default"


class ConfigError(NsbuildError):
    """A configuration file nsbuild cannot use (one line: file, key, problem)."""


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "nsbuild" / FILE_NAME


def _keys() -> dict[str, Option]:
    """Every long option's name, as a key of the file."""
    return {f[2:]: opt for opt in OPTIONS for f in opt.flags if f.startswith("--")}


def canonical_key(setting: str) -> str:
    """The one key a setting is shown under: its positive, whole-list spelling."""
    opts = [o for o in OPTIONS if o.setting == setting]
    best = next((o for o in opts if o.action in ("true", "store", "split")), opts[0])
    return key_of(best)


def _read(path: Path) -> dict[str, Any] | None:
    """The [build] table of the file, None when there is no file."""
    import tomllib

    from nsbuild.userfile import NotSmallFile, read_small

    try:
        data = read_small(path, MAX_FILE, lambda st: _check_owner(path, st))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except NotSmallFile as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:
        # ValueError: an integer of more digits than Python converts.
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deep") from None
    for name in doc:
        if name != TABLE:
            raise ConfigError(f"{path}: {name}: unknown table or key (settings go in [{TABLE}])")
    table = doc.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE}: not a table")
    return table


def _check_owner(path: Path, st: os.stat_result) -> None:
    """The file's commands run as the caller, and its keys and repositories
    are trusted: it must be the caller's (or root's) and writable by no one
    else, as ssh wants of ~/.ssh/config. The caller's own primary group may
    write it (a private group, where umask is 002)."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by you (uid {me}) or root: "
                          "not used")  # fmt: skip
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002 or (mode & 0o020 and st.st_gid != os.getegid()):
        raise ConfigError(f"{path}: writable by others (mode {mode:04o}): not used; "
                          f"chmod go-w {path}")  # fmt: skip


def _strings(value: object) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _value(opt: Option, raw: object) -> object:
    """A file's value for `opt`, as the command line would give it (BadSetting if wrong)."""
    setting = SETTINGS[opt.setting]

    def convert(text: str) -> object:
        if setting.path:
            text = os.path.expanduser(text)
        return setting.convert(text) if setting.convert else text

    if opt.action in ("true", "false"):
        if not isinstance(raw, bool):
            raise BadSetting("expected true or false")
        return raw if opt.action == "true" else not raw
    if opt.action == "store":
        if opt.setting == "profiles" and (items := _strings(raw)) is not None:
            return convert(",".join(items))
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise BadSetting("expected a string" + (" or a number" if setting.convert else ""))
        return convert(str(raw))
    items = _strings(raw)
    if items is None:
        raise BadSetting("expected a string or a list of strings")
    if opt.action == "split" and isinstance(raw, str):
        items = raw.split()
    return [convert(i) for i in items]


def load(path: Path) -> dict[str, object]:
    """The settings the file at `path` gives (none when it does not exist);
    ConfigError naming file, key and problem."""
    table = _read(path)
    if table is None:
        return {}
    keys = _keys()
    out: dict[str, object] = {}
    seen: dict[str, str] = {}
    for key, raw in table.items():
        opt = keys.get(key)
        if opt is None:
            raise ConfigError(f"{path}: {key}: unknown key (keys are `nsbuild build`'s "
                              "long option names)")  # fmt: skip
        if opt.setting in seen:
            raise ConfigError(f"{path}: {key}: sets what {seen[opt.setting]} sets")
        seen[opt.setting] = key
        try:
            out[opt.setting] = _value(opt, raw)
        except BadSetting as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
    return out


def effective(given: dict[str, object], environ: Mapping[str, str],
              path: Path | None = None) -> dict[str, tuple[object, str]]:  # fmt: skip
    """Every setting's value and where it came from: the default, the file,
    the command line (`given`), or for the profiles, DEB_BUILD_PROFILES."""
    path = path or config_path(environ)
    from_file = load(path)
    out: dict[str, tuple[object, str]] = {}
    for name, setting in SETTINGS.items():
        value: object = list(setting.default) if setting.repeat else setting.default  # type: ignore[call-overload]
        source = DEFAULT
        if name in from_file:
            value, source = from_file[name], str(path)
        if name in given:
            if setting.repeat and source != DEFAULT:
                value = [*value, *given[name]]  # type: ignore[misc]
                source = f"{path} + {COMMAND_LINE}"
            else:
                value, source = given[name], COMMAND_LINE
        out[name] = (value, source)
    if out["profiles"][1] == DEFAULT and environ.get("DEB_BUILD_PROFILES", "").strip():
        # sbuild's default, and what dpkg-buildpackage would read.
        try:
            out["profiles"] = (SETTINGS["profiles"].convert(environ["DEB_BUILD_PROFILES"]),  # type: ignore[misc]
                               "environment (DEB_BUILD_PROFILES)")  # fmt: skip
        except BadSetting as e:
            raise ConfigError(f"DEB_BUILD_PROFILES: {e}") from None
    return out


# -- `nsbuild config` --


def register(sub: Any) -> None:
    p = sub.add_parser(
        "config",
        help="show the settings `nsbuild build` would use, and where each comes from",
        description="Print every setting of `nsbuild build`: its value and where it came "
        f"from (default, the file {config_path()}, or the command line). Options of "
        "`nsbuild build` given here show what they would change.",
        allow_abbrev=False,
    )
    add_setting_options(p, skip=("json",))
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="print the settings as a JSON object")  # fmt: skip
    p.set_defaults(func=handler)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # TOML's basic strings escape as JSON's do, non-ASCII and all.
    return json.dumps(str(value))


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def handler(args: argparse.Namespace) -> int:
    from nsbuild.cli.buildopts import check_conflicts
    from nsbuild.printable import printable

    given: dict[str, object] = getattr(args, "given", {})
    path = config_path()
    try:
        check_conflicts(given, getattr(args, "flags", []))
        settings = effective(given, os.environ, path)
    except (BadSetting, ConfigError) as e:
        from nsbuild.cli.exits import USAGE

        print(f"nsbuild config: {printable(str(e))}", file=sys.stderr)
        return USAGE
    if args.as_json:
        doc = {
            "file": str(path),
            "settings": {canonical_key(name): {"value": _plain(value), "from": source}
                         for name, (value, source) in settings.items()},
        }  # fmt: skip
        print(json.dumps(doc, indent=1))
        return 0
    print(f"# {printable(str(path))}{'' if path.exists() else ' (no such file)'}")
    print(f"[{TABLE}]")
    for name, (value, source) in settings.items():
        key = canonical_key(name)
        line = f"# {key} is not set" if value is None else f"{key} = {_toml(_plain(value))}"
        print(f"{printable(line)}  # {printable(source)}")
    return 0
