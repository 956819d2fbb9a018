"""copy_in of a tree that someone else can write while it is copied (a
--no-clean-source tree in a shared folder): entries swapped between the
look at their type and the read of their data must never bring the user's
own files in through a link, nor hang the copy on a FIFO."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from debbuild.conftest import backend, bookworm
from waiting import HANG_GUARD

from nsbuild.backends import Backend
from nsbuild.backends.errors import CopyRefused

__all__ = ["backend", "bookworm"]

SECRET = b"SECRET-KEY-OF-THE-USER-" * 64
HARMLESS = b"harmless\n"
VICTIMS = 40
ROUNDS = 60


def _tree(tmp_path: Path) -> tuple[Path, list[Path]]:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    victims = [tree / ("sub" if i % 2 else "") / f"f{i:02}" for i in range(VICTIMS)]
    for path in victims:
        path.write_bytes(HARMLESS)
    return tree, victims


@contextlib.contextmanager
def _swapping(victims: list[Path], spare: Path, make: Callable[[Path], None]) -> Iterator[None]:
    """A thread that keeps replacing each victim, atomically, by what `make`
    makes and then by a harmless regular file again, until the block ends."""
    stop = threading.Event()

    def swap() -> None:
        odd, regular = spare / "odd", spare / "regular"
        while not stop.is_set():
            for path in victims:
                make(odd)
                os.replace(odd, path)
                regular.write_bytes(HARMLESS)
                os.replace(regular, path)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the two threads as often as possible
    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)


def _copies(backend: Backend, tree: Path) -> int:
    """copy_in of `tree` ROUNDS times, in a thread that must end: how many
    copies were made."""
    copied = [0]
    errors: list[BaseException] = []

    def copy() -> None:
        try:
            for i in range(ROUNDS):
                backend.copy_in(tree, f"/build/t{i}")
                copied[0] += 1
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    if thread.is_alive():
        pytest.fail(f"copy_in hung (after {copied[0]} copies)")
    if errors:
        raise errors[0]
    return copied[0]


def _secret_inside(backend: Backend) -> tuple[int, str]:
    """(grep's status, the files inside holding the secret's first bytes):
    as many as a harmless file's size, all a swap could bring in."""
    start = SECRET[: len(HARMLESS)].decode()
    return backend.check_output(["grep", "-rlF", "-D", "skip", "-e", start, "/build"])


def test_a_file_swapped_for_a_symlink_never_brings_its_target_in(
    backend: Backend, tmp_path: Path
) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_bytes(SECRET)
    tree, victims = _tree(tmp_path)
    spare = tmp_path / "spare"
    spare.mkdir()
    with _swapping(victims, spare, lambda odd: os.symlink(secret, odd)):
        assert _copies(backend, tree) == ROUNDS
    assert _secret_inside(backend) == (1, "")
    # What arrived is the tree: files and links, each victim one or the other.
    status, text = backend.check_output(
        ["sh", "-c", "cd /build/t0 && for f in f00 sub/f01; do "
         "if [ -L $f ]; then readlink $f; else cat $f; fi; done"]
    )  # fmt: skip
    assert status == 0
    assert set(text.split()) <= {HARMLESS.decode().strip(), str(secret)}, text


def test_a_file_swapped_for_a_fifo_never_hangs_the_copy(backend: Backend, tmp_path: Path) -> None:
    tree, victims = _tree(tmp_path)
    spare = tmp_path / "spare"
    spare.mkdir()
    with _swapping(victims, spare, os.mkfifo):
        assert _copies(backend, tree) == ROUNDS
    # Each victim arrived as a file of its data or as a FIFO, nothing else.
    status, found = backend.check_output(
        ["find", "/build", "-mindepth", "1", "-not", "-type", "f", "-not", "-type", "d",
         "-not", "-type", "p"]
    )  # fmt: skip
    assert (status, found) == (0, "")
    status, found = backend.check_output(["find", "/build", "-type", "f", "-not", "-size", "9c"])
    assert (status, found) == (0, "")


def test_a_refusal_in_the_middle_of_a_tree_ends_the_copy(backend: Backend, tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path)
    (tree / "sub" / "big").write_bytes(b"x" * (2 << 20))
    with pytest.raises(CopyRefused) as info:
        backend.copy_in(tree, "/build/big", limit=1 << 20)
    assert str(info.value) == f"refusing to copy {tree}: sub/big is larger than 1048576 bytes"
    status, _ = backend.check_output(["test", "-e", "/build/big/sub/big"])
    assert status == 1
