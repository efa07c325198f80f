"""source ──read──▶ records ──format──▶ canonical examples ──encode──▶ EncodedExample.

``prepare_datasets`` is the one entry point the trainers use: it reads the train (and
eval) source, converts each record with the detected or configured format, converts
between kinds of data when the objective asks for another kind (pairs used for SFT or
split for KTO), splits off a held-out set, tokenises, and returns the examples with a
DataReport for each dataset. Every record that does not make it is in a count.
"""
from __future__ import annotations

import itertools
import math
import numbers
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

from prefopt import console
from prefopt.config import DataConfig
from prefopt.data.formats import SAMPLE_SIZE, Format, cannot_detect, detect_majority, get_format, recognise
from prefopt.data.report import DataReport, DataUnusable, merge_reports
from prefopt.data.schema import (CompletionExample, PreferenceExample, PromptExample, RankedExample, Ranking,
                                 RecordProblem, check_unicode, texts_of, validate_completion, validate_pair,
                                 validate_prompt, validate_ranked)
from prefopt.data.sources import RawRecord, read_records
from prefopt.data.tokenize import EncodedExample, Encoder, ExampleDropped
from prefopt.errors import ConfigError, DataError
from prefopt.losses.base import KNOWN_COLUMNS
from prefopt.vlm import attach_images, flatten_parts, has_images

Example = PreferenceExample | CompletionExample | PromptExample | RankedExample
NUMERIC_COLUMNS = tuple(c for c in KNOWN_COLUMNS if c != "ref_completion")


@dataclass
class Dataset:
    """Encoded examples ready for a collator, with the report of how they were made."""
    examples: list[EncodedExample]
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)


def prepare_datasets(cfg: DataConfig, tokenizer, kind: str, *, train_source: Any = None,
                     eval_source: Any = None, seed: int = 0, required_columns: tuple[str, ...] = (),
                     optional_columns: tuple[str, ...] = (),
                     record_checks: tuple = ()) -> tuple[Dataset | None, Dataset | None]:
    """Read, convert, split and encode the train and eval data for an objective of ``kind``.

    ``kind`` is what the objective consumes: "paired", "unpaired" or "completion".
    Sources given here (Python objects or paths) take precedence over ``cfg.train``/``cfg.eval``.
    Per-example columns are read only when a loss needs them (``required_columns``: a record
    without one is a bad record) or can use them (``optional_columns``); others are ignored.
    ``record_checks`` (``fn(columns) -> problem or None``, from the losses) vet each record's
    columns at load time.
    """
    columns = (tuple(required_columns), tuple(optional_columns), tuple(record_checks))
    train_source = train_source if train_source is not None else cfg.train
    eval_source = eval_source if eval_source is not None else cfg.eval
    encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.prompt_truncation, cfg.truncation)
    train = evaluation = None
    reports: list[DataReport] = []  # every dataset's, handed on when one has nothing left
    try:
        if train_source is not None:
            report = DataReport("train", cfg.on_error)
            reports.append(report)
            examples = load_examples(train_source, cfg, report, *columns)
            held_out: list[Example] = []
            if eval_source is None and cfg.eval_split_size:
                examples, held_out = split_off(examples, cfg.eval_split_size, seed)
            train = encode(examples, kind, encoder, report, cfg.num_proc)
            if held_out:
                reports.append(DataReport("eval", cfg.on_error, report.format, records=len(held_out),
                                          source=report.source))
                evaluation = encode(held_out, kind, encoder, reports[-1], cfg.num_proc)
        if eval_source is not None:
            reports.append(DataReport("eval", cfg.on_error))
            evaluation = encode(load_examples(eval_source, cfg, reports[-1], *columns), kind, encoder, reports[-1],
                                cfg.num_proc)
    except DataUnusable as stop:
        stop.reports = reports
        raise
    return train, evaluation


def load_examples(source: Any, cfg: DataConfig, report: DataReport, required_columns: tuple[str, ...] = (),
                  optional_columns: tuple[str, ...] = (), record_checks: tuple = ()) -> list[Example]:
    """Read ``source`` and convert every record to a canonical example (bad ones: see report)."""
    examples = list(iter_examples(source, cfg, report, required_columns, optional_columns, record_checks))
    if report.records == 0:
        raise DataUnusable(report.source, "no records")
    return examples


