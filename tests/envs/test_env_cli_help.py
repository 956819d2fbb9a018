"""Every option and argument of the environment commands says what it does."""

from __future__ import annotations

import argparse

from nsbuild.cli.envs import register


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = argparse.ArgumentParser(prog="nsbuild")
    register(top.add_subparsers())
    found: dict[str, argparse.ArgumentParser] = {}
    todo = [top]
    while todo:
        parser = todo.pop()
        found[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


def test_every_option_has_help() -> None:
    missing = [
        f"{prog} {'/'.join(a.option_strings) or a.dest}"
        for prog, parser in _parsers().items()
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert missing == []


def test_commands_are_all_there() -> None:
    progs = set(_parsers())
    for prog in ("env remove", "env update", "session list", "session run", "gc", "shell"):
        assert f"nsbuild {prog}" in progs
