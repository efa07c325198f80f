"""Hand-derived values for the reward-model loss (prefopt/losses/reward.py)."""
import pytest
import torch

from prefopt.losses import compute


def test_bradley_terry_by_hand():
    r_w, r_l = torch.tensor([1.0]), torch.tensor([-0.5])
    assert compute("bradley_terry", policy_chosen_logps=r_w, policy_rejected_logps=r_l).losses.item() == \
        pytest.approx(0.201413, abs=1e-6)
    assert compute("bradley_terry", policy_chosen_logps=r_w, policy_rejected_logps=r_l, use_margin=True,
                   extras={"margin": torch.tensor([0.5])}).losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert compute("bradley_terry", policy_chosen_logps=r_w, policy_rejected_logps=r_l,
                   center_rewards_coefficient=0.01).losses.item() == pytest.approx(0.203913, abs=1e-6)
