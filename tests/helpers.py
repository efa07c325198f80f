"""Test helpers shared by several test modules (imported as `helpers`; tests/ is on sys.path)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from prefopt.logps import score_batch
from prefopt.train import loop
from prefopt.train.checkpoint import TrainState


def step_in_each_layout(policy, objective, examples, name: str) -> dict:
    """``{layout: (term name's per-example losses, the policy's gradient, the step, the batch)}``: one
    forward/backward of ``objective`` on ``examples`` in each layout, to compare them."""
    from prefopt.data.collate import make_collator

    results = {}
    for layout in ("padded", "packed", "shared"):
        batch = make_collator(layout, 0, objective.roles, extras=objective.extra_columns)(examples)
        policy.zero_grad()
        step = objective.forward(policy, batch, objective.units(batch))
        step.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters()])
        results[layout] = (step.outputs[name].losses.detach(), grads, step, batch)
    return results


def first_step_gradient(trainer) -> torch.Tensor:
    """The gradient of the first optimizer step, captured just before optimizer.step."""
    job = trainer.setup()
    captured = {}
    job.optimizer.step = lambda *a, **k: captured.setdefault(
        "g", torch.cat([p.grad.flatten().clone() for p in job.model.parameters() if p.requires_grad]))
    window, _, _ = next(loop._windows(job, TrainState()))
    loop.optimizer_step(job, window, loop.MetricAccumulator())
    return captured["g"]


class TinyLM(torch.nn.Module):
    """A bigram 'language model': enough for score_batch, milliseconds to run."""

    def __init__(self, vocab=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


class FrozenReference:
    """A minimal reference strategy around a model (no accelerator)."""
    name = "model"

    def __init__(self, model):
        self.model = model

    def scores(self, batch, keep_token_logprobs=False):
        with torch.no_grad():
            return score_batch(self.model, batch, keep_token_logprobs=keep_token_logprobs)
