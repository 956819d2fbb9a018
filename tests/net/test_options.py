"""Command-line options: defaults, implications, and one-line errors before anything runs."""

from __future__ import annotations

import argparse
import os

import pytest

from nsbuild.cli.exits import exit_status
from nsbuild.net import NetError, add_arguments, options_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_default_is_none() -> None:
    opts = options_from_args(parse())
    assert opts.mode == "none" and opts.engine == "proxy" and opts.log_path is None


def test_allow_implies_net_allow() -> None:
    opts = options_from_args(parse("--allow", "deb.debian.org", "--allow", "127.0.0.1:8080"))
    assert opts.mode == "allow"
    assert opts.allowlist is not None
    assert [r.describe() for r in opts.allowlist.rules] == [
        "deb.debian.org:80,443",
        "127.0.0.1:8080",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--net", "allow"), "nothing is allowed"),
        (("--net", "none", "--allow", "a.org"), "--allow needs --net allow"),
        (("--net", "host", "--allow-from-env"), "--allow-from-env needs --net allow"),
        (("--allow", "a.org:99999"), "bad port"),
        (("--allow", "*.org"), "two labels"),
        (("--net-log", "/nonexistent/dir/log"), "does not exist"),
    ],
)
def test_bad_input(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(NetError) as e:
        options_from_args(parse(*argv))
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert exit_status(e.value) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal for non-root callers")
def test_nftables_engine_needs_root() -> None:
    with pytest.raises(NetError, match="needs root"):
        options_from_args(parse("--allow", "a.org", "--egress-engine", "nftables"))


@pytest.mark.root
def test_nftables_engine_refuses_wildcards() -> None:
    with pytest.raises(NetError, match="wildcard"):
        options_from_args(parse("--allow", "*.debian.org", "--egress-engine", "nftables"))
