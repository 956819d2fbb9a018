"""sbuild's --extra-repository and --extra-repository-key, for the dependency
phase alone.

Each repository is one apt source line, `deb URL SUITE [COMPONENT...]`, over
http or https. The keys are the user's files, checked on the host before use
(a regular file, bounded, an OpenPGP public key armoured or binary) and
copied into the session from memory, so what apt trusts is what was checked.
Every extra repository is signed-by exactly those keys; without a key, apt
checks it against the environment's own keyring, as sbuild's would. The
repositories' hosts join the dependency phase's network allowlist (the
driver passes `allowed_hosts()` to the backend); the build itself stays
without network, and the source entry and keys are removed from the session
when the dependency phase ends.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nsbuild.debbuild.result import BuildRequest
from nsbuild.errors import NsbuildError
from nsbuild.userfile import NotSmallFile, read_small

MAX_KEY = 256 << 10  # a public key with its signatures is a few KiB
MAX_LINE = 4096
# Where the session holds them while the dependency phase runs.
SOURCES = "/etc/apt/sources.list.d/nsbuild-extra.list"
KEYRINGS = "/etc/apt/keyrings"
_ARMOUR_BEGIN = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
_ARMOUR_END = b"-----END PGP PUBLIC KEY BLOCK-----"
_PUBLIC_KEY_TAG = 6


class ExtraRepoError(NsbuildError):
    """An extra repository or key nsbuild will not use (one line)."""


@dataclass(frozen=True)
class Repository:
    line: str  # as given, normalised to single spaces
    url: str
    suite: str
    components: tuple[str, ...]
    host: str  # an allowlist entry: HOST or HOST:PORT, [IPv6]:PORT


@dataclass(frozen=True)
class Key:
    name: str  # its file name inside: the extension tells apt its format
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def parse(line: str) -> Repository:
    """One --extra-repository line; ExtraRepoError saying what is wrong."""
    from nsbuild.net.allowlist import canonical_host

    where = f"--extra-repository {line[:200]!r}"
    # str.split() below would take U+0085 or U+2028 for white space.
    if len(line) > MAX_LINE or any(
        unicodedata.category(c) in ("Cc", "Zl", "Zp") and c != "\t" for c in line
    ):
        raise ExtraRepoError(f"{where}: too long, or holds a control character or line separator")
    words = line.split()
    if len(words) > 1 and words[1].startswith("["):
        raise ExtraRepoError(f"{where}: options in [...] are not taken; give the key "
                             "with --extra-repository-key")  # fmt: skip
    if len(words) < 3 or words[0] != "deb":
        raise ExtraRepoError(f"{where}: expected 'deb URL SUITE [COMPONENT...]'")
    url, suite, components = words[1], words[2], tuple(words[3:])
    if suite.endswith("/") != (not components):
        raise ExtraRepoError(f"{where}: a suite ending in '/' takes no components, "
                             "any other suite needs at least one")  # fmt: skip
    try:
        parts = urlsplit(url)
    except ValueError as e:  # a bracketed host that is not an IPv6 address
        raise ExtraRepoError(f"{where}: not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ExtraRepoError(f"{where}: the URL must be http:// or https:// with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ExtraRepoError(f"{where}: the URL may hold no user, password, query or fragment")
    try:
        host = canonical_host(parts.hostname)
        port = parts.port
    except ValueError as e:
        raise ExtraRepoError(f"{where}: {e}") from None
    if port == 0:
        raise ExtraRepoError(f"{where}: port 0 is no port to reach")
    text = f"[{host}]" if ":" in str(host) else str(host)
    if port is not None:
        text += f":{port}"
    return Repository(" ".join(words), url, suite, components, text)


def load_key(path: Path, index: int) -> Key:
    """The key in the user's file `path`, checked: a regular file of bounded
    size holding an OpenPGP public key, armoured or binary."""
    where = f"--extra-repository-key {path}"
    try:
        data = read_small(path, MAX_KEY)
    except OSError as e:
        raise ExtraRepoError(f"{where}: {e.strerror}") from None
    except NotSmallFile as e:
        raise ExtraRepoError(f"{where}: {e}, not a key") from None
    if data.lstrip().startswith(_ARMOUR_BEGIN):
        if _ARMOUR_END not in data or not data.isascii():
            raise ExtraRepoError(f"{where}: an armoured key without its end line, "
                                 "or not ASCII")  # fmt: skip
        return Key(f"nsbuild-extra-{index}.asc", data)
    if data and _packet_tag(data[0]) == _PUBLIC_KEY_TAG:
        return Key(f"nsbuild-extra-{index}.gpg", data)
    raise ExtraRepoError(f"{where}: not an OpenPGP public key (armoured or binary)")


def _packet_tag(first: int) -> int | None:
    """The tag of an OpenPGP packet from its first byte (RFC 4880, 4.2)."""
    if not first & 0x80:
        return None
    return first & 0x3F if first & 0x40 else (first >> 2) & 0x0F


def check_request(req: BuildRequest) -> None:
    """Refuse a request's extra repositories and keys before any work begins."""
    for line in req.extra_repositories:
        parse(line)
    keys(req)
    if req.extra_repository_keys and not req.extra_repositories:
        raise ExtraRepoError("--extra-repository-key without --extra-repository: no source "
                             "would be signed by it")  # fmt: skip


def keys(req: BuildRequest) -> list[Key]:
    return [load_key(p, i) for i, p in enumerate(req.extra_repository_keys, 1)]


def allowed_hosts(req: BuildRequest) -> tuple[str, ...]:
    """The hosts the dependency phase may reach besides the environment's
    mirrors: those of the extra repositories, and nothing else."""
    return tuple(dict.fromkeys(parse(line).host for line in req.extra_repositories))


def sources(repos: list[Repository], keys: list[Key]) -> str:
    """The session's source entries: every repository signed by the keys given."""
    signed = ""
    if keys:
        signed = "[signed-by=" + ",".join(f"{KEYRINGS}/{k.name}" for k in keys) + "] "
    return "".join(f"deb {signed}{r.url} {r.suite} {' '.join(r.components)}".rstrip() + "\n"
                   for r in repos)  # fmt: skip


def identity(repos: list[Repository], keys: list[Key]) -> list[str]:
    """What a dependency layer's key must cover of them: the lines and the keys."""
    return [*(f"repository {r.line}" for r in repos), *(f"key {k.sha256}" for k in keys)]
