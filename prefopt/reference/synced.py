"""TR-DPO's trust-region reference (Gorbatovski et al. 2024, "Learn Your Reference Model for
Real Good Alignment", §3): every τ optimizer steps the reference moves toward the policy,

    soft update:  θ_ref ← α·θ + (1 − α)·θ_ref      (TR-DPO^α; α = 1 is the hard update TR-DPO^τ)

A separate reference model is needed (a frozen copy of the initial policy, or
reference.name_or_path). It is training state: unlike a frozen reference it is saved in every
checkpoint (accelerate's state holds it as a second model) so a resumed run continues from
the reference it had. What it cannot serve, it refuses at build time: a LoRA reference is the
policy's own base weights (moving them would move the policy too), and a precomputed cache
would be stale after the first sync.
"""
from __future__ import annotations

import torch

from prefopt.data.collate import Batch
from prefopt.errors import ConfigError
from prefopt.logps import SequenceScores, unwrap_model


@torch.no_grad()
def soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """θ_ref ← α·θ + (1 − α)·θ_ref for every parameter, matched by name (LoRA weights of the
    policy have no counterpart in the reference and are not read). Under FSDP2 both are sharded
    the same way and the update is shard by shard: every FSDP unit is resharded first, since a
    unit that keeps its parameters gathered after forward (accelerate wraps the final norm and the
    head so) shows them as plain tensors until then. (DeepSpeed is refused in ``prepare``.)"""
    _reshard(reference)
    _reshard(policy)
    ref_params = dict(unwrap_model(reference).named_parameters())
    pol_params = dict(unwrap_model(policy).named_parameters())
    missing = [n for n in ref_params if n not in pol_params]
    if missing:
        raise ConfigError(f"TR-DPO sync: the policy has no parameter {missing[0]} of the reference "
                          f"({len(missing)} missing): the reference must have the policy's architecture")
    for name, ref in ref_params.items():
        ref.lerp_(pol_params[name].detach().to(ref.dtype), alpha)


def _reshard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class SyncedReference:
    name = "synced"

    def __init__(self, inner, every: int, alpha: float):
        if every < 1:
            raise ConfigError(f"reference.sync_steps must be >= 1 for TR-DPO (got {every})")
        if not 0 < alpha <= 1:
            raise ConfigError(f"reference.sync_alpha must be in (0, 1] (got {alpha}; 1 is a hard copy)")
        self.inner, self.every, self.alpha = inner, every, alpha
        kind = "hard copy" if alpha == 1 else f"soft update alpha={alpha:g}"
        self.description = f"{inner.description}, synced to the policy every {every} steps ({kind}, TR-DPO)"
        self.policy = None
        self.syncs = 0

    @property
    def model(self):
        return self.inner.model

    def prepare(self, ctx) -> None:
        from accelerate.utils import DistributedType

        if ctx.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # accelerate checkpoints every prepared model through DeepSpeed's engine, which a
            # reference (a plain module under ZeRO-1/2, an inference engine under ZeRO-3) is not
            raise ConfigError("TR-DPO (reference.sync_steps) under DeepSpeed: its moving reference is training "
                              "state that DeepSpeed's checkpoints cannot hold, so a checkpoint would fail; use "
                              "DDP or FSDP2 (configs/accelerate/ddp.yaml, fsdp2.yaml)")
        self.inner.prepare(ctx)
        self.policy = ctx.policy
        # The moving reference is training state: keep it, whole, in accelerate's checkpoints.
        from prefopt.lora import CHECKPOINT_ALL
        setattr(unwrap_model(self.inner.model), CHECKPOINT_ALL, True)
        if self.inner.model not in ctx.accelerator._models:
            ctx.accelerator._models.append(self.inner.model)

    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores:
        return self.inner.scores(batch, keep_token_logprobs)

    def after_optimizer_step(self, step: int) -> None:
        if step % self.every == 0:
            soft_update(self.inner.model, self.policy, self.alpha)
            self.syncs += 1
