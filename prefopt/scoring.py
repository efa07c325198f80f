"""Choosing, once per model at setup, the batch layout and the LM-head mode, and checking them.

The fastest layout (``shared``, then ``packed``) and head (``fused``, then ``scored``) are
only taken when the model and its attention implementation can run them exactly. Two
checks decide:

1. What the attention implementation can take (prefopt.attention.supported_layouts),
   whether the model attends through a sliding window shorter than a sequence (a custom
   mask would silently widen it), and whether it reads multi-modal RoPE (Qwen2-VL's 3-D
   positions, which it computes itself: padded rows only, prefopt.vlm.mrope).
2. A probe: the two shortest examples are scored with the candidate (layout, head), every
   unit packed into one row, and with the plain path (padded rows, full logits); every
   scored token's log-prob must agree to the precision's tolerance. A model whose forward
   ignores position ids, reads the mask in its own way, or does something after its head
   that prefopt does not know fails here. The probe runs the forward only (eval mode, no
   gradient); the paths it picks compute gradients with the same code (tests/test_layouts.py).

``auto`` falls back to the next candidate with one log line naming the reason; an explicit
choice the model cannot take is an error before training starts. With several processes,
every process probes and the largest difference decides, so all take the same path.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prefopt.attention import SPLIT_SDPA, attn_implementation, set_attention, supported_layouts
from prefopt.data.collate import make_collator
from prefopt.errors import ConfigError
from prefopt.logps import Scoring, output_head, score_batch, unwrap_model
from prefopt.vlm import mrope

log = logging.getLogger("prefopt")

# Per-token log-prob agreement required between a candidate and the plain path.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
LOW_PRECISION_TOLERANCE = 3e-2
LAYOUT_ORDER = ("shared", "packed", "padded")
HEAD_ORDER = ("fused", "scored", "full")


@dataclass
class Plan:
    layout: str
    scoring: Scoring
    notes: list[str] = field(default_factory=list)


@dataclass
class Probe:
    """What the probe needs besides the model: a few examples (roles expanded) and the run's
    batch and precision settings. ``agree`` turns one process's worst difference into the
    largest over every process (identity in one process)."""
    examples: list
    pad_id: int
    roles: tuple[str, ...]
    max_length: int
    device: torch.device | str = "cpu"
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None
    mixed_precision: str = "no"
    sharded: bool = False            # FSDP / DeepSpeed: the fused head is not used (below)
    agree: Callable[[float], float] = lambda worst: worst
    log_notes: bool = True

    def tolerance(self, dtype: torch.dtype) -> float:
        if self.mixed_precision in ("bf16", "fp16"):
            return LOW_PRECISION_TOLERANCE
        return TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)

    @torch.no_grad()
    def score(self, model, layout: str, scoring: Scoring) -> torch.Tensor:
        """Every scored token's log-prob. Tokens are ordered by sequence, and sequences are
        numbered the same way in every layout; packed and shared probes put every unit in one
        row, so restarting positions and the isolation between units are checked too."""
        options = {} if layout == "padded" else {"max_tokens_per_row": 1 << 30}
        batch = make_collator(layout, self.pad_id, self.roles, **options)(self.examples).to(self.device)
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            scores = score_batch(model, batch, scoring)
        # per token for a causal LM; per sequence for a reward model (the same order in every layout)
        values = scores.logps if scoring.head == "reward" else scores.token_logps
        return values.float().cpu()


def static_layout_problem(model, layout: str, max_length: int) -> str | None:
    """Why ``model`` cannot take ``layout`` (None when it can), without running it."""
    if layout == "padded":
        return None
    impl = attn_implementation(model)
    if layout not in supported_layouts(impl):
        kinds = "custom attention masks" if layout == "shared" else "packed sequences"
        return f"attention implementation '{impl}' takes no {kinds}"
    config = getattr(model, "config", None)
    if (why := mrope(config)) is not None:
        return (f"the model reads multi-modal RoPE ({why}): 3-D position ids it computes itself "
                f"(get_rope_index), which prefopt's packed and prompt-shared rows do not reproduce")
    window = getattr(config, "sliding_window", None)
    sliding = window and getattr(config, "use_sliding_window", True) is not False and \
        "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
    if sliding and window < max_length:
        return (f"the model attends through a sliding window of {window} tokens, shorter than "
                f"data.max_length={max_length}, which a packed mask does not express")
    return None


def plan_scoring(model, probe: Probe, *, layout: str, head: str, chunk_size: int | None,
                 what: str = "policy") -> Plan:
    """Pick (layout, attention, head) for ``model``; ``what`` names it in messages."""
    raw = unwrap_model(model)
    notes: list[str] = []
    candidates = []
    for name in LAYOUT_ORDER if layout == "auto" else (layout,):
        problem = static_layout_problem(raw, name, probe.max_length)
        if problem is None:
            candidates.append(name)
        elif layout == "auto":
            notes.append(f"layout {name}: {problem}")
        else:
            alt = [n for n in LAYOUT_ORDER if static_layout_problem(raw, n, probe.max_length) is None]
            raise ConfigError(f"data.layout={name}: the {what} model cannot take it: {problem}; use "
                              f"data.layout={alt[0]} (or auto)")
    base = Scoring.for_model(model, "reward" if head == "reward" else "full")
    tol = probe.tolerance(base.dtype)
    was_training = raw.training
    model.eval()
    try:
        expected = probe.score(model, "padded", base)
        check = _Check(probe, expected, tol, notes, what)
        chosen_layout, attn = _choose_layout(model, candidates, check, base, explicit=layout != "auto")
        heads = []
        for name in () if head == "reward" else HEAD_ORDER if head == "auto" else (head,):
            problem = None
            if name == "fused" and output_head(model) is None:
                problem = ("the output embedding is not a plain nn.Linear (e.g. a LoRA or quantised head); "
                           "model.lm_head=scored runs the model's own head")
            elif name == "fused" and probe.sharded:
                problem = ("under FSDP/DeepSpeed the head's weight is gathered for its own forward only, and the "
                           "fused head reads it outside that forward in backward; model.lm_head=scored")
            if problem is None:
                heads.append(name)
            elif head == "auto":
                notes.append(f"head {name} not used: {problem}")
            else:
                raise ConfigError(f"model.lm_head={name}: {problem}")
        chosen_head = "reward" if head == "reward" else check.first(heads, lambda name: probe.score(
            model, chosen_layout, Scoring(attn, name, chunk_size, base.dtype)), "head", explicit=head != "auto")
    finally:
        model.train(was_training)
    if probe.log_notes:
        for note in notes:
            log.info("%s: %s", what, note)
    return Plan(chosen_layout, Scoring(attn, chosen_head, chunk_size, base.dtype), notes)


def _choose_layout(model, candidates: list[str], check: "_Check", base: Scoring, explicit: bool) -> tuple[str, str]:
    """The first layout (and attention implementation) that reproduces the plain path. For an
    SDPA model, packed and shared rows first try prefopt's split SDPA, which switches the
    model's attention implementation."""
    raw = unwrap_model(model)
    for name in candidates:
        if name == "padded":
            return name, base.attn
        options = [SPLIT_SDPA, base.attn] if base.attn == "sdpa" else [base.attn]
        for option in options:
            set_attention(raw, option)
            scoring = Scoring(option, base.head, None, base.dtype)
            if check.first([name], lambda n: check.probe.score(model, n, scoring), "layout",
                           explicit=explicit and option == options[-1], fallback=False,
                           detail=f" with attention '{option}'"):
                return name, option
            set_attention(raw, base.attn)
    return "padded", base.attn


