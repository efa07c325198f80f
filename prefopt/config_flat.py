"""TRL-style flat names: ``DPOConfig(learning_rate=1e-5, beta=0.1)`` in, the nested RunConfig
out, and the same names read back (``args.learning_rate``, prefopt.config.RunConfig.__getattr__).

A flat name is a model/data/train/save field's bare name (unique by design), an alias of
``FLAT_ALIASES`` (TRL's own names), a dotted key, a section, or else a parameter of the single loss.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import fields, is_dataclass
from typing import Any

import yaml

from prefopt.config import SECTIONS, LossTerm, RunConfig, _override_loss, config_from_dict, set_dotted, to_dict
from prefopt.errors import ConfigError, unknown
from prefopt.losses import get_spec
from prefopt.losses.modifiers import MODIFIERS

# Flat names for the Python API beyond the model/data/train field names (which are unique).
# (TRL's config fields are translated before they get here: prefopt.trl_compat.)
FLAT_ALIASES = {"loss_type": "loss.name", "ref_model": "reference.name_or_path",
                "ref_dtype": "reference.dtype", "reference_strategy": "reference.strategy",
                "model_name_or_path": "model.name_or_path"}
FLAT_SECTIONS = ("model", "data", "train", "save")
# data.train / data.eval are the trainers' train_dataset / eval_dataset arguments.
FLAT_EXCLUDED = {"data.train", "data.eval"}



@functools.cache
def flat_key_paths() -> dict[str, str]:
    """Every model/data/train field by its bare name -> 'section.name' (unique by design)."""
    paths: dict[str, str] = {}
    for section in FLAT_SECTIONS:
        for f in fields(SECTIONS[section]):
            if f"{section}.{f.name}" in FLAT_EXCLUDED:
                continue
            if f.name in paths:
                raise AssertionError(f"config field name '{f.name}' is not unique")
            paths[f.name] = f"{section}.{f.name}"
    return paths


def flat_target(name: str) -> str | None:
    """The dotted key a flat name stands for (``learning_rate`` -> ``train.learning_rate``), or None."""
    return FLAT_ALIASES.get(name) or flat_key_paths().get(name)


def config_from_flat(defaults: dict, kwargs: dict) -> RunConfig:
    """Build a RunConfig from flat keyword arguments (the TRL-style Python API).

    ``learning_rate=1e-5`` goes to ``train.learning_rate``; section names (``data={...}``),
    ``output_dir``, ``loss`` and dotted keys (``"data.max_length": 256``) work as well; any
    other name is taken as a parameter of the (single) loss, e.g. ``beta=0.1``.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    kwargs = {k: (to_dict(v) if is_dataclass(v) or isinstance(v, list) else v) for k, v in kwargs.items()}
    paths = flat_key_paths()
    loss_params: dict[str, Any] = {}
    for key, value in kwargs.items():
        target = FLAT_ALIASES.get(key) or paths.get(key)
        if key in SECTIONS and isinstance(data.get(key), dict) and isinstance(value, dict):
            data[key] = {**data[key], **value}
        elif key in ("output_dir", "loss") or key in SECTIONS:
            data[key] = value
        elif "." in key:
            apply_override_value(data, key, value)
        elif target:
            apply_override_value(data, target, value)
        else:
            loss_params[key] = value
    if loss_params:
        terms = data.get("loss", "dpo")
        if isinstance(terms, list) and len(terms) != 1:
            raise ConfigError(f"loss parameters {sorted(loss_params)} given flat, but the objective "
                              f"has {len(terms)} losses; pass loss=[{{...}}, ...] instead")
        term = terms[0] if isinstance(terms, list) else terms
        term = {"name": term} if isinstance(term, str) else to_dict(term) if isinstance(term, LossTerm) else dict(term)
        spec = get_spec(term["name"])
        valid = {f.name for f in fields(spec.params)} | (set(MODIFIERS) if spec.data == "paired" else set())
        for name in loss_params:
            if name not in valid:
                from prefopt.trl_compat import FIELDS, LOSS_PARAMS

                raise ConfigError(unknown(f"argument (not a config key, a TRL field nor a parameter of loss "
                                          f"'{spec.name}')", name,
                                          set(paths) | valid | {"output_dir"} | set(FIELDS) | set(LOSS_PARAMS)))
        term.update(loss_params)
        data["loss"] = term
    return config_from_dict(data)


