"""Invariants over the whole registry: a new loss is covered as soon as it is registered.

Each loss runs on one standard batch that carries every input (policy prefers the chosen),
and must: return finite per-example losses; stay finite with finite gradients at extreme
log-probs; lose more when chosen and rejected are swapped (or labels flipped); have docs.
The reductions to DPO that the papers state are checked one by one.
"""
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from prefopt import losses
from prefopt.losses import LossInputs, list_specs

T = torch.tensor
SPECS = list_specs()
IDS = [s.name for s in SPECS]


def paired_inputs(**over) -> dict:
    # r_w = [5, 5, 2], r_l = [-5, -5, -1]: the policy prefers every chosen more than the reference does
    kw = dict(policy_chosen_logps=T([-10.0, -20.0, -5.0]), policy_rejected_logps=T([-20.0, -35.0, -9.0]),
              ref_chosen_logps=T([-15.0, -25.0, -7.0]), ref_rejected_logps=T([-15.0, -30.0, -8.0]),
              chosen_lengths=T([5, 10, 3]), rejected_lengths=T([5, 12, 4]),
              chosen_seq_kl=T([0.1, 0.2, 0.0]), rejected_seq_kl=T([0.3, 0.1, 0.2]),
              extras={"preference_prob": T([0.9, 0.8, 1.0]), "score_chosen": T([8.0, 9.0, 7.0]),
                      "score_rejected": T([3.0, 2.0, 5.0]), "margin": T([0.5, 1.0, 0.0])})
    kw.update(over)
    kw.setdefault("policy_ref_completion_logps", kw["policy_chosen_logps"])
    kw.setdefault("ref_completion_lengths", kw["chosen_lengths"])
    return kw


def unpaired_inputs(labels=(True, True, False, False), **over) -> dict:
    # r = [2, 5, -5, -3]: desirable completions gained probability, undesirable ones lost it
    kw = dict(policy_logps=T([-10.0, -20.0, -30.0, -8.0]), ref_logps=T([-12.0, -25.0, -25.0, -5.0]),
              lengths=T([5, 10, 12, 4]), labels=T(list(labels)),
              policy_kl_logps=T([-15.0, -22.0, -31.0, -9.0]), ref_kl_logps=T([-14.0, -24.0, -30.0, -9.0]))
    kw.update(over)
    return kw


def inputs_for(spec, **over) -> dict:
    # listwise losses (tests/test_listwise.py) take a pair as K = 2, scored by score_chosen/score_rejected
    return unpaired_inputs(**over) if spec.data == "unpaired" else paired_inputs(**over)


def swapped() -> dict:
    kw = paired_inputs()
    swap = {"policy_chosen_logps": "policy_rejected_logps", "ref_chosen_logps": "ref_rejected_logps",
            "chosen_lengths": "rejected_lengths", "chosen_seq_kl": "rejected_seq_kl"}
    out = dict(kw)
    for a, b in swap.items():
        out[a], out[b] = kw[b], kw[a]
    out["policy_ref_completion_logps"], out["ref_completion_lengths"] = out["policy_chosen_logps"], out["chosen_lengths"]
    return out


