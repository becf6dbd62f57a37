"""Strict parsing of environment variables: one clear line per malformed value.

Every reader raises `SettingsError` naming the variable and the value (never a
traceback), and start-up code turns that into one log line and a failed load.
"""
from __future__ import annotations

import math
from typing import Mapping

TRUE_WORDS = frozenset({"1", "true", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "n", "off"})


class SettingsError(ValueError):
    """A variable holds a value that cannot be used."""


class Env:
    """Typed, validated reads over an environment mapping (os.environ in production)."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def raw(self, name: str) -> str | None:
        """The value, or None when unset or blank (a blank variable means 'use the default')."""
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        word = value.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise SettingsError(f"{name}={value!r} is not a boolean (use 1/true/yes/y/on or 0/false/no/n/off)")

    def optional_bool(self, name: str) -> bool | None:
        return None if self.raw(name) is None else self.bool(name, False)

    def _number(self, name: str, convert, what: str):
        """The variable through `convert`, None when unset; SettingsError naming it when it does not parse."""
        value = self.raw(name)
        if value is None:
            return None
        try:
            return convert(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r} is not {what}") from None

    def int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        """An integer, clipped to [lo, hi] (an out-of-range value is served at the bound, not refused)."""
        number = self._number(name, int, "an integer")
        return default if number is None else clip(number, lo, hi)

    def optional_int(self, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
        return None if self.raw(name) is None else self.int(name, 0, lo, hi)

    def float(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        """A finite float; out-of-range values are refused (a wrong sampling default is a bug)."""
        number = self._number(name, float, "a number")
        if number is None:
            return default
        value = self.raw(name)
        if not math.isfinite(number):
            raise SettingsError(f"{name}={value!r} is not a finite number")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            raise SettingsError(f"{name}={value!r} is outside {lo}..{hi}")
        return number

    def csv(self, name: str) -> tuple[str, ...]:
        """A comma-separated list; empty items are dropped."""
        value = self.raw(name)
        if value is None:
            return ()
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        word = value.lower()
        if word not in choices:
            raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}")
        return word


def clip(number: int, lo: int | None, hi: int | None) -> int:
    if lo is not None:
        number = max(lo, number)
    if hi is not None:
        number = min(hi, number)
    return number