def iter_examples(source: Any, cfg: DataConfig, report: DataReport, required_columns: tuple[str, ...] = (),
                  optional_columns: tuple[str, ...] = (), record_checks: tuple = (),
                  keep: Callable[[int], bool] | None = None) -> Iterator[Example]:
    """The canonical examples of ``source``'s records, as they are read (bad ones: see report).

    The format is ``cfg.format``, or else the one most of the first SAMPLE_SIZE readable records
    have (prefopt.data.formats); a record that does not fit it is a bad record at its line.
    ``keep(index)``: only the records whose index in the source it accepts are converted and
    counted (a process's share of streamed data); the format is still detected from the first
    records of the source, so every share reads it the same way."""
    fmt: Format | None = None
    if cfg.format != "auto":
        try:
            fmt = get_format(cfg.format)
        except KeyError as e:
            raise ConfigError(f"data.format: {e.args[0]}") from None
    report.source = source_name(source)
    raws = within_max_examples(read_records(source, cfg.split), cfg.max_examples, report, keep)
    detection, sample = None, []
    if fmt is None:
        taken = take_sample(raws, SAMPLE_SIZE)
        raws = itertools.chain(taken, raws)  # the sample is then converted like every other record
        sample = [_renamed(r.data, cfg.columns) for r in taken if r.data is not None]
        detection = detect_majority(sample)
        fmt = detection.format if detection else None
        if note := detection and detection.note():
            report.notes.append(note)
    report.format = fmt.name if fmt else None
    for index, raw in enumerate(raws):
        if keep is not None and not keep(index):
            continue
        report.records += 1
        if raw.data is None:
            report.reject(raw.origin, "malformed", raw.problem, raw.raw)
            continue
        try:
            record = rename_columns(raw.data, cfg.columns)
            if fmt is None:
                raise DataUnusable(str(raw.origin), cannot_detect(record, len(sample)))
            example = convert(fmt, record, raw.origin, required_columns, optional_columns, record_checks)
        except RecordProblem as problem:
            reason, text = problem.reason, f"[{fmt.name if fmt else '?'}] {problem}"
            # A record of another layout fails on its fields: say what it looks like.
            other = recognise(_renamed(raw.data, cfg.columns)) if detection else None
            if other not in (None, fmt) and problem.reason in ("missing_field", "wrong_type"):
                reason = "other_format"
                text += (f"; the record looks like '{other.name}', but the data format is '{fmt.name}' "
                         f"({detection.describe()}; set data.format to choose)")
            report.reject(raw.origin, reason, text, raw.data)
            continue
        yield example


def count_nul(example: Example, report: DataReport) -> None:
    """Count an example whose text holds NUL (U+0000). It is kept: it is valid Unicode and tokenizers
    encode it, but it is rarely meant (a C string end, binary data pasted in), so it is not silent."""
    field = next((name for name, text in texts_of(example) if "\x00" in text), None)
    if field is None:
        return
    if not report.counts["contains_nul"]:
        report.notes.append(f"text with NUL characters (U+0000) is kept and counted as contains_nul; the "
                            f"first is {field} at {example.origin}")
    report.count("contains_nul")


def source_name(source: Any) -> str:
    """How messages name a source: its path or id, or the kind of in-memory object."""
    if isinstance(source, (str, PathLike)):
        return str(source)
    return "<list>" if isinstance(source, list) else f"<{type(source).__name__}>"


def within_max_examples(raws: Iterator[RawRecord], max_examples: int | None, report: DataReport,
                        keep: Callable[[int], bool] | None = None) -> Iterator[RawRecord]:
    """The first ``max_examples`` records; the rest are read only to be counted (those of this
    process's share, with ``keep``)."""
    for i, raw in enumerate(raws):
        if max_examples is not None and i >= max_examples:
            if keep is None or keep(i):
                report.count("records_beyond_max_examples")
        else:
            yield raw


def take_sample(raws: Iterator[RawRecord], size: int) -> list[RawRecord]:
    """Records of ``raws`` up to its ``size``-th readable one (unreadable ones in between kept, in order)."""
    taken, readable = [], 0
    for raw in raws:  # a for loop that breaks leaves the generator open: the rest is read later
        taken.append(raw)
        readable += raw.data is not None
        if readable == size:
            break
    return taken


def _renamed(record: dict, columns: dict[str, str]) -> dict:
    try:
        return rename_columns(record, columns)
    except RecordProblem:  # a missing mapped column: the record is rejected when converted
        return record


def rename_columns(record: dict, columns: dict[str, str]) -> dict:
    """Apply data.columns ({canonical: source}); the source name is removed so detection sees
    only the canonical one."""
    if not columns:
        return record
    out = dict(record)
    for canonical, src in columns.items():
        if src not in record:
            raise RecordProblem("missing_field", f"column '{src}' (mapped to '{canonical}' by "
                                                 f"data.columns) is missing")
        value = out.pop(src)
        out[canonical] = value
    return out


