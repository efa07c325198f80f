"""Reference strategies: where πref log-probs come from.

A strategy is built from the config before the data is read and prepared once everything
else exists (``prepare(ReferenceContext)``), then asked for the reference scores of each
batch. Each strategy checks its own incompatibilities (a deep copy under ZeRO-3, a LoRA
reference without LoRA, a cache for token-level losses, ...) before any training step.

* ``ModelReference``: a separate frozen model, loaded from a path or copied from the
  initial policy before training starts (so evaluation after training can never use the
  trained policy as its reference).
* ``LoraReference``: the LoRA policy with its adapters disabled (no second copy).
* ``PrecomputedReference``: either of the above run once over the data in a pre-pass, the
  values cached on disk and the model freed.
* ``NoReference``: for reference-free objectives.
"""
from prefopt.reference.base import ReferenceContext, ReferenceStrategy, build_reference, reference_source
from prefopt.reference.lora import LoraReference
from prefopt.reference.model import ModelReference
from prefopt.reference.none import NoReference
from prefopt.reference.precomputed import PrecomputedReference

__all__ = ["ReferenceContext", "ReferenceStrategy", "LoraReference", "ModelReference", "NoReference",
           "PrecomputedReference", "build_reference", "reference_source"]
