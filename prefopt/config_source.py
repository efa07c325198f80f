"""Where each key of a config was set: a YAML file and line (through the ``base:`` chain), or
a command-line override.

The rest of the code sees plain dicts; the line of every key path is kept beside them
(``Lines``), so an error about a key (``ConfigError.key``) is reported as
``bad.yaml:7: unknown config key 'train.learnig_rate' ...``, a key from a base file with the
base file's name and line, and a key an override set with the override.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from prefopt.errors import ConfigError

Lines = dict[tuple[str, ...], tuple[str, int]]  # key path ('train', 'seed'; 'loss', '0') -> (file, line from 1)


def read_yaml_located(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, Lines]:
    """A YAML config as a dict, and the file and line of each of its key paths. ``base:
    other.yaml`` (relative to this file) is read first and this file's keys are merged over it
    (mappings merge key by key; lists and values replace)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    text = path.read_text()
    try:
        loaded = yaml.safe_load(text) or {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    lines: Lines = {}
    _walk(root, (), str(path), lines)
    base = loaded.pop("base", None)
    lines = {k: v for k, v in lines.items() if k[0] != "base"}
    if base is None:
        return loaded, lines
    base_data, base_lines = read_yaml_located(path.parent / str(base), seen + (path.resolve(),))
    return deep_merge(base_data, loaded), merge_lines(base_data, base_lines, loaded, lines)


def _walk(node, prefix: tuple[str, ...], where: str, out: Lines, depth: int = 0) -> None:
    if depth > 50:  # an alias that contains itself
        return
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            out[path] = (where, key.start_mark.line + 1)
            _walk(value, path, where, out, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = prefix + (str(i),)
            out[path] = (where, item.start_mark.line + 1)
            _walk(item, path, where, out, depth + 1)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if _merges(out.get(key), value, key) else value
    return out


def _merges(base_value, over_value, key) -> bool:
    return isinstance(over_value, dict) and isinstance(base_value, dict) and key != "loss"


def merge_lines(base: dict, base_lines: Lines, over: dict, over_lines: Lines) -> Lines:
    """The lines of ``deep_merge(base, over)``: a base key keeps its line unless ``over``
    replaced it or a mapping above it (a merged mapping keeps the base's other keys)."""
    out = {path: at for path, at in base_lines.items() if not _replaced(path, base, over)}
    out.update(over_lines)
    return out


def _replaced(path: tuple[str, ...], base, over) -> bool:
    for part in path:
        if not isinstance(over, dict) or part not in over:
            return False  # `over` says nothing at or under this key
        if not _merges(base.get(part) if isinstance(base, dict) else None, over[part], part):
            return True
        base, over = base[part], over[part]
    return True


def key_path(key: str) -> tuple[str, ...]:
    """'loss[1].beta' and 'loss.1.beta' -> ('loss', '1', 'beta')."""
    return tuple(key.replace("[", ".").replace("]", "").strip(".").split("."))


def locate(key: str, lines: Lines) -> tuple[str, int] | None:
    """The file and line of ``key``, or of the nearest key above it that a file set."""
    parts = key_path(key)
    for n in range(len(parts), 0, -1):
        if parts[:n] in lines:
            return lines[parts[:n]]
    return None


def blame(error: ConfigError, path, lines: Lines, overrides: dict[str, str]) -> ConfigError:
    """``error`` prefixed with where its key was set: the override that set it (``overrides``:
    dotted key -> the assignment as given), else the YAML file and line, else the file."""
    if error.key:
        parts = key_path(error.key)
        for dotted, assignment in reversed(overrides.items()):  # the last override of a key won
            given = key_path(dotted)
            if given[0] == "loss" and len(given) > 1 and not given[1].isdigit():
                given = ("loss",)  # loss.beta addresses the single loss, wherever its term came from
            n = min(len(parts), len(given))
            if parts[:n] == given[:n]:
                return ConfigError(f"override '{assignment}': {error}", error.key)
        found = locate(error.key, lines)
        if found:
            return ConfigError(f"{found[0]}:{found[1]}: {error}", error.key)
    return ConfigError(f"{path}: {error}" if path else str(error), error.key)