@dataclass
class _Check:
    probe: Probe
    expected: torch.Tensor
    tol: float
    notes: list[str]
    what: str

    def first(self, candidates: list[str], run, kind: str, explicit: bool, fallback: bool = True,
              detail: str = "") -> str | None:
        """The first candidate whose probe matches the plain path (None when none does and
        ``fallback`` is off). Exceptions count as a mismatch: e.g. no ``logits_to_keep``."""
        for name in candidates:
            if name in ("padded", "full"):
                return name
            try:
                worst, problem = float((run(name) - self.expected).abs().max()), ""
            except (TypeError, ValueError, RuntimeError) as e:
                worst, problem = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            worst = self.probe.agree(worst)
            if worst <= self.tol:
                return name
            problem = problem or (f"per-token log-probs differ from the plain path by up to {worst:.2g} "
                                  f"(tolerance {self.tol:g}) on a probe batch")
            if explicit:
                key = "data.layout" if kind == "layout" else "model.lm_head"
                raise ConfigError(f"{key}={name} does not reproduce the {self.what} model's log-probs{detail}: "
                                  f"{problem}")
            self.notes.append(f"{kind} {name}{detail} not used: {problem}")
        if not fallback:
            return None
        raise AssertionError("the plain path is always a candidate")


def architecture_key(model) -> str:
    """What a plan depends on: the model class, its configuration (not its weights or name), its
    dtype and its attention implementation (prefopt's split SDPA counts as SDPA)."""
    raw = unwrap_model(model)
    if not hasattr(getattr(raw, "config", None), "to_dict"):
        return f"unknown:{id(raw)}"  # nothing to compare: no reuse
    config = {k: v for k, v in raw.config.to_dict().items() if k not in ("_name_or_path", "name_or_path")}
    impl = attn_implementation(raw)
    dtype = next((str(p.dtype) for p in raw.parameters() if p.is_floating_point()), "")
    return json.dumps([type(raw).__name__, "sdpa" if impl == SPLIT_SDPA else impl, dtype, config],
                      sort_keys=True, default=str)


def reuse_plan(model, plan: Plan) -> Plan:
    """``plan`` (made for a model of the same architecture) applied to ``model``."""
    set_attention(unwrap_model(model), plan.scoring.attn)
    return Plan(plan.layout, plan.scoring)
