"""Turn canonical examples into token ids with an explicit prompt/completion boundary.

Rules (each one fixes a bug users hit in the anchors):

* Conversational examples are rendered with the tokenizer's chat template: the prompt
  with ``add_generation_prompt=True``, the prompt plus completion without it; the
  completion text is what the second rendering adds after the first. A template that
  renders the prompt differently once a completion follows is reported per record.
* The prompt ids are an exact prefix of the prompt+completion ids. When tokenising the
  joint text merges tokens across the boundary (TRL #1541), the mismatch is counted and
  the completion is tokenised on its own, which is also what generation from the prompt
  ids would produce.
* Every completion ends with EOS: appended when missing; tokens after a final EOS that
  only carry whitespace (e.g. the "\\n" after ``<|im_end|>`` in ChatML) are dropped, so
  the model learns to stop at EOS.
* Multi-turn segments (``segment`` examples, SDPO): the completion is still what the rendering
  of prompt + segment adds to the prompt's, but only the tokens of its assistant turns are
  scored: assistant turn i spans from the end of the rendering of prompt + turns < i *with* the
  generation prompt (so the role header is not scored) to the end of the rendering of prompt +
  turns <= i, minus whitespace after its EOS (the "\n" after ``<|im_end|>``, as above). The
  other party's turns and their headers are context. Each boundary must fall between tokens of
  the joint tokenisation (else a RecordProblem); the mask travels as ``EncodedExample.scored``.
* An empty text prompt (the ``text`` format: language modelling) has no position the first
  token could be predicted from: unless the tokenizer adds a BOS, the first token becomes the
  prompt, as a causal LM's loss never scores the first token either. The ids are then exactly
  ``tokenizer(text) + [EOS]``.

Truncation (``data.truncation``; every cut and every drop is counted in the DataReport):

* ``max_prompt_length``, when set, always caps the prompt.
* ``auto`` (the default): an example longer than ``max_length`` first gives up prompt tokens,
  until its longest completion fits but never below ``max_length // 2`` (a long dialogue keeps
  its last turns, a long answer still gets half of the window); the completions are then cut
  to the room left (``keep_start``: a completion is generated from its start). The prompt is
  cut at the end ``prompt_truncation`` names (``keep_end``: the most recent tokens, after a
  leading BOS, which is kept). A pair whose completions become identical is dropped
  (``ExampleDropped``): it has no preference left to learn.
* ``strict``: the prompt is cut only to ``max_prompt_length``; a prompt that leaves no room for
  a completion is a bad record (``data.on_error``); completions are cut to fit (counted), and a
  pair they make identical is kept and counted.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.report import DataReport
from prefopt.data.schema import (CompletionExample, Origin, PreferenceExample, RankedExample, RecordProblem,
                                 Text, check_unicode)
from prefopt.errors import ConfigError
from prefopt.vlm import IMAGE_EXTRAS, IMAGE_PATHS, IMAGE_PLACEHOLDER, image_digest, image_markup, processor_of

TRUNCATION_MODES = ("auto", "strict")
RESPONSE_ROLE = "response_{}"  # listwise data: role of the k-th best response (0 = the best)
SCORES = "scores"              # listwise data: EncodedExample.extras key of the scores, best first


def response_roles(k: int) -> tuple[str, ...]:
    """The roles of K responses, best first: response_0 .. response_{K-1}."""
    return tuple(RESPONSE_ROLE.format(i) for i in range(k))


class ExampleDropped(Exception):
    """An example left out on purpose (not a bad record): counted in ``DataReport.dropped`` under
    ``reason``, never a stop under ``data.on_error: raise``."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class EncodedExample:
    """Token ids of one example: a prompt and one or more completions by role.

    Roles: ``chosen``/``rejected`` for pairs, ``completion`` for unpaired and SFT data,
    ``response_0`` .. ``response_{K-1}`` (best first) for listwise data, whose scores (best first)
    are ``extras["scores"]``.
    ``scored``: for a role whose completion is not scored whole (a multi-turn segment: only its
    assistant turns), one bool per completion token, True where the token is scored. A role
    without an entry is scored whole, as every completion of single-turn data is.
    """
    prompt_ids: list[int]
    completions: dict[str, list[int]]
    origin: Origin
    label: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    scored: dict[str, list[bool]] = field(default_factory=dict)
    # The processor's non-text outputs for the prompt's images (``pixel_values``, ``image_sizes``,
    # ``image_grid_thw``, ...; first dimension per image, or per patch for Qwen2-VL's pixel_values):
    # what the model reads besides the ids.
    # Shared by every completion of the example; the id changes when the pixels do (extras hold a
    # digest of the pixels, not the images' paths: moving the data keeps the id).
    media: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def uid(self) -> int:
        """A stable 63-bit id: a hash of the tokenised content (prompt, completions by role, label,
        extra columns), so equal content gets equal ids in any run. Per-example caches (the
        precomputed reference log-probs) are keyed on it."""
        content = (self.prompt_ids, sorted(self.completions.items()), self.label, sorted(self.extras.items()))
        if self.scored:  # only then: the ids of fully scored examples stay what they were
            content += (sorted(self.scored.items()),)
        digest = hashlib.blake2b(repr(content).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


class Encoder:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None,
                 prompt_truncation: str = "keep_end", truncation: str = "auto"):
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; set one (tokenizer.eos_token) so "
                              "completions can end")
        if max_length < 2 or (max_prompt_length is not None and max_prompt_length < 1):
            raise ConfigError(f"data.max_length must be >= 2 and data.max_prompt_length >= 1 (got "
                              f"{max_length} and {max_prompt_length})")
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise ConfigError(f"data.max_prompt_length ({max_prompt_length}) must be smaller than "
                              f"data.max_length ({max_length})")
        if truncation not in TRUNCATION_MODES:
            raise ConfigError(f"data.truncation must be one of {', '.join(TRUNCATION_MODES)} (got {truncation!r})")
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.keep_end = prompt_truncation == "keep_end"
        self.strict = truncation == "strict"
        self.bos = tokenizer.bos_token_id
        self._whitespace: dict[int, bool] = {}
        self.processor = processor_of(tokenizer)  # a vision-language model's (prefopt.vlm)
        # what the processor looks for where the data writes <image> (Qwen2-VL: a wrapped <|image_pad|>)
        self.image_markup = image_markup(self.processor) if self.processor is not None else IMAGE_PLACEHOLDER
        self._images: list | None = None          # the images of the example being encoded
        self._media: dict[str, Any] = {}

    def __getstate__(self):  # sent to worker processes without an example's images
        return {**self.__dict__, "_images": None, "_media": {}}

    # ------------------------------------------------------------------ public
    def encode(self, example: PreferenceExample | CompletionExample, report: DataReport) -> EncodedExample:
        """The example's ids, cut to fit (cuts counted in ``report``). Raises RecordProblem for a bad
        record, ExampleDropped for one left out on purpose (its cuts are not counted: the truncation
        counts describe the examples that reach the model).

        An example with images (``extras["images"]``, prefopt.vlm) is tokenised by the processor:
        it expands each ``<image>`` into the model's image tokens (part of the prompt, never scored)
        and makes the pixel values, kept in ``EncodedExample.media``."""
        images = example.extras.get(IMAGE_EXTRAS)
        if not images:
            return self._encode(example, report)
        if self.processor is None:
            raise ConfigError(f"{example.origin}: the data has images but the model has no processor (a "
                              f"vision-language model loads one with its tokenizer; pass processing_class="
                              f"a processor, or drop the images column)")
        self._images, self._media = images, {}
        try:
            encoded = self._encode(example, report)
        finally:
            self._images = None
        encoded.extras.pop(IMAGE_EXTRAS, None)
        encoded.extras.pop(IMAGE_PATHS, None)  # the id is content: an image's pixels, not where it lies
        encoded.extras["image_digest"] = image_digest(images)
        encoded.media = self._media
        image_token = self.tok.convert_tokens_to_ids(getattr(self.processor, "image_token", IMAGE_PLACEHOLDER))
        if encoded.prompt_ids.count(image_token) != self._image_tokens:
            raise RecordProblem("too_long", f"the prompt would lose image tokens to truncation ({self._image_tokens} "
                                            f"image tokens); raise data.max_length or data.max_prompt_length")
        return encoded

    def _encode(self, example, report: DataReport) -> EncodedExample:
        if isinstance(example, PreferenceExample):
            texts = {"chosen": example.chosen, "rejected": example.rejected}
        elif isinstance(example, RankedExample):  # best first: response_0 is the best
            texts = dict(zip(response_roles(len(example.responses)), example.responses))
        else:
            texts = {"completion": example.completion}
        ref = example.extras.get("ref_completion")
        if ref is not None:  # SLiC's reference sample is scored like any other completion
            texts["ref_completion"] = [{"role": "assistant", "content": ref}] if example.conversational else ref
        prompt_text = self._render_prompt(example.prompt)
        prompt_ids = self._ids(prompt_text, conversational=example.conversational)
        if self.strict and self.max_prompt_length is None:  # refused before tokenising its completions
            self._check_room(prompt_ids)                     # (a 1 MB prompt)
        segment = getattr(example, "segment", False) and example.conversational
        if segment and "chosen" in texts:
            self._count_unequal_segments(texts["chosen"], texts["rejected"], report, example.origin)
        completions, scored = {}, {}
        for role, text in texts.items():
            ids, mask = self._completion_ids(example.prompt, prompt_text, prompt_ids, text, report, example.origin,
                                             segment=segment and role != "ref_completion")
            completions[role] = ids
            if mask is not None:
                scored[role] = mask
        if not prompt_ids:
            prompt_ids, completions = self._first_token_as_prompt(completions)
        prompt_ids, completions, cuts = self._truncate(prompt_ids, completions)
        scored = {role: mask[:len(completions[role])] for role, mask in scored.items()}
        if "chosen" in completions and completions["chosen"] == completions["rejected"]:
            if not self.strict:
                raise ExampleDropped("identical_after_truncation")
            report.count("pairs_identical_after_truncation")
        if isinstance(example, RankedExample) and len({tuple(c) for c in completions.values()}) < len(completions):
            if not self.strict:  # two responses of different rank that now read the same
                raise ExampleDropped("responses_identical_after_truncation")
            report.count("lists_with_identical_responses_after_truncation")
        for cut in cuts:
            report.count(cut)
        extras = {k: v for k, v in example.extras.items() if k != "ref_completion"}
        if isinstance(example, RankedExample):
            extras[SCORES] = list(example.ranking.scores)
        return EncodedExample(prompt_ids, completions, example.origin,
                              getattr(example, "label", None), extras, scored)

    def encode_prompt(self, prompt) -> tuple[str, list[int]]:
        """A prompt's text (chat template applied, generation prompt added) and its token ids,
        exactly as training tokenises it (generation continues from these ids)."""
        text = self._render_prompt(prompt)
        return text, self._ids(text, conversational=isinstance(prompt, list))

    def encode_image_prompt(self, prompt, images: list) -> tuple[str, list[int], dict[str, Any]]:
        """``encode_prompt`` for a prompt with images: the ids with the image tokens the processor
        expands (as training has them) and its image tensors (``pixel_values``, ...)."""
        if self.processor is None:
            raise ConfigError("the prompts have images but the model has no processor (a vision-language "
                              "model loads one with its tokenizer)")
        self._images, self._media = images, {}
        try:
            text, ids = self.encode_prompt(prompt)
        finally:
            self._images = None
        return text, ids, self._media

    # ------------------------------------------------------------------ rendering
    def _render_prompt(self, prompt: Text) -> str:
        if isinstance(prompt, str):
            return prompt
        return self._template(prompt, add_generation_prompt=True)

    def _template(self, messages: list, add_generation_prompt: bool) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ConfigError("the data is conversational but the tokenizer has no chat template; "
                              "set model.chat_template (e.g. 'chatml') or use a tokenizer that has one")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 TemplateError: e.g. "System role not supported"
            raise RecordProblem("template", f"the chat template rejects this conversation: "
                                            f"{type(e).__name__}: {e}") from None

    def _completion_ids(self, prompt: Text, prompt_text: str, prompt_ids: list[int], completion: Text,
                        report: DataReport, example_origin: Origin,
                        segment: bool = False) -> tuple[list[int], list[bool] | None]:
        """The completion's ids, and for a ``segment`` its scored-token mask (else None)."""
        conversational = isinstance(prompt, list)
        if conversational:
            full_text = self._template(prompt + completion, add_generation_prompt=False)
            if not full_text.startswith(prompt_text):
                raise RecordProblem("template", "the chat template renders the prompt differently once "
                                                "the completion follows, so the prompt/completion "
                                                "boundary is undefined")
            completion_text = full_text[len(prompt_text):]
        else:
            completion_text, full_text = completion, prompt_text + completion
        full_ids = self._ids(full_text, conversational)
        joint = full_ids[:len(prompt_ids)] == prompt_ids
        if joint:
            ids = full_ids[len(prompt_ids):]
        else:
            if not report.counts["boundary_mismatch"]:
                report.notes.append(
                    f"prompt/completion boundary mismatch (first at {example_origin}): tokenising "
                    f"prompt+completion merges tokens across the boundary (prompt ends "
                    f"{prompt_text[-20:]!r}, completion starts {completion_text[:20]!r}); such "
                    f"completions are tokenised on their own, as generation would produce them")
            report.count("boundary_mismatch")
            ids = self._tokenize(completion_text, add_special_tokens=False)
        if not segment:
            return self._end_with_eos(ids), None
        if joint:  # token index of a boundary: ids of the text before it, minus the prompt's
            def tokens_before(chars: int) -> list[int]:
                return self._ids(full_text[:len(prompt_text) + chars], conversational)[len(prompt_ids):]
        else:
            def tokens_before(chars: int) -> list[int]:
                return self._tokenize(completion_text[:chars], add_special_tokens=False)
        mask = self._segment_mask(prompt, completion, len(prompt_text), full_text, ids, tokens_before)
        out = self._end_with_eos(ids)
        mask = mask[:len(out)] + [True] * (len(out) - len(mask))  # an appended EOS ends the last assistant turn
        return out, mask

    @staticmethod
    def _count_unequal_segments(chosen: list, rejected: list, report: DataReport, origin: Origin) -> None:
        """SDPO's derivation cancels the partition function only between segments of equal turn
        counts; pairs that differ are kept, and counted."""
        turns = [sum(m["role"] == "assistant" for m in seg) for seg in (chosen, rejected)]
        if turns[0] != turns[1]:
            if not report.counts["segments_of_unequal_turns"]:
                report.notes.append(f"segments with unequal numbers of assistant turns are kept and counted "
                                    f"as segments_of_unequal_turns (SDPO assumes equal ones); the first is "
                                    f"at {origin} ({turns[0]} chosen, {turns[1]} rejected)")
            report.count("segments_of_unequal_turns")

    def _segment_mask(self, prompt: list, segment: list, prompt_chars: int, full_text: str, ids: list[int],
                      tokens_before) -> list[bool]:
        """One bool per completion token: True inside an assistant turn (content and end-of-turn)."""
        mask = [False] * len(ids)
        for i, message in enumerate(segment):
            if message["role"] != "assistant":
                continue
            head = self._template(prompt + segment[:i], add_generation_prompt=True)
            turn = self._template(prompt + segment[:i + 1], add_generation_prompt=False)
            if not (full_text.startswith(head) and full_text.startswith(turn)):
                raise RecordProblem("template", f"the chat template renders the dialogue differently once "
                                                f"turn {i + 1} of the segment follows, so that turn's tokens "
                                                f"cannot be located")
            start, end = (self._boundary(len(text) - prompt_chars, ids, tokens_before, i) for text in (head, turn))
            stop = end
            while stop > start + 1 and ids[stop - 1] != self.eos and self._is_whitespace(ids[stop - 1]):
                stop -= 1
            if ids[stop - 1] != self.eos:  # whitespace not after an EOS is the turn's own: kept
                stop = end
            mask[start:stop] = [True] * (stop - start)
        return mask

    @staticmethod
    def _boundary(chars: int, ids: list[int], tokens_before, turn: int) -> int:
        """The number of completion tokens before character ``chars`` of the completion text."""
        if chars <= 0:
            return 0
        before = tokens_before(chars)
        if ids[:len(before)] != before:
            raise RecordProblem("template", f"turn {turn + 1} of the segment does not start or end at a token "
                                            f"boundary (tokenising the dialogue merges tokens across it), so "
                                            f"its scored tokens are undefined")
        return len(before)

    def _ids(self, text: str, conversational: bool) -> list[int]:
        # Chat templates write their own BOS; raw text gets the tokenizer's special tokens.
        if self._images is not None and IMAGE_PLACEHOLDER in text:
            return self._processed(text, add_special_tokens=not conversational)
        return self._tokenize(text, add_special_tokens=not conversational)

    def _processed(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of a text holding the example's images, image tokens expanded by the processor
        (its first call keeps the image tensors: every call sees the same images)."""
        text = text.replace(IMAGE_PLACEHOLDER, self.image_markup)
        try:
            out = self.processor(text=[text], images=self._images, return_tensors="pt",
                                 add_special_tokens=add_special_tokens)
        except ValueError as e:  # e.g. placeholders and images that do not match
            raise RecordProblem("image_placeholders", f"the processor rejects the text and images: "
                                                      f"{str(e).splitlines()[0][:160]}") from None
        ids = out["input_ids"][0].tolist()
        if not self._media:
            self._media = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids",
                                                                     "mm_token_type_ids")}
            image_token = self.tok.convert_tokens_to_ids(getattr(self.processor, "image_token", IMAGE_PLACEHOLDER))
            self._image_tokens = ids.count(image_token)
        return ids

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        except TypeError:
            # Rust tokenizers raise a bare TypeError for text that is not valid Unicode (a lone
            # surrogate); the pipeline checks fields first, this covers other callers (judges).
            check_unicode(text, "the text")
            raise

    def _is_whitespace(self, token: int) -> bool:
        if token not in self._whitespace:
            self._whitespace[token] = self.tok.decode([token]).strip() == ""
        return self._whitespace[token]

    def _end_with_eos(self, ids: list[int]) -> list[int]:
        end = len(ids)
        while end > 0 and ids[end - 1] != self.eos and self._is_whitespace(ids[end - 1]):
            end -= 1
        if end > 0 and ids[end - 1] == self.eos:
            return ids[:end]
        return ids + [self.eos]

    @staticmethod
    def _first_token_as_prompt(completions: dict[str, list[int]]):
        """An empty prompt (text without BOS): the first token, which nothing predicts, is the prompt."""
        firsts = {tuple(ids[:1]) for ids in completions.values()}
        if len(firsts) != 1 or any(len(ids) < 2 for ids in completions.values()):
            raise RecordProblem("empty", "the prompt is empty and the completions do not share a first "
                                         "token to condition on")
        (first,) = firsts
        return list(first), {role: ids[1:] for role, ids in completions.items()}

    # ------------------------------------------------------------------ truncation
    def _check_room(self, prompt_ids: list[int]) -> None:
        if len(prompt_ids) >= self.max_length:
            raise RecordProblem("too_long", f"the prompt has {len(prompt_ids)} tokens, leaving no room for "
                                            f"a completion within data.max_length={self.max_length} "
                                            f"(data.truncation: strict); data.truncation: auto cuts long "
                                            f"prompts to fit, data.max_prompt_length caps them")

    def prompt_limit(self, prompt_len: int, longest_completion: int) -> int | None:
        """How many prompt tokens an example keeps (None: all). ``max_prompt_length`` when set;
        else, under ``auto``, only what leaves room for the longest completion, but at least
        ``max_length // 2``: a long dialogue keeps its most recent part, a long answer half the window."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        if self.strict or prompt_len + longest_completion <= self.max_length:
            return None
        return max(self.max_length - longest_completion, self.max_length // 2)

    def cut_prompt(self, prompt_ids: list[int], limit: int) -> list[int]:
        """The ``limit`` prompt tokens kept: the last ones (``keep_end``; a leading BOS stays first,
        since the model never saw text without it) or the first ones (``keep_start``)."""
        if not self.keep_end:
            return prompt_ids[:limit]
        if self.bos is not None and prompt_ids[0] == self.bos and limit > 1:
            return prompt_ids[:1] + prompt_ids[len(prompt_ids) - limit + 1:]
        return prompt_ids[len(prompt_ids) - limit:]

    def _truncate(self, prompt_ids: list[int], completions: dict[str, list[int]]):
        """(prompt ids, completions by role, the counts of what was cut) within max_length."""
        cuts = []
        limit = self.prompt_limit(len(prompt_ids), max(map(len, completions.values())))
        if limit is not None and len(prompt_ids) > limit:
            prompt_ids = self.cut_prompt(prompt_ids, limit)
            cuts.append("prompt_truncated")
        self._check_room(prompt_ids)  # cannot fail under auto: the prompt keeps at most max_length - 1
        room = self.max_length - len(prompt_ids)
        out = {}
        for role, ids in completions.items():
            if len(ids) > room:
                ids = ids[:room]
                cuts.append(f"{role}_truncated")
            out[role] = ids
        return prompt_ids, out, cuts
