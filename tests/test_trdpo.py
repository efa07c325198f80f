"""TR-DPO's moving reference: the update formula on known tensors, the reference after a run
equals the formula applied to the policy's weights, resume restores it, and what cannot
move (a LoRA base, a precomputed cache) is refused with the reason."""
import pytest
import torch
from safetensors.torch import load_file

from prefopt import ConfigError, DPOConfig, DPOTrainer
from prefopt.reference.synced import soft_update

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False,
             per_device_train_batch_size=2, learning_rate=1e-2)


def trainer(tiny_model_dir, records, out, **kw):
    return DPOTrainer(str(tiny_model_dir), None, train_dataset=records,
                      args=DPOConfig(output_dir=str(out), **{**SHORT, **kw}))


def test_soft_update_formula_on_known_tensors():
    ref, pol = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[1.0, -2.0]])), ref.bias.fill_(4.0)
        pol.weight.copy_(torch.tensor([[3.0, 2.0]])), pol.bias.fill_(0.0)
    soft_update(ref, pol, 0.25)  # 0.25*pol + 0.75*ref
    assert torch.equal(ref.weight, torch.tensor([[1.5, -1.0]])) and torch.equal(ref.bias, torch.tensor([3.0]))
    soft_update(ref, pol, 1.0)  # hard copy
    assert torch.equal(ref.weight, pol.weight) and torch.equal(ref.bias, pol.bias)


def reference_state(t) -> dict:
    return {k: v.detach().clone() for k, v in t.job.objective.reference.model.state_dict().items()}


@pytest.mark.parametrize("every, alpha", [(1, 1.0), (2, 0.5)])
def test_reference_after_training_follows_the_formula(tiny_model_dir, demo_records, tmp_path, every, alpha):
    initial = load_file(tiny_model_dir / "model.safetensors")
    t = trainer(tiny_model_dir, demo_records[:8], tmp_path / "run", max_steps=2, sync_ref_model=True, ref_model_sync_steps=every,
                ref_model_mixup_alpha=alpha)
    t.train()
    policy = load_file(tmp_path / "run" / "final" / "model.safetensors")
    ref = reference_state(t)
    assert t.job.objective.reference.syncs == 2 // every
    for name, value in policy.items():
        if every == 1:  # hard copy after the last step
            assert torch.equal(ref[name], value), name
        else:  # one soft update at step 2: alpha * θ_2 + (1 - alpha) * θ_0
            assert torch.allclose(ref[name], alpha * value + (1 - alpha) * initial[name], atol=1e-7), name
    assert any(not torch.equal(policy[n], initial[n]) for n in policy)


def test_resume_restores_the_moving_reference(tiny_model_dir, demo_records, tmp_path):
    common = dict(max_steps=4, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    full = trainer(tiny_model_dir, demo_records[:8], tmp_path / "full", save_steps=2, **common)
    full.train()
    resumed = trainer(tiny_model_dir, demo_records[:8], tmp_path / "resumed",
                      resume_from=str(tmp_path / "full" / "checkpoints" / "step-2"), **common)
    resumed.train()
    a, b = reference_state(full), reference_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    pb = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("extra, message", [
    (dict(lora={"r": 4}), "policy's own base"),
    (dict(reference_strategy="precomputed"), "would be stale"),
    (dict(ref_model_mixup_alpha=0.0), "sync_alpha must be in"),
])
def test_what_cannot_move_is_refused(tiny_model_dir, demo_records, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        trainer(tiny_model_dir, demo_records[:4], tmp_path / "x", max_steps=1, sync_ref_model=True, ref_model_sync_steps=1, **extra).train()
