"""Errors a user can act on: bad configuration, bad data, missing capabilities.

Everything raised from here is caught by the CLI and printed without a traceback;
the message must therefore say what is wrong, where, and what to do about it.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrefoptError(Exception):
    """Base class for errors caused by input the user controls."""


class ConfigError(PrefoptError):
    """An unknown key, a value of the wrong type, or an inconsistent combination.

    ``key`` is the dotted config key at fault when one is (``train.learning_rate``,
    ``loss.0``): the CLI names the YAML file and line that set it, or the override."""

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(PrefoptError):
    """A record that cannot be used. `where` names the file and line (or record index)."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> str:
    """The standard message for an unknown name: suggestion plus the full list."""
    choices = sorted(choices)
    return f"unknown {kind} '{name}'{did_you_mean(name, choices)}; valid: {', '.join(choices)}"
