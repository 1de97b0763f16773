"""Typed options: values as YAML/--set give them become dataclass fields, and every mistake is a
one-line ConfigError naming the key and the valid choices."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from jdecode import options
from jdecode.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Opts:
    k: int = options.option(4, "tokens")
    rate: float = options.option(0.5, "a rate")
    name: str | None = options.option(None, "a name")
    mode: Literal["a", "b"] = options.option("a", "a mode")
    sizes: tuple[int, ...] = options.option((1,), "sizes")
    on: bool = options.option(False, "a switch")

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")


def test_values_are_converted_and_checked():
    o = options.parse(Opts, {"k": 3, "rate": 1, "sizes": [2, 4], "mode": "b", "on": True},
                      "test")
    assert o == Opts(k=3, rate=1.0, sizes=(2, 4), mode="b", on=True)
    assert isinstance(o.rate, float) and isinstance(o.sizes, tuple)
    assert options.parse(Opts, o, "test") is o
    assert options.parse(Opts, None, "test") == Opts()
    assert options.to_dict(o)["sizes"] == [2, 4]


@pytest.mark.parametrize("raw, message", [
    ({"kk": 1}, "test has no option 'kk'; valid options are: k, rate, name, mode, sizes, on"),
    ({"k": "3"}, "test: k='3' must be int"),
    ({"k": True}, "test: k=True must be int"),
    ({"rate": "x"}, "test: rate='x' must be float"),
    ({"mode": "c"}, "test: mode='c' must be 'a' | 'b'"),
    ({"sizes": [1, "x"]}, "test: sizes=[1, 'x'] must be list of int"),
    ({"on": 1}, "test: on=1 must be bool"),
    ({"k": 0}, "test: k=0 must be >= 1"),
    ([1, 2], "test: expected a mapping of options"),
])
def test_mistakes_name_the_key_and_the_fix(raw, message):
    with pytest.raises(ConfigError) as e:
        options.parse(Opts, raw, "test")
    assert str(e.value) == message or message in str(e.value)
    assert "\n" not in str(e.value)


def test_split_overrides_routes_keys_to_their_group():
    @dataclasses.dataclass(frozen=True)
    class Other:
        steps: int = 1

    out = options.split_overrides(["k=2", "steps=5", "other.steps=7", "rate=1e-3"],
                                  {"opts": Opts, "other": Other})
    assert out == {"opts": {"k": 2, "rate": 1e-3}, "other": {"steps": 7}}
    with pytest.raises(ConfigError, match="unknown key 'nope'; valid keys are: k, mode, name, "
                                          "on, rate, sizes, steps"):
        options.split_overrides(["nope=1"], {"opts": Opts, "other": Other})
