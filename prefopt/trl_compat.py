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


def translate(kwargs: dict, kind: str = "dpo", default_loss: str = "dpo") -> dict:
    """TRL-named keyword arguments -> prefopt's flat ones (prefopt names pass through unchanged).
    ``kind`` is the trainer family (dpo, kto, cpo, orpo, reward, sft) whose loss_type names apply."""
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
    if _value(kwargs.get("eval_strategy", kwargs.get("evaluation_strategy"))) == "steps" \
            and kwargs.get("eval_steps") is None:
        out["eval_steps"] = int(kwargs.get("logging_steps") or 10)
    if _value(kwargs.get("save_strategy")) == "steps" and kwargs.get("save_steps") is None:
        out["save_steps"] = 500
    out.update(_precision(kwargs))
    out.update(_sync(kwargs))
    out.update(_lora(kwargs))
    out.update(_losses(kwargs, kind, default_loss, given="loss" in out))
    return out


def _precision(kwargs: dict) -> dict:
    from prefopt.coerce import coerce

    fp16, bf16 = (None if kwargs.get(k) is None else coerce(kwargs[k], bool, k) for k in ("fp16", "bf16"))
    if fp16 and bf16:
        raise ConfigError("bf16=True and fp16=True: choose one mixed precision")
    if fp16:
        return {"mixed_precision": "fp16"}
    if bf16 is not None:
        return {"mixed_precision": "bf16" if bf16 else "no"}
    return {"mixed_precision": "no"} if fp16 is False and "bf16" in kwargs else {}


def _sync(kwargs: dict) -> dict:
    """TR-DPO: sync_ref_model switches it on; its two settings act only then (as in TRL)."""
    if not kwargs.get("sync_ref_model"):
        for name, default in (("ref_model_sync_steps", 512), ("ref_model_mixup_alpha", 0.6)):
            if name in kwargs and not _same(kwargs[name], default):
                raise ConfigError(f"{name}={kwargs[name]!r} acts only with sync_ref_model=True (TR-DPO), as in "
                                  "TRL: set sync_ref_model=True, or drop it")
        return {}
    return {"reference.sync_steps": int(kwargs.get("ref_model_sync_steps", 512)),
            "reference.sync_alpha": float(kwargs.get("ref_model_mixup_alpha", 0.6))}


def _lora(kwargs: dict) -> dict:
    """use_peft with the lora_* flags -> model.lora (prefopt's defaults for what is not given)."""
    given = {LORA[k]: v for k, v in kwargs.items() if k in LORA and v is not None}
    if not kwargs.get("use_peft"):
        for name in LORA:
            if name in kwargs and not _same(kwargs[name], LORA_DEFAULTS[name]):
                raise ConfigError(f"{name}={kwargs[name]!r} acts only with use_peft=True, as in TRL: set use_peft=True, "
                                  "or drop it")
        return {}
    return {"model.lora": given}


def _losses(kwargs: dict, kind: str, default_loss: str, given: bool) -> dict:
    """loss_type (a name or a list), loss_weights, rpo_alpha and the loss parameters. Without
    loss_type or rpo_alpha the parameters pass on as flat loss parameters of the single loss."""
    params = {LOSS_PARAMS[k]: F_DIVERGENCES.get(v, v) if k == "f_divergence_type" else v
              for k, v in kwargs.items() if k in LOSS_PARAMS}
    params = {k: v for k, v in params.items() if not (k == "ld_alpha" and v is None) and not (k == "wpo" and not v)}
    shape = float(kwargs.get("alpha") or 0.0)  # CPOConfig's AlphaPO reward shape (0: the log reward)
    types, weights, rpo = kwargs.get("loss_type"), kwargs.get("loss_weights"), kwargs.get("rpo_alpha")
    if types is None and weights is None and not rpo and not shape:
        return params
    if given:
        raise ConfigError("loss and loss_type both given: use one (loss_type and loss_weights are TRL's names)")
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
    for term in alphapo:  # TRL's alpha is the shape, never cpo_alpha (which _distribute may have put there)
        term["alpha"] = shape
    return {"loss": terms}


def _loss_term(name: str, kind: str) -> dict:
    """A TRL loss_type of the trainer family ``kind`` -> a loss term (its name, fixed parameters)."""
    missing = NOT_YET.get(kind, {}).get(name)
    if missing:
        raise ConfigError(f"loss_type={name!r}: {missing} is not in prefopt yet")
    mapped = LOSS_TYPES.get(kind, {}).get(name, name)
    return dict(mapped) if isinstance(mapped, dict) else {"name": mapped}


def _distribute(params: dict, terms: list[dict], defaults: dict) -> None:
    """TRL shares one beta (one label_smoothing...) among its loss types: each parameter goes to
    every term that has it; one that no term has is an error unless it is TRL's default."""
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
        if not takers and not _same(value, defaults.get(key)):
            raise ConfigError(f"{key}={value!r}: none of the losses {[t['name'] for t in terms]} has this parameter")
        for term in takers:
            term[key] = value


# What the converted fields become, for the README's table.
