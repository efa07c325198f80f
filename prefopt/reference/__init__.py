"""Reference strategies: where πref log-probs come from.

A strategy is prepared once with the accelerator and the policy, then asked for the
reference scores of each batch. Each strategy checks its own incompatibilities (a
deep copy under ZeRO-3/FSDP, a reference requested but none configured, ...) when it
is built, before any training starts.

* ``ModelReference``: a separate frozen model, loaded from a path or copied from the
  initial policy before training starts (so evaluation after training can never use the
  trained policy as its reference).
* ``NoReference``: for reference-free objectives.
"""
from prefopt.reference.base import ReferenceContext, ReferenceStrategy, build_reference
from prefopt.reference.model import ModelReference
from prefopt.reference.none import NoReference

__all__ = ["ReferenceContext", "ReferenceStrategy", "ModelReference", "NoReference", "build_reference"]
