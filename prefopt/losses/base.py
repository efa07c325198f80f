"""The loss registry: typed inputs, typed outputs, and what each loss needs.

A loss is a pure function ``fn(inputs: LossInputs, params) -> LossOutput`` registered
once with its parameter dataclass, its paper and equation, and its *requirements*:
which data it reads (paired, unpaired, or any), whether it needs a reference model,
which extra columns, whether it needs token-level reference distributions, and how its
per-example losses are normalised over an optimizer step (per example or per token).

The training loop, the data pipeline, the CLI (`prefopt losses`), the error messages and
the test parametrisation all read these flags; nothing outside a loss module ever tests
a loss's name.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from prefopt.coerce import coerce
from prefopt.errors import ConfigError, PrefoptError, unknown

Tensor = torch.Tensor

# Per-example columns a dataset may carry through the pipeline into LossInputs.extras.
KNOWN_COLUMNS = ("preference_prob", "score_chosen", "score_rejected", "margin", "ref_completion")
# Inputs that default to another when absent, as the collator does (SLiC's y_ref: the chosen).
INPUT_FALLBACKS = {"policy_ref_completion_logps": "policy_chosen_logps",
                   "ref_completion_lengths": "chosen_lengths"}
# Text columns are scored as completions, not passed as numbers: a loss that requires one
# (TPO's gold response) reads it as these inputs, and the data pipeline rejects a record without it.
COMPLETION_COLUMNS = {"ref_completion": ("policy_ref_completion_logps", "ref_completion_lengths")}


@dataclass
class LossInputs:
    """Everything a loss may read. Shapes are per example: (B,).

    Sequence log-probs are **sums** over completion tokens; a loss that works on
    length-normalised log-probs divides by the ``*_lengths`` itself (and declares the
    lengths among its inputs), so mixing losses in one objective never needs two forwards.
    """
    # Paired data: chosen y_w and rejected y_l for the same prompt x.
    policy_chosen_logps: Tensor | None = None    # (B,) log πθ(y_w|x)
    policy_rejected_logps: Tensor | None = None  # (B,) log πθ(y_l|x)
    ref_chosen_logps: Tensor | None = None       # (B,) log πref(y_w|x)
    ref_rejected_logps: Tensor | None = None     # (B,) log πref(y_l|x)
    chosen_lengths: Tensor | None = None         # (B,) |y_w| in tokens
    rejected_lengths: Tensor | None = None       # (B,) |y_l| in tokens
    # Unpaired data (one completion per example, with a desirable/undesirable label).
    policy_logps: Tensor | None = None           # (B,) log πθ(y|x)
    ref_logps: Tensor | None = None              # (B,) log πref(y|x)
    lengths: Tensor | None = None                # (B,) |y|
    labels: Tensor | None = None                 # (B,) bool, True = desirable
    policy_kl_logps: Tensor | None = None        # (B,) log πθ(y_j|x_i), mismatched pairs (KTO z0)
    ref_kl_logps: Tensor | None = None           # (B,) log πref(y_j|x_i)
    # Token-level statistics: Σ_t KL(πref(·|x,y<t) ‖ πθ(·|x,y<t)) over completion tokens.
    chosen_seq_kl: Tensor | None = None          # (B,)
    rejected_seq_kl: Tensor | None = None        # (B,)
    # SLiC's regularisation target y_ref: the `ref_completion` column, or the chosen when absent.
    policy_ref_completion_logps: Tensor | None = None  # (B,) log πθ(y_ref|x)
    ref_completion_lengths: Tensor | None = None       # (B,)
    # Listwise data: K responses per prompt, best first (position 0 is the best); an example with
    # fewer than K responses has response_mask False past its own (their values are placeholders).
    policy_response_logps: Tensor | None = None  # (B, K) log πθ(y_k|x)
    ref_response_logps: Tensor | None = None     # (B, K) log πref(y_k|x)
    response_lengths: Tensor | None = None       # (B, K) |y_k|
    response_scores: Tensor | None = None        # (B, K) the data's scores (labels 1/0 without scores)
    response_mask: Tensor | None = None          # (B, K) bool, True = a real response
    # Per-example data columns (preference_prob, score_chosen, score_rejected, margin, ...).
    extras: dict[str, Tensor] = field(default_factory=dict)
    # Mutable state of a stateful loss (e.g. BCO's running reward mean); one dict per term,
    # kept by the objective and saved in checkpoints. None for stateless losses.
    state: dict | None = None
    # Averages a batch statistic over every process (KTO's z0, BCO's δ), as the papers do with
    # an all-gather; None in one process (the statistic is already global).
    reduce_mean: Callable[[Tensor], Tensor] | None = None

    def global_mean(self, value: Tensor) -> Tensor:
        return self.reduce_mean(value) if self.reduce_mean is not None else value

    @property
    def paired(self) -> bool:
        return self.policy_chosen_logps is not None

    def present(self) -> set[str]:
        """Names of the inputs that are set (extras by column name)."""
        names = {f.name for f in fields(self)
                 if f.name not in ("extras", "state", "reduce_mean") and getattr(self, f.name) is not None}
        return names | set(self.extras)


@dataclass
class LossOutput:
    """What a loss returns.

    ``losses`` are per example, (B,). The loop sums them over the optimizer step and
    divides by the step's unit count (examples, or target tokens for token-normalised
    losses), so uneven micro-batches and gradient accumulation give the exact same
    gradient as one big batch.
    """
    losses: Tensor                            # (B,)
    chosen_rewards: Tensor | None = None      # (B,) implicit reward of y_w (for metrics)
    rejected_rewards: Tensor | None = None    # (B,) implicit reward of y_l
    metrics: dict[str, Tensor] = field(default_factory=dict)  # (B,) per example, or scalars
    response_rewards: Tensor | None = None    # (B, K) listwise: implicit reward of every response (keyword)


def param(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, choices: tuple | None = None):
    """A loss parameter: default, help text and the range it must lie in."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt,
                                            "choices": choices})


