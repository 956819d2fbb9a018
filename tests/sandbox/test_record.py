"""sandbox/record.py: the frozen records of the run path behave as frozen
dataclasses do, for what the code uses of them."""

from __future__ import annotations

import dataclasses

import pytest

from nsbuild.sandbox.record import dataclass, field, replace


@dataclass(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Point3(Point):
    z: int = 0


@dataclasses.dataclass(frozen=True)
class Real:
    x: int
    y: int = 0
    tags: tuple[str, ...] = dataclasses.field(default_factory=tuple)


def test_construction_equality_hash_and_repr_are_those_of_a_dataclass() -> None:
    assert Point(1) == Point(x=1, y=0) == Point(1, 0, ())
    assert Point(1, 2) != Point(2, 1) and Point(1) != Point3(1)
    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert repr(Point(1, 2)) == repr(Real(1, 2)).replace("Real", "Point")
    assert Point3(1, z=3) == Point3(x=1, y=0, tags=(), z=3)


def test_defaults_are_made_per_instance_and_arguments_are_checked() -> None:
    @dataclass(frozen=True)
    class Box:
        items: list[int] = field(default_factory=list)

    assert Box().items is not Box().items
    with pytest.raises(TypeError):
        Point()
    with pytest.raises(TypeError):
        Point(1, nope=2)
    with pytest.raises(TypeError):
        Point(1, 2, (), 4)


def test_records_are_frozen_and_replace_copies() -> None:
    p = Point(1, 2)
    with pytest.raises(AttributeError):
        p.x = 3
    assert replace(p, y=5) == Point(1, 5) and p == Point(1, 2)
    assert Point.__match_args__ == ("x", "y", "tags")
