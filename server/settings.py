"""Typed settings tables: one set of rules for the server's TOML file and every plugin's table.

A value of the wrong type or out of range is refused at start-up with a one-line message naming
the key and what it takes: a server that starts with ``port = -5`` or ``max_batch_size = "10"``
misbehaves later, far from the cause, and a misspelt key would silently keep its default.
Standard library only: the client-only install imports the config module that uses this.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_KIND_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path (a non-empty string)",
    dict: "a table",
}


class SettingsError(ValueError):
    """A settings table holds an unknown key or a value its rule refuses."""


@dataclass(frozen=True)
class Setting:
    """What one key takes: a kind (bool, int, float, str, Path or dict: a table), for numbers a range (``low``
    is exclusive when ``above``), for strings the allowed ``choices`` or a least length not counting blanks (``low``);
    ``note`` explains a bound."""

    kind: type
    low: float | None = None
    high: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    note: str = ""

    def expected(self) -> str:
        """The rule in words, as the error message states it."""
        text = _KIND_NAMES[self.kind]
        if self.kind is str and self.low:
            text = "a string that is not blank"
        elif self.choices:
            text = "one of " + ", ".join(repr(choice) for choice in self.choices)
        elif self.low is not None and self.high is not None:
            low, high = _number(self.low), _number(self.high)
            text += f" above {low} and at most {high}" if self.above else f" from {low} to {high}"
        elif self.low is not None:
            text += f" {'>' if self.above else '>='} {_number(self.low)}"
        elif self.high is not None:
            text += f" <= {_number(self.high)}"
        return f"{text} ({self.note})" if self.note else text

    def accepts(self, value: Any) -> bool:
        return _of_kind(value, self.kind) and self._in_range(value)

    def value(self, accepted: Any) -> Any:
        """An accepted value as its kind: TOML's ``ratio = 1`` is an int, a float setting gives 1.0
        (code dividing by it or formatting it expects a float); a path setting gives a Path."""
        if self.kind in (float, Path):
            return self.kind(accepted)
        return accepted

    def _in_range(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.kind is str and self.low:  # ``low``: the least length a string may have, blanks aside
            return len(value.strip()) >= self.low
        if self.kind not in (int, float):
            return True
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high


def _of_kind(value: Any, kind: type) -> bool:
    """Strictly of ``kind``: a bool is no integer, a string no number; a float takes an integer."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    if kind is Path:
        return isinstance(value, str | os.PathLike) and str(value) != ""
    return isinstance(value, kind)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_table(table: Any, rules: Mapping[str, Setting], where: str) -> dict[str, Any]:
    """``table``'s values, each as its rule's kind (``Setting.value``); SettingsError unless
    ``table`` is a table whose every key has a rule that accepts its value.

    ``where`` names the table in messages: "configuration", "[limits]", "[plugins.sift]".
    """
    if not isinstance(table, Mapping):
        raise SettingsError(f"{where} must be a table of settings, got {table!r}")
    unknown = sorted(set(table) - set(rules))
    if unknown:
        raise SettingsError(f"unknown {where} keys: {', '.join(unknown)} (known: {', '.join(sorted(rules))})")
    for key, value in table.items():
        if not rules[key].accepts(value):
            prefix = "" if where == "configuration" else f"{where} "
            raise SettingsError(f"{prefix}{key} must be {rules[key].expected()}, got {value!r}")
    return {key: rules[key].value(value) for key, value in table.items()}