def _check_range(name: str, value: Any, meta: dict, where: str) -> None:
    if value is None:
        return
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sym in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}: {name}={value} must be {sym} {bound}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {name}='{value}' is not one of {list(meta['choices'])}")


Requirement = bool | Callable[[Any], bool]


@dataclass(frozen=True)
class LossSpec:
    """A registry entry. See the module docstring for what each flag drives."""
    name: str
    fn: Callable[[LossInputs, Any], LossOutput]
    params: type
    paper: str
    equation: str
    summary: str
    data: str = "paired"              # "paired" | "unpaired" | "any" (the target completion only:
                                      # the chosen of a pair, or the desirable unpaired completions)
                                      # | "listwise" (K responses per prompt, prefopt.losses.listwise;
                                      # compute() also takes a pair, as K = 2)
    reference: Requirement = True     # needs πref log-probs (may depend on params)
    normalize: str = "example"        # "example" | "token" (tokens of the target completions)
    inputs: Callable[[Any], tuple[str, ...]] | tuple[str, ...] = ()  # LossInputs fields needed
                                      # beyond the data kind's defaults (may depend on params)
    columns: Callable[[Any], tuple[str, ...]] | tuple[str, ...] = ()
    token_level: Requirement = False  # needs per-token reference distributions (chosen/rejected_seq_kl)
    aliases: tuple[str, ...] = ()
    stateful: bool = False            # reads/writes LossInputs.state across steps
    logps: str = "summed"             # how the loss reduces log-probs (docs): summed, length-averaged, ...
    scores: str = "logps"             # what the model gives per sequence: "logps" (a causal LM's summed
                                      # log-probs) or "reward" (a reward model's scalar, in the *_logps inputs)
    # Checks one example's columns when the data is loaded: returns a problem or None, so a bad
    # record is reported with its file and line instead of failing mid-training.
    record_check: Callable[[dict, Any], str | None] | None = None

    # -- requirements, resolved against a parameter instance ------------------------
    def needs_reference(self, params: Any) -> bool:
        return self.reference(params) if callable(self.reference) else bool(self.reference)

    def needs_token_stats(self, params: Any) -> bool:
        return self.token_level(params) if callable(self.token_level) else bool(self.token_level)

    def needed_columns(self, params: Any) -> tuple[str, ...]:
        return tuple(self.columns(params) if callable(self.columns) else self.columns)

    def extra_inputs(self, params: Any) -> tuple[str, ...]:
        return tuple(self.inputs(params) if callable(self.inputs) else self.inputs)

    def needed_inputs(self, params: Any, paired: bool) -> set[str]:
        """The LossInputs fields (and extras columns) this loss reads, given the data kind."""
        if self.data == "listwise" and not paired:
            need = {"policy_response_logps", "response_scores", "response_mask"}
            ref, tok = {"ref_response_logps"}, set()
        elif paired:
            need = {"policy_chosen_logps", "policy_rejected_logps"}
            ref = {"ref_chosen_logps", "ref_rejected_logps"}
            tok = {"chosen_seq_kl", "rejected_seq_kl"}
        else:
            need, ref, tok = {"policy_logps"}, {"ref_logps"}, set()
        if self.data == "any":  # reads the target completion only: the chosen, or the desirable
            need, ref = (({"policy_chosen_logps", "chosen_lengths"}, {"ref_chosen_logps"}) if paired
                         else ({"policy_logps", "lengths"}, {"ref_logps"}))
        if self.needs_reference(params):
            need |= ref
        if self.needs_token_stats(params):
            need |= tok
        columns = set()
        for column in self.needed_columns(params):
            columns |= set(COMPLETION_COLUMNS.get(column, (column,)))
        return need | set(self.extra_inputs(params)) | columns

    # -- parameters -------------------------------------------------------------------
    def make_params(self, values: dict | Any = None, where: str | None = None):
        """Build and validate the parameter dataclass from a mapping (unknown keys: error)."""
        where = where or f"loss '{self.name}'"
        if isinstance(values, self.params):
            values = dataclasses.asdict(values)
        values = dict(values or {})
        hints = typing.get_type_hints(self.params)
        valid = {f.name: f for f in fields(self.params)}
        kwargs = {}
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"{where}: " + unknown(f"parameter of '{self.name}'", key, valid))
            kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
            _check_range(key, kwargs[key], valid[key].metadata, where)
        instance = self.params(**kwargs)
        check = getattr(instance, "validate", None)
        if check is not None:
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        return instance

    def param_docs(self) -> list[tuple[str, Any, str]]:
        return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(self.params)]

    def needs_text(self, params: Any | None = None) -> str:
        """Human summary of requirements, for `prefopt losses` and the README table."""
        params = params if params is not None else self.params()
        bits = [{"paired": "paired data", "unpaired": "unpaired data (label)",
                 "any": "paired or unpaired data", "listwise": "K ≥ 2 responses per prompt"}[self.data]]
        bits.append("reference" if self.needs_reference(params) else "no reference")
        if callable(self.reference):
            bits[-1] += " (optional)"
        bits.append(f"{self.logps} log-probs" if self.scores == "logps" else
                    f"a reward model ({self.logps}, prefopt rm)")
        if self.needs_token_stats(params):
            bits.append("token-level reference distributions")
        cols = self.needed_columns(params)
        if cols:
            bits.append("columns: " + ", ".join(cols))
        if self.normalize == "token":
            bits.append("normalised per token")
        return "; ".join(bits)


