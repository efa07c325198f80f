"""Role expansion: every example gets a completion for each role the objective scores, once,
before any collator, so every layout (and the reference cache) gets them for free.

* ``chosen``/``rejected``/``completion`` come from the data.
* ``kl`` (KTO's reference point z0, Ethayarajh et al. 2024 §4.1): the prompt of example i with
  the completion of example i + 1 (mod N) in dataset order: a mismatched pair fixed per
  example, as TRL builds its KL dataset, so it does not depend on which examples share a
  micro-batch and a cached reference value stays valid across epochs and batch sizes.
* ``ref_completion`` (SLiC's regularisation target): the record's column when present, else
  the chosen completion; equal completions of one example share one sequence in a batch,
  so a dataset without the column costs no extra forward.
* ``response_0`` .. ``response_{K-1}`` (listwise data, best first): the objective asks for as
  many as its losses accept (``max_responses``); an example with fewer responses fills the rest
  with its last response. Equal completions of one example share one sequence, so the filling
  costs no forward, and the batch's ``response_mask`` (from the example's own scores) marks
  the real ones: K may vary between examples and batches, padded to the objective's K with a mask.
"""
from __future__ import annotations

import dataclasses

import logging

from prefopt.data.tokenize import RESPONSE_ROLE, SCORES, EncodedExample

log = logging.getLogger("prefopt")


def expand_roles(examples: list[EncodedExample], roles: tuple[str, ...]) -> list[EncodedExample]:
    """New examples carrying one completion per role in ``roles`` (the input is not modified)."""
    out = []
    n = len(examples)
    if "kl" in roles and n == 1:
        log.warning("%s: one example only: its 'mismatched' pair for KTO's z0 is its own completion", examples[0].origin)
    for i, ex in enumerate(examples):
        completions, scored = dict(ex.completions), dict(ex.scored)
        if "kl" in roles:
            other = examples[(i + 1) % n]
            completions["kl"] = other.completions["completion"]
            if "completion" in other.scored:  # a segment keeps its scored-token mask
                scored["kl"] = other.scored["completion"]
        if "ref_completion" in roles and "ref_completion" not in completions:
            completions["ref_completion"] = completions["chosen"]
            if "chosen" in scored:
                scored["ref_completion"] = scored["chosen"]
        if SCORES in ex.extras:  # listwise: the missing response roles repeat the last response
            own = len(ex.extras[SCORES])
            if RESPONSE_ROLE.format(own) in roles and RESPONSE_ROLE.format(own - 1) in completions:
                for k in range(own, sum(r.startswith(RESPONSE_ROLE.format("")) for r in roles)):
                    completions[RESPONSE_ROLE.format(k)] = completions[RESPONSE_ROLE.format(own - 1)]
        missing = [r for r in roles if r not in completions]
        if missing:
            raise ValueError(f"{ex.origin}: no completion for role(s) {', '.join(missing)}")
        out.append(dataclasses.replace(ex, completions=completions, scored=scored))
    return out
