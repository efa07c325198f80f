"""Judges: one interface that scores completions, whatever does the scoring.

    judge = make_judge({"name": "vader"})                 # or regex, length, python, reward_model, self
    verdicts = judge_all(judge, prompts, completions)     # Verdicts(scores, failures)

A judge's ``score(prompts, completions)`` returns one number per item (higher is better).
``judge_all`` calls it on the whole batch; when that raises, it retries item by item, so
one bad item costs only itself. An item whose score is an exception, NaN, infinite or not
a number is a *failure*: recorded with its reason in ``Verdicts.failures`` and given the
score ``None``, so callers skip it and count it. It is never scored 0 silently.

Built-ins: ``vader`` (the VADER compound sentiment of the completion, in [-1, 1], from the
``vaderSentiment`` package: Hutto & Gilbert 2014, the DPO paper's sentiment task uses a
sentiment classifier the same way), ``regex`` (1 when the completion matches, or the number
of matches), ``length`` (characters or words, or minus the distance to a target), and
``python`` (``module:function``, called per item as ``fn(prompt, completion)`` or on the
batch with ``batched: true``). Registered judges come from ``register_judge``.
"""
from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from prefopt.errors import ConfigError, unknown


@dataclass
class Verdicts:
    scores: list[float | None]                                   # None: the judge failed on that item
    failures: list[tuple[int, str]] = field(default_factory=list)  # (item index, reason)

    @property
    def ok(self) -> list[int]:
        return [i for i, s in enumerate(self.scores) if s is not None]

    def failure_counts(self) -> dict[str, int]:
        return dict(Counter(reason.split(":")[0] for _, reason in self.failures))