_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, params: type, paper: str, equation: str, summary: str,
             data: str = "paired", reference: Requirement = True, normalize: str = "example",
             inputs=(), columns=(), token_level: Requirement = False,
             aliases: tuple[str, ...] = (), stateful: bool = False, logps: str = "summed",
             record_check: Callable[[dict, Any], str | None] | None = None, scores: str = "logps"):
    """Decorator: register ``fn(inputs, params) -> LossOutput`` under ``name``."""
    assert data in ("paired", "unpaired", "any", "listwise") and normalize in ("example", "token")
    assert scores in ("logps", "reward")

    def wrap(fn):
        if name in _REGISTRY or name in _ALIASES:
            raise AssertionError(f"loss '{name}' registered twice")
        _REGISTRY[name] = LossSpec(name=name, fn=fn, params=params, paper=paper, equation=equation,
                                   summary=summary, data=data, reference=reference,
                                   normalize=normalize, inputs=inputs, columns=columns,
                                   token_level=token_level, aliases=tuple(aliases), stateful=stateful,
                                   logps=logps, record_check=record_check, scores=scores)
        for alias in aliases:
            _ALIASES[alias] = name
        return fn
    return wrap


def get_spec(name: str) -> LossSpec:
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise KeyError(unknown("loss", name, list(_REGISTRY) + list(_ALIASES)))
    return _REGISTRY[key]


