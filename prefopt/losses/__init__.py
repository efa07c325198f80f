"""The loss registry. Importing this package registers every loss.

Public entry points: ``compute(name, **inputs_and_params)``, ``get_spec(name)``,
``list_specs()``, and the types ``LossInputs``, ``LossOutput``, ``LossSpec``.

Modules, one per family: ``dpo`` (DPO, cDPO, reference-free, f-divergences, IPO, soft
labels, RPO, SPIN), ``variants`` (the other reference-based paired losses), ``reference_free``
(SimPO, ORPO, CPO, SLiC), ``kto`` (unpaired and paired KTO), ``tdpo`` (token-level),
``sft``, ``listwise`` (K responses per prompt: Plackett–Luce, several rejected, InfoNCA/NCA,
LiPO-λ, EXO).
"""
from prefopt.losses.base import (KNOWN_COLUMNS, LossInputs, LossOutput, LossSpec, MissingInputError,
                                 check_inputs, compute, get_spec, list_specs, param, register)
from prefopt.losses import dpo, variants, reference_free, kto, tdpo, sft, reward, listwise, modifiers  # noqa: F401,E402  (registration)

__all__ = ["KNOWN_COLUMNS", "LossInputs", "LossOutput", "LossSpec", "MissingInputError",
           "check_inputs", "compute", "get_spec", "list_specs", "param", "register"]