def convert(fmt: Format, record: dict, origin, required_columns: tuple[str, ...] = (),
            optional_columns: tuple[str, ...] = (), record_checks: tuple = ()) -> Example:
    images = has_images(record)
    fields = fmt.convert(flatten_parts(record) if images else record)
    extras = extract_columns(record, required_columns, optional_columns)
    ranked = None
    if fmt.kind == "listwise":  # validated first: a loss's checks read the ranking
        ranked = validate_ranked(fields["prompt"], fields["responses"], fields["scores"], fields.get("names"),
                                 fields["explicit"])
    for check in record_checks:
        problem = check({**extras, "ranking": ranked[2] if ranked else pair_ranking(extras)})
        if problem:
            raise RecordProblem("invalid_column", problem)
    if ranked is not None:
        example = RankedExample(*ranked, origin, extras)
    elif fmt.kind == "prompt":
        example = PromptExample(validate_prompt(fields["prompt"]), origin, extras)
    elif fmt.kind == "paired":
        prompt, chosen, rejected = validate_pair(fields["prompt"], fields["chosen"], fields["rejected"], fmt.empty_ok)
        example = PreferenceExample(prompt, chosen, rejected, origin, extras, segment=fields.get("segment", False))
    else:
        prompt, completion = validate_completion(fields["prompt"], fields["completion"], fmt.empty_ok)
        example = CompletionExample(prompt, completion, origin, fields.get("label"), extras)
    if images:  # opened and checked now: a bad image is a bad record at its line (prefopt.vlm)
        attach_images(example, record, origin)
    return example


def pair_ranking(extras: dict) -> Ranking:
    """A pair's ranking as listwise losses see it: its score_chosen/score_rejected columns when
    the data has them (read when a listwise loss runs), else the labels 1 and 0."""
    if "score_chosen" in extras and "score_rejected" in extras:
        return Ranking((extras["score_chosen"], extras["score_rejected"]), True)
    return Ranking((1.0, 0.0), False)