def list_specs() -> list[LossSpec]:
    return list(_REGISTRY.values())


class MissingInputError(PrefoptError):
    """A loss was asked to run without an input it needs (a column, the reference, ...)."""


def check_inputs(spec: LossSpec, params: Any, present: set[str], paired: bool) -> None:
    """Raise a MissingInputError naming every missing input of ``spec``."""
    missing = sorted(spec.needed_inputs(params, paired) - present)
    if missing:
        hints = []
        scored = {name: column for column, names in COMPLETION_COLUMNS.items() for name in names}
        if any(m.startswith("ref_") and m not in scored for m in missing):
            hints.append("it needs a reference (reference.strategy: model)")
        cols = sorted({scored.get(m, m) for m in missing if m in KNOWN_COLUMNS or m in scored})
        if cols:
            hints.append(f"the data must have the column(s) {', '.join(cols)}")
        if any(m.endswith("seq_kl") for m in missing):
            hints.append("it needs token-level reference statistics")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise MissingInputError(f"loss '{spec.name}' is missing input(s) {', '.join(missing)}{hint}")


def compute(name: str, *, params: Any = None, extras: dict | None = None, state: dict | None = None,
            **kwargs) -> LossOutput:
    """Compute a registered loss without a model.

    >>> out = compute("dpo", policy_chosen_logps=torch.tensor([-1.0]),
    ...               policy_rejected_logps=torch.tensor([-2.0]),
    ...               ref_chosen_logps=torch.tensor([-1.0]),
    ...               ref_rejected_logps=torch.tensor([-1.0]), beta=0.1)

    Keyword arguments that are LossInputs fields are inputs; known per-example columns
    (``preference_prob``, ``score_chosen``, ...) go to ``extras``; everything else is a
    parameter of the loss (``beta``, ``label_smoothing``, ...), validated against its
    parameter class. Log-probs are sums over completion tokens; losses that average over
    tokens (IPO, SimPO, ORPO) also need ``chosen_lengths``/``rejected_lengths``. A stateful
    loss (BCO) keeps its running statistics in ``state`` (pass the same dict across calls).
    """
    spec = get_spec(name)
    input_names = {f.name for f in fields(LossInputs)} - {"extras", "state", "reduce_mean"}
    inputs = LossInputs(**{k: v for k, v in kwargs.items() if k in input_names},
                        extras=dict(extras or {}), state=state if state is not None else {})
    for key in [k for k in kwargs if k in KNOWN_COLUMNS]:
        inputs.extras[key] = kwargs[key]
    rest = {k: v for k, v in kwargs.items() if k not in input_names and k not in KNOWN_COLUMNS}
    if params is not None and rest:
        raise ConfigError("pass loss parameters either as params= or as keywords, not both")
    params = spec.make_params(params if params is not None else rest)
    required = {n for c in spec.needed_columns(params) for n in COMPLETION_COLUMNS.get(c, ())}
    for name, fallback in INPUT_FALLBACKS.items():
        if getattr(inputs, name) is None and name not in required:  # a required column has no stand-in
            setattr(inputs, name, getattr(inputs, fallback))
    check_inputs(spec, params, inputs.present(), inputs.paired)
    return spec.fn(inputs, params)
