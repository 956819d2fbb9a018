"""Allowlist entries: what parses, what is refused, what matches."""

from __future__ import annotations

import ipaddress

import pytest

from nsbuild.net.allowlist import (
    Allowlist,
    address_refusal,
    canonical_host,
    parse_rule,
    rule_from_url,
)
from nsbuild.net.errors import NetError


def test_host_without_port_allows_80_and_443() -> None:
    rule = parse_rule("Deb.Debian.Org.")
    assert rule.host == "deb.debian.org" and rule.ports == (80, 443)
    assert rule.matches("deb.debian.org", 443)
    assert not rule.matches("deb.debian.org", 8080)


def test_explicit_port_and_literals() -> None:
    assert parse_rule("127.0.0.1:8080").matches(ipaddress.ip_address("127.0.0.1"), 8080)
    v6 = parse_rule("[::1]:3142")
    assert v6.matches(ipaddress.ip_address("::1"), 3142)
    assert v6.describe() == "[::1]:3142"


def test_wildcard_matches_subdomains_only() -> None:
    rule = parse_rule("*.debian.org")
    assert rule.matches("deb.debian.org", 80)
    assert rule.matches("a.b.debian.org", 443)
    assert not rule.matches("debian.org", 80)
    assert not rule.matches("evildebian.org", 80)
    assert not rule.matches("debian.org.evil.com", 80)


def test_a_name_rule_never_matches_an_address() -> None:
    allow = Allowlist.parse(["localhost:80"])
    assert allow.match(ipaddress.ip_address("127.0.0.1"), 80) is None


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "host:0",
        "host:65536",
        "host:http",
        "*",
        "*.org",
        "a.*.org",
        "*.1.2.3.4",
        "::1",
        "[::1",
        "[1.2.3.4]",
        "2130706433",
        "127.1",
        "0x7f.1",
        "exa mple.org",
        "bücher.de",
        "-a.org",
        "a..org",
    ],
)
def test_bad_entries_are_one_line_errors(entry: str) -> None:
    with pytest.raises(NetError) as e:
        parse_rule(entry)
    assert "\n" not in str(e.value) and repr(entry) in str(e.value)


def test_canonical_host_maps_v4_mapped_v6_to_v4() -> None:
    assert canonical_host("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")


def test_mirror_urls_become_rules() -> None:
    assert rule_from_url("http://deb.debian.org/debian").describe() == "deb.debian.org:80"
    assert rule_from_url("https://x:y@Mirror.Example:8443/d").describe() == "mirror.example:8443"
    with pytest.raises(NetError):
        rule_from_url("ftp://ftp.debian.org/debian")


def test_only_a_trusted_mirror_url_may_reach_a_host_local_address() -> None:
    """An apt source read from a root is held to what a name may reach; the
    environment's Mirror: (the user's config) is not."""
    source = rule_from_url("http://127.0.0.1:3142/debian")
    mirror = rule_from_url("http://127.0.0.1:3142/debian", trusted=True)
    assert source.from_sources and source.source.startswith("apt source")
    assert not mirror.from_sources
    assert not source.needs_global and not mirror.needs_global


@pytest.mark.parametrize(
    "addr",
    ["127.0.0.1", "::1", "0.0.0.0", "169.254.169.254", "fe80::1", "224.0.0.1", "::ffff:127.0.0.1"],
)
def test_names_may_not_resolve_to_internal_addresses(addr: str) -> None:
    assert address_refusal(ipaddress.ip_address(addr)) is not None


def test_public_and_private_lan_addresses_are_fine() -> None:
    assert address_refusal(ipaddress.ip_address("151.101.2.132")) is None
    assert address_refusal(ipaddress.ip_address("10.1.2.3")) is None  # apt-cacher-ng on a LAN


def test_an_apt_source_may_name_a_mirror_on_the_local_network_not_the_host() -> None:
    """What a sandbox could write into apt sources never reaches the host
    itself or its link; a LAN mirror (private or documentation range, as this
    project's own CI machines resolve Debian's mirrors) stays usable."""
    import ipaddress

    from nsbuild.net.allowlist import address_refusal

    for lan in ("10.1.2.3", "192.168.0.5", "203.0.113.80", "fd00::5"):
        assert address_refusal(ipaddress.ip_address(lan)) is None, lan
        assert address_refusal(ipaddress.ip_address(lan), wildcard=True) is not None, lan
    for host_local in ("127.0.0.1", "::1", "169.254.169.254", "0.0.0.0", "::ffff:127.0.0.1"):
        assert address_refusal(ipaddress.ip_address(host_local)) is not None, host_local
