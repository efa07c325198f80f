"""The loss registry. Importing this package registers every loss.

Public entry points: ``compute(name, **inputs_and_params)``, ``get_spec(name)``,
``list_specs()``, and the types ``LossInputs``, ``LossOutput``, ``LossSpec``.
"""
from prefopt.losses.base import (KNOWN_COLUMNS, LossInputs, LossOutput, LossSpec, MissingInputError,
                                 check_inputs, compute, get_spec, list_specs, param, register)
from prefopt.losses import dpo, sft  # noqa: F401  (registration)

__all__ = ["KNOWN_COLUMNS", "LossInputs", "LossOutput", "LossSpec", "MissingInputError",
           "check_inputs", "compute", "get_spec", "list_specs", "param", "register"]
