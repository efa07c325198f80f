"""Choosing, once per model at setup, the batch layout and the LM-head mode, and checking them.

The fastest layout (``shared``, then ``packed``) and head (``fused``, then ``scored``) are
only taken when the model and its attention implementation can run them exactly. Two
checks decide:

1. What the attention implementation can take (prefopt.attention.supported_layouts), and
   whether the model attends through a sliding window shorter than a sequence (a custom
   mask would silently widen it).
2. A probe: the first examples of the data are scored with the candidate (layout, head)
   and with the plain path (padded, full logits); per-token log-probs must agree to the
   precision's tolerance. A model whose forward ignores position ids, reads the mask in
   its own way, or does something after its head that prefopt does not know fails here.

``auto`` falls back to the next candidate with one log line naming the reason; an explicit
choice the model cannot take is an error before training starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from prefopt.attention import SPLIT_SDPA, attn_implementation, register_split_sdpa, supported_layouts
from prefopt.data.collate import make_collator
from prefopt.errors import ConfigError
from prefopt.logps import Scoring, output_head, score_batch, unwrap_model

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
    notes: list[str]


def static_layout_problem(model, layout: str, max_length: int) -> str | None:
    """Why ``model`` cannot take ``layout`` (None when it can), without running it."""
    if layout == "padded":
        return None
    impl = attn_implementation(model)
    if layout not in supported_layouts(impl):
        kinds = "custom attention masks" if layout == "shared" else "packed sequences"
        return f"attention implementation '{impl}' takes no {kinds}"
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    sliding = window and getattr(config, "use_sliding_window", True) is not False and \
        "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
    if sliding and window < max_length:
        return (f"the model attends through a sliding window of {window} tokens, shorter than "
                f"data.max_length={max_length}, which a packed mask does not express")
    return None


def plan_scoring(model, *, layout: str, head: str, chunk_size: int | None, probe: list, pad_id: int,
                 roles: tuple[str, ...], max_length: int, device, autocast, what: str = "model") -> Plan:
    """Pick (layout, head) for ``model``. ``probe``: a few examples (roles expanded) to check on;
    ``autocast``: a context manager factory for the run's precision."""
    raw = unwrap_model(model)
    notes: list[str] = []
    layouts = LAYOUT_ORDER if layout == "auto" else (layout,)
    heads = HEAD_ORDER if head == "auto" else (head,)
    candidates = []
    for name in layouts:
        problem = static_layout_problem(raw, name, max_length)
        if problem is None:
            candidates.append(name)
        elif layout == "auto":
            notes.append(f"layout {name}: {problem}")
        else:
            alt = [n for n in LAYOUT_ORDER if static_layout_problem(raw, n, max_length) is None]
            raise ConfigError(f"data.layout={name}: {problem}; use data.layout={alt[0]} (or auto)")
    base = Scoring.for_model(model, "full")
    impl, dtype = base.attn, base.dtype
    tol = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    if autocast is not None and getattr(autocast(), "fast_dtype", None) in (torch.bfloat16, torch.float16):
        tol = LOW_PRECISION_TOLERANCE
    was_training = raw.training
    model.eval()
    try:
        expected = _score(model, probe, "padded", base, pad_id, roles, device, autocast)
        chosen_layout, attn = _choose_layout(model, candidates, expected, tol, notes, probe, base, pad_id, roles,
                                             device, autocast, explicit=layout != "auto")
        head_candidates = []
        for name in heads:
            if name == "fused" and output_head(model) is None:
                (notes.append if head == "auto" else _refuse)(
                    "head fused: the output embedding is not a plain nn.Linear (e.g. a LoRA or "
                    "quantised head); model.lm_head=scored runs the model's own head")
                continue
            head_candidates.append(name)
        chosen_head = _first_exact(head_candidates, expected, tol, notes, lambda name: _score(
            model, probe, chosen_layout, Scoring(attn, name, chunk_size, dtype), pad_id, roles, device,
            autocast), "head", explicit=head != "auto")
    finally:
        model.train(was_training)
    for note in notes:
        log.info("%s: %s", what, note)
    return Plan(chosen_layout, Scoring(attn, chosen_head, chunk_size, dtype), notes)


def _choose_layout(model, candidates, expected, tol, notes, probe, base: Scoring, pad_id, roles, device,
                   autocast, explicit: bool) -> tuple[str, str]:
    """The first layout (and attention implementation) that reproduces the plain path. For an
    SDPA model, packed and shared rows first try prefopt's split SDPA, which switches the
    model's attention implementation (plain SDPA whenever no units are passed)."""
    raw = unwrap_model(model)
    for name in candidates:
        if name == "padded":
            return name, base.attn
        options = [SPLIT_SDPA, base.attn] if base.attn == "sdpa" else [base.attn]
        for option in options:
            _set_attention(raw, option)
            try:
                _first_exact([name], expected, tol, notes, lambda n: _score(
                    model, probe, n, Scoring(option, "full", None, base.dtype), pad_id, roles, device, autocast),
                    "layout", explicit=explicit and option == options[-1], fallback=False,
                    detail=f" with attention '{option}'")
                return name, option
            except _NotExact:
                _set_attention(raw, base.attn)
    return "padded", base.attn


def architecture_key(model) -> str:
    """What a plan depends on: the model class, its configuration (not its weights or name), its
    dtype and its attention implementation (prefopt's split SDPA counts as SDPA)."""
    import json

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
    _set_attention(unwrap_model(model), plan.scoring.attn)
    return Plan(plan.layout, plan.scoring, [])


def _set_attention(raw, impl: str) -> None:
    if impl == SPLIT_SDPA:
        register_split_sdpa()
    raw.config._attn_implementation = impl


def _refuse(message: str) -> None:
    raise ConfigError(f"model.lm_head={message}")


class _NotExact(Exception):
    pass


def _first_exact(candidates: list[str], expected: torch.Tensor, tol: float, notes: list[str], run,
                 what: str, explicit: bool, fallback: bool = True, detail: str = "") -> str:
    for name in candidates:
        if name in ("padded", "full"):
            return name
        try:
            got = run(name)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. no logits_to_keep argument
            problem = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        else:
            worst = float((got - expected).abs().max())
            if worst <= tol:
                return name
            problem = (f"per-token log-probs differ from the plain path by up to {worst:.2g} "
                       f"(tolerance {tol:g}) on a probe batch")
        if explicit:
            key = "data.layout" if what == "layout" else "model.lm_head"
            raise ConfigError(f"{key}={name} does not reproduce this model's log-probs{detail}: {problem}")
        notes.append(f"{what} {name}{detail} not used: {problem}")
    if not fallback:
        raise _NotExact()
    raise AssertionError("the plain path is always a candidate")


@torch.no_grad()
def _score(model, probe: list, layout: str, scoring: Scoring, pad_id: int, roles: tuple[str, ...],
           device, autocast) -> torch.Tensor:
    """Per-token mean log-prob of every probe sequence, in a fixed (role, example) order. Packed and
    shared probes put every unit in one row, so restarting positions and the isolation between
    units are checked too."""
    options = {} if layout == "padded" else {"max_tokens_per_row": 1 << 30}
    batch = make_collator(layout, pad_id, roles, **options)(probe).to(device)
    with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
        scores = score_batch(model, batch, scoring)
    order = torch.cat([batch.index[r] for r in roles])
    return (scores.logps / scores.lengths.clamp(min=1))[order].float().cpu()
