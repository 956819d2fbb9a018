"""The conversation of autopkgtest's virtualisation-server protocol, on stdin and stdout.

The protocol (autopkgtest's README.virtualisation-server): the server greets
with `ok`; each command line is words, each word URL-encoded; each answer is
`ok` and URL-encoded results, or one word naming the failure. Nothing else is
ever written on stdout: the server's own commands send their output to
stderr. What each command does is the server's (server.py).
"""

from __future__ import annotations

import os
import sys
from typing import IO, NoReturn, Protocol
from urllib.parse import unquote

PROG = "autopkgtest-virt-nsbuild"


class Misuse(Exception):
    """The caller broke the protocol: the server says why and quits."""


class CommandFailed(Exception):
    """One command failed; the answer is a word other than `ok`, the server goes on."""

    def __init__(self, answer: str, why: str) -> None:
        super().__init__(why)
        self.answer = answer


class Commands(Protocol):
    def dispatch(self, words: list[str]) -> list[str]:
        """Run one command; the words after `ok`, each already URL-encoded."""

    def drain_output(self) -> None:
        """Let the output of the command just run reach stderr."""

    def teardown(self) -> None:
        """Close the testbed, if one is open."""


def serve(server: Commands, stdin: IO[bytes], debug: bool) -> int:
    """Answer commands until `quit` (0); on a broken protocol, a closed
    input or an error of the testbed, close it and exit with 1."""
    from nsbuild.errors import NsbuildError

    try:
        _send(["ok"])
        while True:
            line = stdin.readline()
            if not line:
                cleanup(server)
                die("end of input: the caller went away; testbed closed", 1)
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            if debug:
                say(f"<- {text}")
            words = [unquote(w) for w in text.split()]
            try:
                try:
                    results = server.dispatch(words)
                finally:
                    server.drain_output()
            except CommandFailed as e:
                sys.stderr.write(f"{PROG}: {e}\n")
                reply = [e.answer]
            else:
                reply = ["ok", *results]
            if debug:
                say(f"-> {' '.join(reply)}")
            try:
                _send(reply)
            except BrokenPipeError:
                # A caller may stop reading once it sent `quit`.
                if words[0] != "quit":
                    cleanup(server)
                    die("the caller stopped reading; testbed closed", 1)
            if words[0] == "quit":
                return 0
    except (Misuse, NsbuildError, OSError, RuntimeError) as e:
        cleanup(server)
        die(f"failure: {e}", 1)


def say(text: str) -> None:
    """A line of the server's own on stderr, at once."""
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def cleanup(server: Commands) -> None:
    try:
        server.teardown()
    except Exception as e:
        sys.stderr.write(f"{PROG}: while closing the testbed: {e}\n")


def _send(words: list[str]) -> None:
    data = (" ".join(words) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def die(message: str, status: int) -> NoReturn:
    say(message)
    os._exit(status)
