"""Converting YAML / CLI / keyword values to a dataclass field's type, with errors that name the key.

Shared by the run configuration (prefopt.config) and the loss registry's parameter classes
(prefopt.losses), so neither imports the other for it.
"""
from __future__ import annotations

import types
import typing
from typing import Any

from prefopt.errors import ConfigError


def _is_optional(tp) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return False, tp


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming the key."""
    optional, inner = _is_optional(tp)
    # 'None'/'none' read as null only where a string is not a valid value (strategy: none is).
    null_words = ("null", "~") if (typing.get_origin(inner) or inner) is str else ("null", "none", "~")
    if value is None or (isinstance(value, str) and value.lower() in null_words):
        if optional:
            return None
        raise ConfigError(f"{key}: may not be null", key=key)
    origin = typing.get_origin(inner) or inner
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if origin is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # YAML reads '1e-5' as a string; float() accepts it
        if origin is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if origin is list:
            if isinstance(value, str):  # one item given alone (report_to: tensorboard, stop: "\n")
                return [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        name = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"{key}: expected {name}, got {value!r}", key=key) from None
    return value
