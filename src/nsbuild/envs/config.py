"""chroot.d configuration: deb822 files declaring environments.

    Name: bookworm
    Type: tarball                  # tarball (default) | directory | host
    Path: ~/.cache/nsbuild/tarballs/bookworm.tar
    Aliases: stable, UNRELEASED
    Description: Debian 12 buildd
    Suite: bookworm
    Architecture: amd64
    Mirror: http://deb.debian.org/debian
    Bind-Mounts: /srv/data:/data:ro, /home/me/src
    Unpack: /var/tmp/nsbuild      # optional: cache root for this environment's store
    Unpack-Limit: 8G              # optional: most an unpack may write (default:
                                  # 10 times the tarball's size on disk + 64M)

Files in `$XDG_CONFIG_HOME/nsbuild/chroot.d/` win over `/etc/nsbuild/chroot.d/`;
a file may hold several paragraphs. Field values are parsed by python-debian
(imported lazily: the plain `nsbuild run` path never pays for it); this module
only adds what python-debian silently forgives — stray lines, repeated fields,
unknown fields — and reports every problem as `FILE:LINE: problem`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.envs.errors import ConfigError, EnvError
from nsbuild.envs.paths import config_dirs, user_config_dir

TYPES = ("tarball", "directory", "host")
FIELDS = (
    "Name",
    "Type",
    "Path",
    "Aliases",
    "Description",
    "Suite",
    "Architecture",
    "Mirror",
    "Bind-Mounts",
    "Unpack",
    "Unpack-Limit",
)
_CANONICAL = {f.lower(): f for f in FIELDS}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*\Z")
_FIELD_RE = re.compile(r"([^\s:#][^\s:]*):(.*)\Z")


@dataclass(frozen=True)
class BindMount:
    """One `Bind-Mounts` entry: host `src` at `dst` inside, optionally read-only."""

    src: str
    dst: str
    readonly: bool = False

    def __str__(self) -> str:
        return f"{self.src}:{self.dst}" + (":ro" if self.readonly else "")


@dataclass(frozen=True)
class EnvConfig:
    name: str
    type: str = "tarball"
    path: Path | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    suite: str = ""
    architecture: str = ""
    mirrors: tuple[str, ...] = ()
    bind_mounts: tuple[BindMount, ...] = ()
    unpack: Path | None = None
    unpack_limit: int | None = None  # bytes
    # Where it was declared, "FILE:LINE", for messages.
    source: str = field(default="", compare=False)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.type,
            "path": str(self.path) if self.path else None,
            "aliases": list(self.aliases),
            "description": self.description,
            "suite": self.suite,
            "architecture": self.architecture,
            "mirrors": list(self.mirrors),
            "bind_mounts": [[b.src, b.dst, b.readonly] for b in self.bind_mounts],
            "unpack": str(self.unpack) if self.unpack else None,
            "unpack_limit": self.unpack_limit,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> EnvConfig:
        def s(key: str) -> str:
            v = d.get(key)
            return v if isinstance(v, str) else ""

        def strs(key: str) -> tuple[str, ...]:
            v = d.get(key)
            return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()

        limit = d.get("unpack_limit")
        binds: list[BindMount] = []
        raw = d.get("bind_mounts")
        for b in raw if isinstance(raw, list) else ():
            if isinstance(b, list) and len(b) == 3:
                binds.append(BindMount(str(b[0]), str(b[1]), bool(b[2])))
        return cls(
            name=s("name"),
            type=s("type") or "tarball",
            path=Path(s("path")) if s("path") else None,
            aliases=strs("aliases"),
            description=s("description"),
            suite=s("suite"),
            architecture=s("architecture"),
            mirrors=strs("mirrors"),
            bind_mounts=tuple(binds),
            unpack=Path(s("unpack")) if s("unpack") else None,
            unpack_limit=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
            source=s("source"),
        )

    def to_deb822(self) -> str:
        """The chroot.d paragraph declaring this environment."""
        lines = [f"Name: {self.name}", f"Type: {self.type}"]
        if self.path:
            lines.append(f"Path: {self.path}")
        if self.aliases:
            lines.append(f"Aliases: {', '.join(self.aliases)}")
        for key, value in (
            ("Description", self.description),
            ("Suite", self.suite),
            ("Architecture", self.architecture),
            ("Mirror", " ".join(self.mirrors)),
            ("Bind-Mounts", ", ".join(str(b) for b in self.bind_mounts)),
            ("Unpack", str(self.unpack) if self.unpack else ""),
            ("Unpack-Limit", _size_text(self.unpack_limit) if self.unpack_limit else ""),
        ):
            if value:
                lines.append(f"{key}: {value}")
        return "\n".join(lines) + "\n"


class Config:
    """All declared environments; `get()` finds one by name or alias."""

    def __init__(self, envs: list[EnvConfig]) -> None:
        # Highest precedence first: user entries were appended after system ones.
        self._envs = list(reversed(envs))

    def __iter__(self) -> Iterator[EnvConfig]:
        """The effective entries: a system entry the user redeclares is hidden."""
        seen: set[str] = set()
        shown = []
        for env in self._envs:
            if env.name not in seen:
                seen.add(env.name)
                shown.append(env)
        return iter(sorted(shown, key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._envs)

    def find(self, name: str) -> EnvConfig | None:
        for env in self._envs:
            if env.name == name:
                return env
        for env in self._envs:
            if name in env.aliases:
                return env
        return None

    def known(self) -> str:
        """The environments, each with its aliases, for messages: "a (aliases: b), c"."""
        return ", ".join(
            env.name + (f" (aliases: {', '.join(env.aliases)})" if env.aliases else "")
            for env in self
        ) or "none"

    def get(self, name: str) -> EnvConfig:
        env = self.find(name)
        if env is None:
            raise EnvError(f"no environment named {name!r} (known: {self.known()}); "
                           + self._how_to_get(name))  # fmt: skip
        return env

    def _how_to_get(self, name: str) -> str:
        """A way to an environment found by `name`, runnable as said."""
        from nsbuild.envs.suites import base_suite, create_command

        if not NAME_RE.match(name):
            return "environment names are letters, digits and . _ + ~ - only"
        same = self.find(base_suite(name))
        if same is not None:
            file = same.source.rsplit(":", 1)[0]
            return f"to build in {same.name!r} by that name, add {name} to its Aliases: in {file}"
        return f"create one with: {create_command(name)}"


@dataclass
class _Paragraph:
    file: Path
    line: int  # of the first field
    text: str
    field_lines: dict[str, int]  # canonical field name -> line number


def _paragraphs(file: Path, text: str) -> Iterator[_Paragraph]:
    """Split deb822 text into paragraphs, checking the line syntax python-debian forgives."""
    current: list[str] = []
    fields: dict[str, int] = {}
    start = 0

    def flush() -> Iterator[_Paragraph]:
        if fields:
            yield _Paragraph(file, start, "\n".join(current) + "\n", dict(fields))

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            yield from flush()
            current, fields = [], {}
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t":
            if not fields:
                raise ConfigError(f"{file}:{lineno}: continuation line without a field")
            current.append(line)
            continue
        m = _FIELD_RE.match(line)
        if not m:
            raise ConfigError(f"{file}:{lineno}: expected 'Field: value', got {line.strip()!r}")
        key = m.group(1)
        canonical = _CANONICAL.get(key.lower())
        if canonical is None:
            raise ConfigError(
                f"{file}:{lineno}: unknown field {key!r} (known: {', '.join(FIELDS)})"
            )
        if canonical in fields:
            raise ConfigError(
                f"{file}:{lineno}: field {canonical} repeated (first on line {fields[canonical]})"
            )
        if not fields:
            start = lineno
        fields[canonical] = lineno
        current.append(line)
    yield from flush()


def _split_list(value: str) -> list[str]:
    return [x for x in re.split(r"[\s,]+", value) if x]


def _abs_path(value: str, where: str, key: str) -> Path:
    path = Path(os.path.expanduser(value.strip()))
    if not path.is_absolute():
        raise ConfigError(f"{where}: {key} must be an absolute path, got {value.strip()!r}")
    return path


_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def _size(value: str, where: str, key: str) -> int:
    """A size such as 8G, 512M or 1048576 (binary units; KiB, MB... alike)."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", value.strip(), re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise ConfigError(f"{where}: bad {key} {value.strip()!r} (want a size: 8G, 512M...)")
    return int(m.group(1)) << _UNITS[m.group(2).upper()]