def run(name, **kw):
    return losses.compute(name, state={}, **kw)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_runs_on_standard_inputs_with_finite_per_example_losses(spec):
    out = run(spec.name, **inputs_for(spec))
    batch = 4 if spec.data == "unpaired" else 3
    assert out.losses.shape == (batch,) and torch.isfinite(out.losses).all()
    for name, value in out.metrics.items():
        assert torch.isfinite(torch.as_tensor(value)).all(), name


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_finite_and_differentiable_at_extreme_log_probs(spec):
    big, tiny = -1e4, -1e-4
    if spec.data == "unpaired":
        kw = unpaired_inputs(policy_logps=T([tiny, big, big, tiny]), ref_logps=T([big, tiny, big, tiny]),
                             lengths=T([1, 2000, 7, 1]), policy_kl_logps=T([big, tiny, tiny, big]),
                             ref_kl_logps=T([tiny, big, tiny, big]))
        grad_fields = ["policy_logps", "policy_kl_logps"]
    else:
        kw = paired_inputs(policy_chosen_logps=T([tiny, big, big]), policy_rejected_logps=T([big, tiny, big]),
                           ref_chosen_logps=T([big, tiny, tiny]), ref_rejected_logps=T([tiny, big, big]),
                           chosen_lengths=T([1, 2000, 1]), rejected_lengths=T([2000, 1, 1]),
                           chosen_seq_kl=T([0.0, 1e4, 5.0]), rejected_seq_kl=T([1e4, 0.0, 5.0]))
        grad_fields = ["policy_chosen_logps", "policy_rejected_logps", "chosen_seq_kl", "rejected_seq_kl"]
    for f in grad_fields:
        kw[f] = kw[f].clone().requires_grad_(True)
    if "policy_ref_completion_logps" in kw:
        kw["policy_ref_completion_logps"] = kw["policy_chosen_logps"]
    out = run(spec.name, **kw)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    for f in grad_fields:
        grad = kw[f].grad
        assert grad is None or torch.isfinite(grad).all(), (f, grad)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_swapping_chosen_and_rejected_costs_more(spec):
    """When the policy prefers the chosen, swapping the pair (or flipping labels) raises the loss."""
    if spec.data == "unpaired":
        base = run(spec.name, **unpaired_inputs()).losses.sum()
        flipped = run(spec.name, **unpaired_inputs(labels=(False, False, True, True))).losses.sum()
    else:
        base = run(spec.name, **paired_inputs()).losses.sum()
        flipped = run(spec.name, **swapped()).losses.sum()
    assert flipped > base, (float(base), float(flipped))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_rewards_swap_with_the_pair(spec):
    if spec.data == "unpaired":
        pytest.skip("unpaired losses report desirable/undesirable rewards, not pairs")
    a, b = run(spec.name, **paired_inputs()), run(spec.name, **swapped())
    if a.chosen_rewards is None:
        pytest.skip(f"{spec.name} defines no implicit reward")
    if spec.stateful or spec.name in ("aot", "aot_unpaired"):
        pytest.skip("batch-level statistics")
    assert torch.allclose(a.chosen_rewards, b.rejected_rewards) and torch.allclose(a.rejected_rewards, b.chosen_rewards)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_documented_and_defaults_valid(spec):
    assert spec.paper and spec.equation and spec.summary and spec.fn.__doc__
    assert "hand check" in spec.fn.__doc__.lower(), "docstring must carry the hand-derived example"
    spec.make_params({})  # defaults satisfy their own ranges
    for name, _, text in spec.param_docs():
        assert text.strip(), f"{spec.name}.{name} has no help text"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_loss_has_a_hand_derived_test(spec):
    here = Path(__file__).parent
    sources = "".join(p.read_text() for p in [*here.glob("test_losses_*.py"), here / "test_listwise.py"])
    assert f'"{spec.name}"' in sources, f"no test_losses_*.py (or test_listwise.py) mentions '{spec.name}'"


# -------------------------------------------------------------------- reductions to DPO
def dpo(**kw):
    return run("dpo", **paired_inputs(**kw)).losses


REDUCTIONS = [
    ("dpo", {"label_smoothing": 0.0}, {}),                        # cDPO with eps = 0
    ("robust", {"label_smoothing": 0.0}, {}),                     # rDPO with eps = 0
    ("dpop", {"dpop_lambda": 0.0}, {}),                            # DPOP with lambda = 0
    ("odpo", {"offset": "margin"}, {"extras": {"margin": T([0.0, 0.0, 0.0])}}),  # ODPO with delta = 0
    ("soft_dpo", {}, {"extras": {"preference_prob": T([1.0, 1.0, 1.0])}}),       # soft labels, p = 1
    ("gdpo", {}, {"extras": {"preference_prob": T([1.0, 1.0, 1.0])}}),           # geometric averaging, p = 1
    ("tdpo1", {}, {"chosen_seq_kl": T([0.0] * 3), "rejected_seq_kl": T([0.0] * 3)}),  # policy == reference
    ("tdpo2", {}, {"chosen_seq_kl": T([0.0] * 3), "rejected_seq_kl": T([0.0] * 3)}),
    ("rpo", {"alpha": 0.0}, {}),
    ("spin", {}, {}),
    ("plackett_luce", {}, {}),        # listwise losses take a pair as K = 2
    ("dpo_multi_rejected", {}, {}),
]


@pytest.mark.parametrize("name, params, data", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
def test_reduces_to_dpo(name, params, data):
    if name not in IDS:
        pytest.fail(f"{name} is not registered")
    got = run(name, **paired_inputs(**data), **params).losses
    assert torch.allclose(got, dpo(), atol=1e-6), (got, dpo())


def test_registry_lists_every_required_loss():
    required = {"dpo", "ipo", "slic", "hinge", "robust", "dpop", "odpo", "simpo", "orpo", "cpo", "kto", "tdpo1",
                "tdpo2", "spin", "soft_dpo", "rpo", "bco_pair", "nca_pair", "exo_pair", "apo_zero", "apo_down",
                "sppo_hard", "aot", "aot_unpaired", "discopop", "sigmoid_norm", "sft", "alphapo", "tpo", "tpo_l",
                "gdpo"}
    assert required <= set(IDS), sorted(required - set(IDS))
    assert {f.name for f in fields(LossInputs)} >= {"policy_chosen_logps", "policy_logps", "chosen_seq_kl", "state"}
