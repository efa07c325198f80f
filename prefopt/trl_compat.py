"""TRL's config fields on prefopt: ``translate`` turns TRL-named keyword arguments (DPOConfig's,
and the CLI's flat flags) into prefopt's, with the table of prefopt.trl_fields for single fields
and the joint rules here (the loss list, precision, TR-DPO, LoRA), which read several fields at once.
"""
from __future__ import annotations

import logging

from prefopt.errors import ConfigError
from prefopt.trl_fields import (F_DIVERGENCES, FIELDS, JOINT, LORA, LORA_DEFAULTS, LOSS_DEFAULTS, LOSS_PARAMS,  # noqa: F401
                                LOSS_TYPES, NOT_YET, _same, _value, is_trl_field, table_rows)

log = logging.getLogger("prefopt")


def translate(kwargs: dict, kind: str = "dpo", default_loss: str = "dpo", existing: dict | None = None) -> dict:
    """TRL-named keyword arguments -> prefopt's flat ones (prefopt names pass through unchanged).
    ``kind`` is the trainer family (dpo, kto, cpo, orpo, reward, sft) whose loss_type names apply;
    ``existing`` is the nested config so far (the command line's, or a config being changed), so a
    field translated alone never resets what was set before it (a step count, a loss parameter)."""
    existing = existing or {}
    out: dict = {}
    for name, value in kwargs.items():
        rule = FIELDS.get(name)
        if name in JOINT or name in LOSS_PARAMS or name in ("bf16", "fp16"):
            continue
        if rule is None:
            out[name] = value  # a prefopt name, a section, a dotted key or a loss parameter
        elif rule.convert is not None:
            out.update(rule.convert(value))
        elif rule.to is not None:
            out[rule.to] = value
        elif _same(value, rule.default):
            continue
        elif rule.refuse is not None:
            raise ConfigError(f"{name}={value!r} is not supported by prefopt: {rule.refuse}")
        else:
            log.info("%s=%r has no effect in prefopt: %s", name, value, rule.ignore)
    # TRL's "steps" strategies without a number of steps: its defaults (logging_steps, and 500)
    train = _section(existing, "train")
    if _value(kwargs.get("eval_strategy", kwargs.get("evaluation_strategy"))) == "steps" \
            and kwargs.get("eval_steps") is None and not train.get("eval_steps"):
        out["eval_steps"] = int(kwargs.get("logging_steps") or train.get("logging_steps") or 10)
    if _value(kwargs.get("save_strategy")) == "steps" and kwargs.get("save_steps") is None \
            and not train.get("save_steps"):
        out["save_steps"] = 500
    out.update(_precision(kwargs))
    out.update(_sync(kwargs, _section(existing, "reference")))
    out.update(_lora(kwargs, _section(existing, "model")))
    out.update(_losses(kwargs, kind, default_loss, given="loss" in out, existing=existing.get("loss")))
    return out


def _section(config: dict, name: str) -> dict:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def _precision(kwargs: dict) -> dict:
    """fp16 / bf16 -> train.mixed_precision; bf16=None (TRL's default) leaves prefopt's auto."""
    from prefopt.coerce import coerce

    fp16, bf16 = (None if kwargs.get(k) is None else coerce(kwargs[k], bool, k) for k in ("fp16", "bf16"))
    if fp16 and bf16:
        raise ConfigError("bf16=True and fp16=True: choose one mixed precision")
    if fp16:
        return {"mixed_precision": "fp16"}
    return {} if bf16 is None else {"mixed_precision": "bf16" if bf16 else "no"}


def _switched(kwargs: dict, switch: str, settings: dict, what: str) -> bool:
    """Is a feature on? Its switch, or any of its settings at a value other than TRL's default
    (a setting says what is meant); a setting with the switch explicitly off is an error."""
    set_apart = [k for k, default in settings.items() if k in kwargs and not _same(kwargs[k], default)]
    if kwargs.get(switch) is False and set_apart:
        raise ConfigError(f"{set_apart[0]}={kwargs[set_apart[0]]!r} with {switch}=False: {what} is off; set "
                          f"{switch}=True, or drop {set_apart[0]}")
    return bool(kwargs.get(switch)) or bool(set_apart)


def _sync(kwargs: dict, reference: dict) -> dict:
    """TR-DPO: sync_ref_model, or a ref_model_sync_steps / ref_model_mixup_alpha of its own, turns it on."""
    if not _switched(kwargs, "sync_ref_model", {"ref_model_sync_steps": 512, "ref_model_mixup_alpha": 0.6}, "TR-DPO"):
        return {}
    active = bool(reference.get("sync_steps"))  # keep what an earlier setting turned on
    steps = kwargs.get("ref_model_sync_steps") or (reference["sync_steps"] if active else 512)
    alpha = kwargs.get("ref_model_mixup_alpha", reference.get("sync_alpha", 0.6) if active else 0.6)
    return {"reference.sync_steps": int(steps), "reference.sync_alpha": float(alpha)}


def _lora(kwargs: dict, model: dict) -> dict:
    """use_peft, or a lora_* flag of its own, -> model.lora (each flag a LoraConfig field; prefopt's
    defaults for the rest: all linear layers, dropout 0)."""
    if not _switched(kwargs, "use_peft", LORA_DEFAULTS, "LoRA"):
        return {}
    given = {f"model.lora.{LORA[k]}": v for k, v in kwargs.items() if k in LORA and v is not None}
    return given or ({} if model.get("lora") else {"model.lora": {}})


