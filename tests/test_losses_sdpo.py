"""Hand-derived values for SDPO (prefopt/losses/dpo.py: ``sdpo``; the segment data: tests/test_sdpo.py)."""
import math

import pytest
import torch

from prefopt import losses

T = torch.tensor


def test_sdpo_hand_derived_from_turn_log_ratios():
    # Two assistant turns per segment. Chosen turns: policy -4, -6 (ref -5.5, -6.5): log-ratios 1.5 and
    # 0.5, segment sum r_w = 2. Rejected turns: policy -7, -8 (ref -6.75, -7.25): -0.25 and -0.75,
    # r_l = -1. beta = 0.1: L = -log sigmoid(0.1 * (2 - (-1))) = log(1 + e^-0.3) = 0.554355.
    out = losses.compute("sdpo", policy_chosen_logps=T([-4.0 - 6.0]), policy_rejected_logps=T([-7.0 - 8.0]),
                         ref_chosen_logps=T([-5.5 - 6.5]), ref_rejected_logps=T([-6.75 - 7.25]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.3)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.554355, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.2)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)
