"""The egress allowlist: entries `HOST[:PORT]`, parsed strictly, matched exactly.

An entry is a host name (`deb.debian.org`), a wildcard for its subdomains
(`*.debian.org` matches `a.debian.org` and `a.b.debian.org`, not `debian.org`),
an IPv4 literal (`127.0.0.1`) or a bracketed IPv6 literal (`[::1]`), with an
optional port; without a port it allows 80 and 443.

Host names are compared in a canonical form (lower case, no trailing dot),
and anything a resolver might read in a surprising way (`2130706433`,
`0x7f.1`, `%2e`, user info, non-ASCII) is refused by `canonical_host`.
Addresses a *name* resolves to are checked too (`address_refusal`, DNS
rebinding): no name may lead to a loopback, link-local, multicast, reserved or
unspecified address, and a name allowed by a *wildcard* may lead to global
addresses only (no private, shared or special-purpose ones). Only a literal
address entry reaches such an address, and only when it is asked for by that
address. Why wildcards are stricter: a plain name is one the user wrote out
(a mirror on the local network may well be private), while a wildcard
covers names nobody reviewed, whose DNS someone else may run.

Rules made from an environment's apt sources (`rule_from_url(url,
trusted=False)`) are held to what a name may reach, even when the URL gives
an address: never a loopback, link-local, multicast, reserved or unspecified
one. Those files may hold what code in a sandbox wrote (an upgrade's
maintainer scripts), which must not open the host's own services to it. A
mirror on the local network (a private address, by name or literally) stays
usable, as apt sources of such sites commonly name one. Only `--allow` and
the environment's `Mirror:` reach the host itself (a local apt cache).

Stdlib only, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nsbuild.net.errors import NetError

DEFAULT_PORTS: tuple[int, ...] = (80, 443)
_SCHEME_PORTS = {"http": 80, "https": 443}

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def canonical_host(host: str) -> str | IPAddress:
    """A host name in canonical form, or an IP address; ValueError if neither.

    Only strict dotted-quad IPv4 and bracket-less IPv6 text are addresses; a
    name whose last label is numeric is refused, so `2130706433` or `127.1`
    can never reach a resolver that would read it as 127.0.0.1."""
    if not host or not host.isascii():
        raise ValueError(f"not an ASCII host name: {host!r}")
    if ":" in host:
        try:
            v6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
        if v6.ipv4_mapped is not None:
            return v6.ipv4_mapped
        return v6
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        pass
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a valid host name: {host!r}")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        raise ValueError(f"numeric host name that is not a dotted-quad address: {host!r}")
    return name


def split_host_port(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (host, port or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {text!r}")
        port_text = rest[1:] if rest else None
        if ":" not in host:
            raise ValueError(f"brackets are for IPv6 addresses only: {text!r}")
    else:
        if text.count(":") > 1:
            raise ValueError(f"write IPv6 addresses in brackets: [{text}]")
        host, _, port_text_ = text.partition(":")
        port_text = port_text_ if ":" in text else None
    port = None if port_text is None else parse_port(port_text)
    return host, port


def parse_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r}: expected 1-65535")
    return int(text)


@dataclass(frozen=True)
class AllowRule:
    """One allowlist entry. `host` is canonical; `wildcard` means subdomains of it."""

    host: str
    ports: tuple[int, ...]
    wildcard: bool = False
    source: str = ""  # how the user wrote it, for messages and the network log
    # Read from a file a sandbox may have written (apt sources): held to what
    # a name may reach (address_refusal) even when the rule names an address.
    from_sources: bool = False

    @property
    def needs_global(self) -> bool:
        """Whether only global addresses will do for this rule."""
        return self.wildcard

    @property
    def address(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def matches(self, host: str | IPAddress, port: int) -> bool:
        if port not in self.ports:
            return False
        if not isinstance(host, str):
            return self.address == host
        if self.wildcard:
            return host.endswith("." + self.host)
        return self.address is None and host == self.host

    def describe(self) -> str:
        shown = f"*.{self.host}" if self.wildcard else self.host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{shown}:{','.join(map(str, self.ports))}"


def parse_rule(text: str, source: str | None = None) -> AllowRule:
    """Parse one `--allow` entry; NetError names the entry and what is wrong."""
    try:
        host, port = split_host_port(text.strip())
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        if "*" in host:
            raise ValueError("only a leading '*.' wildcard is supported")
        canon = canonical_host(host)
        if wildcard and not isinstance(canon, str):
            raise ValueError("a wildcard needs a host name, not an address")
        if wildcard and "." not in canon:  # type: ignore[operator]
            raise ValueError("a wildcard needs at least two labels (*.example.org)")
    except ValueError as e:
        raise NetError(f"--allow {text!r}: {e}") from None
    ports = DEFAULT_PORTS if port is None else (port,)
    return AllowRule(str(canon), ports, wildcard, source or text)


def rule_from_url(url: str, *, trusted: bool = False) -> AllowRule:
    """An allowlist rule for a mirror URL (`http://deb.debian.org/debian`).
    `trusted`: the user's own (an environment's `Mirror:`), which may name
    any address; otherwise (an apt source read from a root) none a name may
    not reach either (address_refusal)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEME_PORTS:
        raise NetError(f"mirror {url!r}: only http:// and https:// mirrors can be allowed")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        authority = authority.rpartition("@")[2]
    try:
        host, port = split_host_port(authority)
        canon = canonical_host(host)
    except ValueError as e:
        raise NetError(f"mirror {url!r}: {e}") from None
    source = f"mirror {url}" if trusted else f"apt source {url}"
    return AllowRule(str(canon), (port or _SCHEME_PORTS[scheme],), False, source,
                     from_sources=not trusted)


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # Linux reads 0.x.y.z as this host
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64, the old
    compatible form): a translator or the kernel may take it there."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or (addr in _V4_COMPATIBLE and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def address_refusal(addr: IPAddress, *, wildcard: bool = False) -> str | None:
    """Why a *name* may not resolve to `addr` (None if it may); `wildcard`:
    only global addresses will do (AllowRule.needs_global)."""
    inner = embedded_ipv4(addr)
    if inner is not None:
        return address_refusal(inner, wildcard=wildcard)
    if addr.is_loopback:
        return "resolves to a loopback address"
    if addr.is_unspecified or addr in _THIS_NETWORK:
        return "resolves to an unspecified address"
    if addr.is_link_local:
        return "resolves to a link-local address"
    if addr.is_multicast:
        return "resolves to a multicast address"
    if addr.is_reserved or (isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local):
        return "resolves to a reserved address"
    if wildcard and not addr.is_global:
        if addr.is_private:
            return "resolves to a private address, and this entry allows global ones only"
        return "resolves to an address that is not a global one, and this entry allows no other"
    return None


@dataclass(frozen=True)
class Allowlist:
    rules: tuple[AllowRule, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        return cls(tuple(parse_rule(e) for e in entries))

    def extend(self, rules: Sequence[AllowRule]) -> Allowlist:
        return Allowlist(self.rules + tuple(r for r in rules if r not in self.rules))

    def match(self, host: str | IPAddress, port: int) -> AllowRule | None:
        for rule in self.rules:
            if rule.matches(host, port):
                return rule
        return None

    def describe(self) -> str:
        return " ".join(r.describe() for r in self.rules) or "(empty)"