def _losses(kwargs: dict, kind: str, default_loss: str, given: bool, existing=None) -> dict:
    """loss_type (a name or a list), loss_weights, rpo_alpha and the loss parameters. Without
    loss_type or rpo_alpha the parameters pass on as flat loss parameters of the single loss.
    With them, the parameters of the loss so far (``existing``) carry over, and beta is TRL's
    shared 0.1 unless given (TRL has one beta for every loss type)."""
    params = {LOSS_PARAMS[k]: F_DIVERGENCES.get(v, v) if k == "f_divergence_type" else v
              for k, v in kwargs.items() if k in LOSS_PARAMS}
    params = {k: v for k, v in params.items() if not (k == "ld_alpha" and v is None) and not (k == "wpo" and not v)}
    shape = float(kwargs.get("alpha") or 0.0)  # CPOConfig's AlphaPO reward shape (0: the log reward)
    types, weights, rpo = kwargs.get("loss_type"), kwargs.get("loss_weights"), kwargs.get("rpo_alpha")
    if types is None and weights is None and not rpo and not shape:
        return params
    if given:
        raise ConfigError("loss and loss_type both given: use one (loss_type and loss_weights are TRL's names)")
    # TRL's shared defaults: one beta for every loss type, and CPO's simpo_gamma
    carried = {"beta": LOSS_DEFAULTS["beta"], **({"gamma": LOSS_DEFAULTS["simpo_gamma"]} if kind == "cpo" else {}),
               **_loss_params(existing)}
    types = [types] if isinstance(types, str) else list(types or [default_loss])
    weights = [1.0] * len(types) if weights is None else list(weights)
    if len(weights) != len(types):
        raise ConfigError(f"loss_weights has {len(weights)} values for {len(types)} loss types {types}")
    terms = [{**_loss_term(t, kind), "weight": float(w)} for t, w in zip(types, weights)]
    if kind == "cpo" and types == ["alphapo"]:  # TRL's AlphaPO is SimPO's objective with cpo_alpha set to 0
        if not _same(params.pop("alpha", 0.0), 0.0):
            log.info("cpo_alpha has no effect with loss_type='alphapo': TRL sets it to 0 (no NLL term)")
    if kind == "cpo" and types == ["simpo"]:  # TRL's CPO-SimPO: SimPO + cpo_alpha * NLL of the chosen
        if shape:  # ... whose reward takes AlphaPO's shape when alpha is set
            terms[0]["name"] = "alphapo"
        alpha = float(params.pop("alpha", 1.0))
        if alpha:
            terms.append({"name": "sft", "weight": alpha})
    if rpo:  # older TRL: DPO + rpo_alpha * NLL of the chosen (TRL 1.16 writes it as loss_type [sigmoid, sft])
        terms.append({"name": "sft", "weight": float(rpo)})
    alphapo = [t for t in terms if t["name"] == "alphapo"]
    if shape and not alphapo:
        if kind != "cpo":
            raise ConfigError(f"alpha={shape:g} is CPOConfig's AlphaPO reward shape: use CPOConfig("
                              "loss_type='alphapo', alpha=...), or the loss {name: alphapo, alpha: ...}")
        raise ConfigError(f"alpha={shape:g} with loss_type {types[0]!r}: TRL reshapes CPO's own rewards with it "
                          "(summed log-probs for sigmoid and hinge); prefopt has AlphaPO as the paper defines "
                          "it, on SimPO's length-averaged log-probs: use loss_type='alphapo' (the loss "
                          "alphapo), or 'simpo' to keep cpo_alpha's NLL term as TRL does")
    _distribute(params, terms, {LOSS_PARAMS[k]: LOSS_DEFAULTS[k] for k in LOSS_PARAMS})
    _distribute({k: v for k, v in carried.items() if k not in params}, terms, None)  # where taken, silently
    for term in alphapo:  # TRL's alpha is the shape, never cpo_alpha (which _distribute may have put there)
        term["alpha"] = shape
    return {"loss": terms}


def _loss_params(loss) -> dict:
    """The parameters set on the loss of a config so far (a name, a mapping, a list, LossTerms)."""
    from prefopt.config import LossTerm, to_dict

    params: dict = {}
    for term in loss if isinstance(loss, list) else [loss] if loss else []:
        term = to_dict(term) if isinstance(term, LossTerm) else term
        if isinstance(term, dict):
            flat = {**(term.get("params") or {}), **term}
            params.update({k: v for k, v in flat.items() if k not in ("name", "weight", "params")})
    return params


def _loss_term(name: str, kind: str) -> dict:
    """A TRL loss_type of the trainer family ``kind`` -> a loss term (its name, fixed parameters)."""
    missing = NOT_YET.get(kind, {}).get(name)
    if missing:
        raise ConfigError(f"loss_type={name!r}: {missing} is not in prefopt yet")
    mapped = LOSS_TYPES.get(kind, {}).get(name, name)
    return dict(mapped) if isinstance(mapped, dict) else {"name": mapped}


def _distribute(params: dict, terms: list[dict], defaults: dict | None) -> None:
    """TRL shares one beta (one label_smoothing...) among its loss types: each parameter goes to
    every term that has it (and has not set it); one that no term has is an error unless it is
    TRL's default (``defaults``; None: carried parameters, never an error)."""
    from dataclasses import fields

    from prefopt.losses import get_spec
    from prefopt.losses.modifiers import MODIFIERS

    for key, value in params.items():
        takers = []
        for term in terms:
            try:
                spec = get_spec(term["name"])
            except KeyError as e:
                raise ConfigError(f"loss_type: {e.args[0]}") from None
            accepted = {f.name for f in fields(spec.params)} | (set(MODIFIERS) if spec.data == "paired" else set())
            if key in accepted:
                takers.append(term)
        if not takers and defaults is not None and not _same(value, defaults.get(key)):
            raise ConfigError(f"{key}={value!r}: none of the losses {[t['name'] for t in terms]} has this parameter")
        for term in takers:
            term.setdefault(key, value)