def apply_override_value(data: dict, dotted: str, value: Any) -> None:
    """Like apply_override, for an already-parsed value."""
    parts = dotted.split(".")
    if parts[0] == "loss":
        _override_loss(data, parts[1:], value, dotted)
        return
    set_dotted(data, parts, value, dotted)


def route_flat_override(assignment: str, data: dict) -> list[str]:
    """A command-line override as the dotted assignments it stands for: the one place a flat
    name is translated (``learning_rate=1e-5`` -> ``train.learning_rate=1e-5``; ``beta=0.2`` ->
    ``loss.beta=0.2`` when it is a parameter of the single loss of ``data``, the config so far).
    Dotted keys, sections, ``output_dir`` and ``loss`` pass unchanged (check_override_key
    judges them). A table of TRL's own field names (one name to several keys, or none) plugs
    in here, before the bare names. An unknown flat name is an error with the closest name."""
    if "=" not in assignment:
        return [assignment]  # apply_override says what an override looks like
    key, raw = (part.strip() for part in assignment.split("=", 1))
    if "." in key or key in SECTIONS or key in ("output_dir", "loss", "base"):
        return [assignment]
    from prefopt.trl_compat import FIELDS, is_trl_field, translate

    target = flat_target(key)
    if target and key != "loss_type" and not (key in FIELDS and FIELDS[key].convert):
        return [f"{target}={raw}"]
    terms = data.get("loss", "dpo")
    terms = terms if isinstance(terms, list) else [terms]
    names = {name: spec.name for spec in _specs(terms) for name in loss_names(spec)}

    if is_trl_field(key) and key not in names:  # TRL's field names (bf16=true, eval_strategy=epoch...)
        try:
            translated = translate({key: yaml.safe_load(raw) if raw else None}, "dpo",
                                   _specs(terms)[0].name if _specs(terms) else "dpo", existing=data)
        except ConfigError as e:
            raise ConfigError(f"override '{assignment}': {e}") from None
        return [f"{flat_target(k) or k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()}"
                .removesuffix("\n...") for k, v in translated.items()]
    if key in names and len(terms) == 1:
        return [f"loss.{key}={raw}"]
    if key in names:
        raise ConfigError(f"override '{assignment}': '{key}' is a parameter of loss '{names[key]}', but the "
                          f"objective has {len(terms)} losses; address one as loss.<index>.{key}")
    flat = {**{name: flat_target(rule.to) or rule.to if rule.to else name for name, rule in FIELDS.items()},
            **FLAT_ALIASES, **flat_key_paths(),
            **{name: f"loss.{name}" for name in names}, "output_dir": "output_dir", "loss": "loss"}
    close = difflib.get_close_matches(key, list(flat), n=1, cutoff=0.5)
    target = f" ({flat[close[0]]})" if close and flat[close[0]] != close[0] else ""
    hint = f" (did you mean '{close[0]}'{target}?)" if close else ""
    raise ConfigError(f"override '{assignment}': unknown config key '{key}'{hint}; `prefopt keys` lists them all")


def _specs(terms: list) -> list:
    """The registry entries of the loss terms of a config being built (unknown names left out:
    the config's own check names them)."""
    specs = []
    for term in terms:
        name = term if isinstance(term, str) else term.name if isinstance(term, LossTerm) else \
            term.get("name") if isinstance(term, dict) else None
        try:
            specs.append(get_spec(str(name)))
        except KeyError:
            pass
    return specs


def loss_names(spec) -> set[str]:
    """What ``loss.<name>`` may set on a term of this loss: its parameters and the modifiers."""
    from prefopt.losses.modifiers import MODIFIERS

    return {f.name for f in fields(spec.params)} | (set(MODIFIERS) if spec.data == "paired" else set())