def _size_text(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n % (1 << _UNITS[unit]) == 0:
            return f"{n >> _UNITS[unit]}{unit}"
    return str(n)


def _bind_mounts(value: str, where: str) -> tuple[BindMount, ...]:
    out: list[BindMount] = []
    for item in (x.strip() for x in re.split(r"[,\n]", value)):
        if not item:
            continue
        parts = item.split(":")
        readonly = False
        if len(parts) > 1 and parts[-1] in ("ro", "rw"):
            readonly = parts.pop() == "ro"
        if len(parts) > 2:
            raise ConfigError(f"{where}: bad Bind-Mounts entry {item!r} (want SRC[:DST][:ro])")
        src = str(_abs_path(parts[0], where, "Bind-Mounts source"))
        dst = parts[1] if len(parts) == 2 else src
        if not dst.startswith("/") or ".." in dst.split("/"):
            raise ConfigError(f"{where}: Bind-Mounts destination must be absolute: {dst!r}")
        out.append(BindMount(src, os.path.normpath(dst), readonly))
    return tuple(out)


def _parse_paragraph(p: _Paragraph) -> EnvConfig:
    from debian.deb822 import Deb822  # lazy: python-debian costs ~60 ms to import

    values = {_CANONICAL[k.lower()]: v for k, v in Deb822(p.text).items()}

    def where(key: str) -> str:
        return f"{p.file}:{p.field_lines.get(key, p.line)}"

    def value(key: str) -> str:
        return str(values.get(key, "")).strip()

    name = value("Name")
    if not name:
        raise ConfigError(f"{p.file}:{p.line}: paragraph has no Name")
    if not NAME_RE.match(name):
        raise ConfigError(f"{where('Name')}: bad Name {name!r} (letters, digits, . _ + ~ -)")
    kind = value("Type") or "tarball"
    if kind not in TYPES:
        raise ConfigError(f"{where('Type')}: bad Type {kind!r} (one of: {', '.join(TYPES)})")
    path: Path | None = None
    if kind == "host":
        if value("Path"):
            raise ConfigError(f"{where('Path')}: Type host takes no Path")
    elif not value("Path"):
        raise ConfigError(f"{p.file}:{p.line}: environment {name!r} of Type {kind} needs a Path")
    else:
        path = _abs_path(value("Path"), where("Path"), "Path")
    aliases = tuple(_split_list(value("Aliases")))
    for alias in aliases:
        if not NAME_RE.match(alias):
            raise ConfigError(f"{where('Aliases')}: bad alias {alias!r}")
    mirrors = tuple(_split_list(value("Mirror")))
    for mirror in mirrors:
        if not re.match(r"(https?|file)://", mirror):
            raise ConfigError(
                f"{where('Mirror')}: bad Mirror {mirror!r} (want http(s):// or file://)"
            )
    arch = value("Architecture")
    if arch and not re.match(r"[a-z0-9-]+\Z", arch):
        raise ConfigError(f"{where('Architecture')}: bad Architecture {arch!r}")
    return EnvConfig(
        name=name,
        type=kind,
        path=path,
        aliases=aliases,
        description=value("Description"),
        suite=value("Suite"),
        architecture=arch,
        mirrors=mirrors,
        bind_mounts=_bind_mounts(value("Bind-Mounts"), where("Bind-Mounts")),
        unpack=_abs_path(value("Unpack"), where("Unpack"), "Unpack") if value("Unpack") else None,
        unpack_limit=(
            _size(value("Unpack-Limit"), where("Unpack-Limit"), "Unpack-Limit")
            if value("Unpack-Limit") else None
        ),
        source=f"{p.file}:{p.line}",
    )


def _config_files(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{directory}: cannot read: {e.strerror}") from e
    # Like run-parts and schroot: skip hidden files, editor backups and dpkg leftovers.
    return [
        directory / n
        for n in names
        if not n.startswith(".")
        and not n.endswith(("~", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".bak", ".tmp"))
        and (directory / n).is_file()
    ]


def parse_dir(directory: Path) -> list[EnvConfig]:
    """All environments of one chroot.d folder; names and aliases must be unique in it."""
    envs: list[EnvConfig] = []
    seen: dict[str, str] = {}  # name or alias -> where declared
    for file in _config_files(directory):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise ConfigError(f"{file}: cannot read: {e.strerror}") from e
        for para in _paragraphs(file, text):
            env = _parse_paragraph(para)
            for key in (env.name, *env.aliases):
                if key in seen:
                    what = "name" if key == env.name else "alias"
                    raise ConfigError(
                        f"{env.source}: {what} {key!r} already declared at {seen[key]}"
                    )
                seen[key] = env.source
            envs.append(env)
    return envs


def _fingerprint(dirs: tuple[Path, ...]) -> list[object]:
    """What the parsed result depends on: every config file's identity and mtime."""
    key: list[object] = []
    for directory in dirs:
        for file in _config_files(directory):
            st = file.stat()
            key.append([str(file), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return key


def load_config(dirs: tuple[Path, ...] | None = None) -> Config:
    """Read every chroot.d folder (system, then user: the user's entries win).

    The parsed result is cached (keyed by the files' identities and mtimes) so
    that `nsbuild run --env` does not pay python-debian's import on every run."""
    from nsbuild.envs.paths import private_cache_dir
    from nsbuild.envs.records import read_record, write_record

    dirs = dirs if dirs is not None else config_dirs()
    key = _fingerprint(dirs)
    cache = private_cache_dir() / "config-cache.json"
    # Anything but a cache of ours for these files is parsed again and replaced.
    with contextlib.suppress(EnvError, KeyError, TypeError, AttributeError):
        data = read_record(cache)
        if data["key"] == key:
            return Config([EnvConfig.from_json(e) for e in data["envs"]])
    envs: list[EnvConfig] = []
    for directory in dirs:
        envs.extend(parse_dir(directory))
    with contextlib.suppress(OSError):  # not remembered: parsed again next time
        write_record(cache, {"key": key, "envs": [e.to_json() for e in envs]})
    return Config(envs)


def write_entry(env: EnvConfig) -> Path:
    """Write `env` as the user's chroot.d/NAME (atomically) and return the file's path."""
    directory = user_config_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / env.name
    tmp = directory / f".{env.name}.tmp"
    tmp.write_text(env.to_deb822(), encoding="utf-8")
    os.replace(tmp, target)
    return target


def remove_entry(env: EnvConfig) -> Path:
    """Remove the chroot.d file declaring `env` (it must declare only that environment)."""
    file = Path(env.source.rsplit(":", 1)[0])
    others = [
        e for e in parse_dir(file.parent) if e.source.startswith(f"{file}:") and e.name != env.name
    ]
    if others:
        raise EnvError(
            f"{file} also declares {others[0].name!r}: edit it by hand to remove {env.name!r}"
        )
    try:
        file.unlink()
    except OSError as e:
        raise EnvError(f"{file}: cannot remove: {e.strerror}") from e
    return file