def extract_columns(record: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The per-example columns a loss needs or can use (preference_prob, score_*, margin,
    ref_completion), validated; columns no loss reads are left alone."""
    extras: dict[str, Any] = {}
    for name in [c for c in KNOWN_COLUMNS if c in required or c in optional]:
        value = record.get(name)
        if isinstance(value, str) and not value.strip() and name in NUMERIC_COLUMNS:
            value = None  # an empty CSV cell is a missing value, not a wrong type
        if value is None:
            if name in required:
                raise RecordProblem("missing_field", f"missing column '{name}', which the loss needs")
            continue
        if name in NUMERIC_COLUMNS:
            if isinstance(value, str):  # CSV cells are always text: accept "0.5"
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RecordProblem("wrong_type", f"column '{name}' must be a finite number, got {value!r:.40}")
            value = float(value)
        elif not isinstance(value, str) or not value.strip():
            raise RecordProblem("wrong_type", f"column '{name}' must be non-empty text")
        else:
            check_unicode(value, f"column '{name}'")
        extras[name] = value
    return extras


def split_off(examples: list[Example], size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded hold-out: ``size`` examples (or that fraction when < 1)."""
    n = int(round(size * len(examples))) if size < 1 else int(size)
    if not 0 < n < len(examples):
        raise ConfigError(f"data.eval_split_size={size} leaves no train or no eval examples "
                          f"out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def as_kind(examples: list[Example], kind: str, report: DataReport) -> list[Example]:
    """Convert examples to the kind the objective consumes, counting what changes."""
    out: list[Example] = []
    for ex in examples:
        if isinstance(ex, PromptExample):
            raise ConfigError(f"{ex.origin}: the data format '{report.format}' has prompts only; training "
                              f"needs completions ({'chosen and rejected' if kind == 'paired' else 'completion'}). "
                              "Prompt-only data is for `prefopt generate` and the methods that sample")
        if report.format == "text" and kind != "completion":
            needs = "paired data (chosen and rejected)" if kind == "paired" else "labelled completions (label)"
            raise ConfigError(f"{ex.origin}: the data format 'text' is plain text for language modelling "
                              f"(SFT: `prefopt sft`); the loss needs {needs}")
        if kind == "listwise":  # a pair is a list of two (scored when its score columns were read)
            if isinstance(ex, RankedExample):
                out.append(ex)
            elif isinstance(ex, PreferenceExample):
                ranking = pair_ranking(ex.extras)
                if ranking.scores[0] < ranking.scores[1]:  # the labels say one thing, the scores another
                    report.reject(ex.origin, "scores_contradict_labels",
                                  f"score_chosen {ranking.scores[0]:g} is below score_rejected {ranking.scores[1]:g}: "
                                  "the pair's labels and its scores disagree on which response is better")
                    continue
                order = [0, 1]
                pair = [ex.chosen, ex.rejected]
                out.append(RankedExample(ex.prompt, [pair[i] for i in order],
                                         Ranking(tuple(ranking.scores[i] for i in order), ranking.explicit),
                                         ex.origin, ex.extras))
                report.count("pairs_used_as_lists_of_two")
            else:
                raise ConfigError(f"{ex.origin}: the loss is listwise (K responses per prompt), but the data "
                                  f"format '{report.format}' has one completion per example")
            continue
        if isinstance(ex, RankedExample):
            from prefopt.losses import list_specs
            listwise = ", ".join(s.name for s in list_specs() if s.data == "listwise")
            raise ConfigError(f"{ex.origin}: the data format '{report.format}' has K responses per prompt; "
                              f"use a listwise loss ({listwise})")
        if kind == "paired":
            if not isinstance(ex, PreferenceExample):
                raise ConfigError(f"{ex.origin}: the loss needs paired data (chosen and rejected), but "
                                  f"the data format '{report.format}' has one completion per example")
            out.append(ex)
        elif isinstance(ex, PreferenceExample):
            if kind == "completion":  # SFT on the chosen responses
                out.append(CompletionExample(ex.prompt, ex.chosen, ex.origin, None, ex.extras, ex.segment))
                report.count("pairs_used_for_chosen_only")
            else:  # unpaired: each pair gives one desirable and one undesirable example
                out.append(CompletionExample(ex.prompt, ex.chosen, ex.origin, True, ex.extras, ex.segment))
                out.append(CompletionExample(ex.prompt, ex.rejected, ex.origin, False, ex.extras, ex.segment))
                report.count("pairs_split_into_unpaired")
        elif kind == "unpaired" and ex.label is None:
            raise ConfigError(f"{ex.origin}: the loss needs labelled completions (label: true/false); "
                              f"the data format '{report.format}' has none")
        elif kind == "completion" and ex.label is False:
            report.count("undesirable_not_used_for_sft")
        else:
            out.append(ex)
    return out


def encode_all(examples: list[Example], encoder: Encoder, report: DataReport,
               show: bool = True) -> list[EncodedExample]:
    encoded = []
    for ex in console.progress(examples, f"tokenising {report.name}", unit="example", enabled=show):
        try:
            encoded.append(encoder.encode(ex, report))
        except ExampleDropped as dropped:
            report.drop(dropped.reason)
            continue
        except RecordProblem as problem:
            report.reject(ex.origin, problem.reason, str(problem), None)
            continue
        count_nul(ex, report)
    return encoded


CHUNKS_PER_PROCESS = 8  # tasks per worker process: the progress of the pool moves in these steps
_worker_encoder: Encoder | None = None  # a worker's encoder, sent once when the process starts


def _set_worker_encoder(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_chunk(args) -> tuple:
    """A worker's share: its examples encoded with a report of its own (merged in order by the
    parent); a stopping error is returned, not raised, so the parent raises the earliest one."""
    examples, report = args
    try:
        return encode_all(examples, _worker_encoder, report, show=False), report, None
    except DataError as e:  # as (where, problem): DataError does not unpickle from its message alone
        return [], report, (e.where, e.problem)


def encode_in_processes(examples: list[Example], encoder: Encoder, report: DataReport,
                        num_proc: int) -> list[EncodedExample]:
    """encode_all over ``num_proc`` spawned processes, in contiguous chunks (CHUNKS_PER_PROCESS
    per process, for the progress line; the encoder is sent once per process): the same examples
    in the same order, and the same counts, rejects and notes, as one process."""
    import multiprocessing

    size = math.ceil(len(examples) / (num_proc * CHUNKS_PER_PROCESS))
    chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
    jobs = [(chunk, DataReport(report.name, report.on_error, report.format, source=report.source))
            for chunk in chunks]
    with multiprocessing.get_context("spawn").Pool(min(num_proc, len(chunks)), _set_worker_encoder,
                                                   (encoder,)) as pool, \
            console.phase(f"tokenising {report.name}", total=len(examples), unit="example") as tick:
        encoded = []
        for (part, sub, error), chunk in zip(pool.imap(_encode_chunk, jobs), chunks):  # in order
            tick(len(chunk))
            _merge(report, sub, error)
            encoded += part
    return encoded


def _merge(report: DataReport, sub: DataReport, error) -> None:
    """A chunk's report into the whole's (chunks in order); its stopping error raised."""
    merge_reports(report, sub)
    if error is not None:
        raise DataError(*error)


def encode(examples: list[Example], kind: str, encoder: Encoder, report: DataReport,
           num_proc: int = 1) -> Dataset:
    examples = as_kind(examples, kind, report)
    if num_proc > 1 and len(examples) > 1:
        encoded = encode_in_processes(examples, encoder, report, num_proc)
    else:
        encoded = encode_all(examples, encoder, report)
    report.examples = len(encoded)
    if kind == "unpaired":
        report.count("desirable", sum(1 for e in encoded if e.label))
        report.count("undesirable", sum(1 for e in encoded if not e.label))
    if not encoded:
        raise DataUnusable(report.source or report.name,
                           f"no usable examples in the {report.name} data ({report.summary()})")
    return Dataset(encoded, report)