class Judge:
    name = "judge"

    def score(self, prompts: list, completions: list[str]) -> list[Any]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def judge_all(judge: Judge, prompts: list, completions: list[str]) -> Verdicts:
    """Score every item; failures are recorded per item, never turned into a number."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not completions:
        return Verdicts([])
    try:
        raw = list(judge.score(prompts, completions))
        if len(raw) != len(completions):
            raise ValueError(f"returned {len(raw)} scores for {len(completions)} items")
        results = [(value, None) for value in raw]
    except Exception:  # find the items at fault, one by one
        results = []
        for p, c in zip(prompts, completions):
            try:
                results.append((list(judge.score([p], [c]))[0], None))
            except Exception as e:
                results.append((None, f"raised: {type(e).__name__}: {e}"))
    verdicts = Verdicts([])
    for i, (value, error) in enumerate(results):
        reason = error or _invalid(value)
        verdicts.scores.append(None if reason else float(value))
        if reason:
            verdicts.failures.append((i, reason))
    return verdicts


def _invalid(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"not a number: {value!r:.60}"
    if not math.isfinite(float(value)):
        return f"not finite: {value!r}"
    return None


# ----------------------------------------------------------------------------- built-ins

class VaderJudge(Judge):
    name = "vader"

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ConfigError("the vader judge needs the vaderSentiment package (pip install vaderSentiment)") \
                from None
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, completions):
        return [self.analyzer.polarity_scores(c)["compound"] for c in completions]


class RegexJudge(Judge):
    name = "regex"

    def __init__(self, pattern: str, count: bool = False, ignore_case: bool = False):
        try:
            self.pattern = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as e:
            raise ConfigError(f"judge regex: invalid pattern {pattern!r}: {e}") from None
        self.count = count

    def score(self, prompts, completions):
        if self.count:
            return [float(len(self.pattern.findall(c))) for c in completions]
        return [1.0 if self.pattern.search(c) else 0.0 for c in completions]

    def describe(self) -> str:
        return f"regex {self.pattern.pattern!r}" + (" (matches counted)" if self.count else "")


class LengthJudge(Judge):
    name = "length"

    def __init__(self, unit: str = "chars", target: float | None = None):
        if unit not in ("chars", "words"):
            raise ConfigError(f"judge length: unit must be 'chars' or 'words' (got {unit!r})")
        self.unit, self.target = unit, target

    def score(self, prompts, completions):
        sizes = [len(c) if self.unit == "chars" else len(c.split()) for c in completions]
        return [float(n) if self.target is None else -abs(n - self.target) for n in sizes]


class PythonJudge(Judge):
    name = "python"

    def __init__(self, function: str, batched: bool = False):
        self.function, self.batched = function, batched
        self.fn = import_function(function)

    def score(self, prompts, completions):
        if self.batched:
            return list(self.fn(prompts, completions))
        return [self.fn(p, c) for p, c in zip(prompts, completions)]

    def describe(self) -> str:
        return f"python {self.function}"


def import_function(path: str) -> Callable:
    module, _, name = path.partition(":")
    if not module or not name:
        raise ConfigError(f"a Python judge is 'module:function' (got {path!r})")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import judge function {path!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"judge function {path!r} is not callable")
    return fn


DEFAULT_RUBRIC = (
    "Review the user's question and the response below, and rate the response on a scale of 1 to 5 "
    "(1: unhelpful or wrong, 3: partly helpful, 5: helpful, correct and clear).\n\n"
    "Question: {prompt}\n\nResponse: {response}\n\nAnswer with the score only.")


class SelfJudge(Judge):
    """The policy judges its own samples (Yuan et al. 2024, Self-Rewarding Language Models, §2.2:
    LLM-as-a-Judge prompting). The rubric (``template``, with ``{prompt}`` and ``{response}``)
    is sent as a user turn (chat template applied when the tokenizer has one), followed by
    ``answer_prefix``. ``mode: expected``: the score is Σ_s s·p(s) / Σ_s p(s) over the
    next-token probabilities of the score tokens (each score must be one token); ``mode: parse``:
    the first score in the greedy answer (``max_new_tokens``), a failure when there is none."""
    name = "self"
    context = ("model", "tokenizer")

    def __init__(self, model, tokenizer, template: str = DEFAULT_RUBRIC, scores: list | None = None,
                 mode: str = "expected", answer_prefix: str = "Score: ", max_new_tokens: int = 8,
                 batch_size: int = 8):
        if model is None or tokenizer is None:
            raise ConfigError("the self judge needs the policy and its tokenizer")
        if mode not in ("expected", "parse"):
            raise ConfigError(f"judge self: mode must be 'expected' or 'parse' (got {mode!r})")
        if "{response}" not in template:
            raise ConfigError("judge self: the template must contain {response} (and usually {prompt})")
        self.model, self.tok, self.template, self.mode = model, tokenizer, template, mode
        self.scores = [int(x) for x in (scores or [1, 2, 3, 4, 5])]
        self.answer_prefix, self.max_new_tokens, self.batch_size = answer_prefix, max_new_tokens, batch_size
        self.score_ids = []
        for value in self.scores:
            ids = tokenizer(str(value), add_special_tokens=False)["input_ids"]
            if len(ids) != 1 and mode == "expected":
                raise ConfigError(f"judge self: the score {value} is {len(ids)} tokens for this tokenizer; "
                                  "mode 'expected' needs one token per score (use mode: parse)")
            self.score_ids.append(ids[0])

    def judge_prompt(self, prompt, response: str) -> list[int]:
        text = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        question = self.template.format(prompt=text, response=response)
        if getattr(self.tok, "chat_template", None):
            rendered = self.tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                    add_generation_prompt=True) + self.answer_prefix
            return self.tok(rendered, add_special_tokens=False)["input_ids"]
        return self.tok(question + "\n" + self.answer_prefix)["input_ids"]

    def score(self, prompts, completions):
        out = []
        for s in range(0, len(completions), self.batch_size):
            ids = [self.judge_prompt(p, c) for p, c in zip(prompts[s:s + self.batch_size],
                                                           completions[s:s + self.batch_size])]
            out += self._expected(ids) if self.mode == "expected" else self._parsed(ids)
        return out

    def _batch(self, ids: list[list[int]]):
        from prefopt.generate import left_padded
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        return left_padded(ids, pad, next(self.model.parameters()).device)

    def _expected(self, ids: list[list[int]]) -> list[float]:
        import torch
        input_ids, mask = self._batch(ids)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False).logits[:, -1].float()
        probs = logits[:, self.score_ids].softmax(-1)             # renormalised over the score tokens
        values = torch.tensor(self.scores, dtype=probs.dtype, device=probs.device)
        return (probs * values).sum(-1).tolist()

    def _parsed(self, ids: list[list[int]]) -> list[Any]:
        import torch
        input_ids, mask = self._batch(ids)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        answers = self.tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        results = []
        for answer in answers:
            found = [int(m) for m in re.findall(r"-?\d+", answer) if int(m) in self.scores]
            results.append(float(found[0]) if found else f"no score in the answer {answer!r:.40}")
        return results


class RewardModelJudge(Judge):
    """A trained reward model (``prefopt rm``'s final/): the reward of (prompt, completion),
    tokenised exactly as in reward-model training (chat template, completion ending in EOS)."""
    name = "reward_model"

    def __init__(self, path: str, max_length: int = 1024, max_prompt_length: int | None = None,
                 batch_size: int = 8, chat_template: str | None = None):
        from prefopt.data.tokenize import Encoder
        from prefopt.logps import Scoring
        from prefopt.models import load_model, load_tokenizer

        self.path, self.batch_size = path, batch_size
        self.tok = load_tokenizer(path, chat_template)
        self.model = load_model(path, kind="reward").eval()
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.encoder = Encoder(self.tok, max_length, max_prompt_length)  # as in training: data.max_*
        self.scoring = Scoring.for_model(self.model, "reward")

    def score(self, prompts, completions):
        import torch

        from prefopt.data.collate import make_collator
        from prefopt.data.report import DataReport
        from prefopt.data.schema import CompletionExample, Origin
        from prefopt.logps import score_batch

        report = DataReport("judge", "raise")
        encoded = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            completion = [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            encoded.append(self.encoder.encode(CompletionExample(p, completion, Origin("<judge>", i)), report))
        collate = make_collator("padded", self.tok.pad_token_id, ("completion",))
        out = []
        with torch.no_grad():
            for s in range(0, len(encoded), self.batch_size):
                batch = collate(encoded[s:s + self.batch_size])
                rewards = score_batch(self.model, batch, self.scoring).logps
                out += rewards[batch.index["completion"]].tolist()
        return out

    def describe(self) -> str:
        return f"reward model {self.path}"


JUDGES: dict[str, Callable[..., Judge]] = {"vader": VaderJudge, "regex": RegexJudge, "length": LengthJudge,
                                           "python": PythonJudge, "self": SelfJudge,
                                           "reward_model": RewardModelJudge}


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    JUDGES[name] = factory


def make_judge(spec: dict | str, **context) -> Judge:
    """A judge from its config: ``"vader"`` or ``{name: regex, pattern: ...}``. ``context``
    (the policy, its tokenizer, ...) goes to factories that declare it."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in JUDGES:
        raise ConfigError(unknown("judge", str(name), list(JUDGES)))
    factory = JUDGES[name]
    wants = getattr(factory, "context", ())
    try:
        return factory(**spec, **{k: v for k, v in context.items() if k in wants})
    except TypeError as e:
        raise ConfigError(f"judge {name}: {e}") from None
