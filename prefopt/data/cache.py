"""A cache of tokenised datasets: a second run on the same data, tokenizer and data settings
reads the encoded examples back instead of tokenising again, and under several processes only
the main process tokenises (the others wait for it and read its result).

    CACHE_DIR/KEY/examples.jsonl   one encoded example per line (ids, roles, origin, label, columns,
                                   scored-token masks of segments)
    CACHE_DIR/KEY/report.json      the DataReport of how they were made (rejects included)

KEY is a SHA-256 over everything the result depends on: the source's bytes (a file) or its
records (Python objects), the tokenizer (vocabulary, merges, special tokens, chat template), every
``data.*`` setting, the objective's kind and columns, the split seed, and the data layer's code.
Written as JSON (never a pickle) into a temporary folder renamed into place, so a reader never
sees half a cache. CACHE_DIR: ``data.cache_dir``, else ``$PREFOPT_CACHE/data``, else
``~/.cache/prefopt/data``. ``data.cache: false`` turns it off. Data for a model with a processor (images, prefopt.vlm) is
never cached: it is encoded again each run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from prefopt import console
from prefopt.data.report import DataReport
from prefopt.data.schema import Origin
from prefopt.data.tokenize import EncodedExample

log = logging.getLogger("prefopt")

VERSION = 1


def code_digest() -> str:
    """The data layer's own code: a fix to reading, formats or tokenisation is another key."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("PREFOPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefopt"
    return Path(base) / "data"


def source_digest(source: Any) -> str | None:
    """The content of a data source: a file's bytes, or Python records as JSON. None for what
    cannot be hashed reliably (a folder, a hub dataset name, a datasets.Dataset)."""
    digest = hashlib.sha256()
    if source is None:
        return "none"
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()
    if isinstance(source, (list, tuple)):
        try:
            digest.update(json.dumps(list(source), sort_keys=True, ensure_ascii=True).encode())
        except (TypeError, ValueError):
            return None
        return digest.hexdigest()
    return None


def tokenizer_digest(tokenizer) -> str | None:
    """None when the tokenizer cannot be described (e.g. a custom Python pre-tokenizer): no cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        described = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    except Exception:  # noqa: BLE001 - any failure only means this tokenizer is not cached
        return None
    parts = [described,
             repr(getattr(tokenizer, "chat_template", None)), repr(tokenizer.all_special_tokens),
             repr((tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)), type(tokenizer).__name__]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(data_cfg, tokenizer, kind: str, sources: tuple, seed: int, columns: tuple) -> str | None:
    from prefopt.vlm import processor_of
    if processor_of(tokenizer) is not None:
        # A vision-language model's data is not cached: its images live in files the source's
        # digest does not cover, and their pixel tensors are no JSON. Image data is re-encoded.
        return None
    digests = [source_digest(s) for s in sources]
    tokenizer_id = tokenizer_digest(tokenizer)
    if any(d is None for d in digests) or tokenizer_id is None:
        return None
    settings = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in ("cache", "cache_dir", "train", "eval")}
    required, optional, checks = columns
    payload = json.dumps({"version": VERSION, "sources": digests, "names": [str(s) for s in sources
                                                                          if isinstance(s, (str, os.PathLike))],
                          "tokenizer": tokenizer_id, "data": settings, "code": code_digest(), "kind": kind, "seed": seed,
                          "columns": [list(required), list(optional), [check_name(c) for c in checks]]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def check_name(check) -> str:
    """A record check's stable name (a functools.partial's repr holds a memory address)."""
    func = getattr(check, "func", check)
    name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', type(func).__name__)}"
    keywords = getattr(check, "keywords", None)
    # a check made by a factory is configured by its closure (the loss's name, its flags): part of the name
    cells = [c.cell_contents for c in getattr(func, "__closure__", None) or ()]
    settings = [v for v in cells if isinstance(v, (str, int, float, bool, type(None)))]
    return name + (repr(sorted(keywords.items())) if keywords else "") + repr(getattr(check, "args", ())) \
        + (repr(settings) if settings else "")


# ----------------------------------------------------------------------------- (de)serialising

def _example_row(e: EncodedExample) -> dict:
    row = {"p": e.prompt_ids, "c": e.completions, "o": [e.origin.source, e.origin.index, e.origin.line],
           "l": e.label, "x": e.extras}
    if e.scored:  # segments' scored-token masks, as 0/1
        row["s"] = {role: [int(m) for m in mask] for role, mask in e.scored.items()}
    return row


def _example(row: dict) -> EncodedExample:
    scored = {role: [bool(m) for m in mask] for role, mask in row.get("s", {}).items()}
    return EncodedExample(row["p"], row["c"], Origin(*row["o"]), row["l"], row["x"], scored)


def _report_dict(r: DataReport) -> dict:
    return {f.name: (dict(getattr(r, f.name)) if isinstance(getattr(r, f.name), Counter) else getattr(r, f.name))
            for f in dataclasses.fields(r)}


def _report(d: dict) -> DataReport:
    return DataReport(**{**d, "rejected": Counter(d["rejected"]), "counts": Counter(d["counts"]),
                         "dropped": Counter(d.get("dropped", {}))})


def store(folder: Path, datasets: tuple) -> None:
    """Write (train, eval) Datasets (either may be None) atomically."""
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for name, data in zip(("train", "eval"), datasets):
            if data is None:
                continue
            with (tmp / f"{name}.examples.jsonl").open("w") as f:
                for e in console.progress(data.examples, f"writing the tokenised {name} data to the cache",
                                          unit="example"):
                    f.write(json.dumps(_example_row(e), ensure_ascii=True, default=str) + "\n")
            (tmp / f"{name}.report.json").write_text(json.dumps(_report_dict(data.report), ensure_ascii=True,
                                                                default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except (OSError, TypeError, ValueError) as e:  # a cache not written costs a tokenisation next time, nothing more
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("data cache: could not write %s (%s)", folder, e)


def load(folder: Path) -> tuple | None:
    from prefopt.data.pipeline import Dataset

    if not folder.is_dir():
        return None
    out = []
    try:
        for name in ("train", "eval"):
            path = folder / f"{name}.examples.jsonl"
            if not path.is_file():
                out.append(None)
                continue
            with path.open() as f:
                examples = [_example(json.loads(line)) for line in
                            console.progress(f, f"reading the tokenised {name} data from the cache", unit="example")]
            out.append(Dataset(examples, _report(json.loads((folder / f"{name}.report.json").read_text()))))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("data cache: %s is unreadable (%s); tokenising again", folder, e)
        return None
    return tuple(out)


def cached_prepare(prepare, data_cfg, tokenizer, kind: str, *, train_source, eval_source, seed: int,
                   columns: tuple, accelerator=None) -> tuple:
    """``prepare()`` (prefopt.data.pipeline.prepare_datasets with these arguments) through the
    cache: the main process tokenises and stores, the others wait and read."""
    key = cache_key(data_cfg, tokenizer, kind, (train_source if train_source is not None else data_cfg.train,
                                                eval_source if eval_source is not None else data_cfg.eval),
                    seed, columns) if data_cfg.cache else None
    if key is None:
        return prepare()
    folder = cache_root(data_cfg.cache_dir) / key
    if accelerator is None or accelerator.num_processes == 1:
        return _load_or_prepare(folder, prepare)
    result, error = None, None
    if accelerator.is_main_process:  # the others wait, then read what it stored
        try:
            result = _load_or_prepare(folder, prepare)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the barrier every process reaches
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    if result is None:
        result = load(folder)
        if result is None:  # the main process could not store it: tokenise here
            result = prepare()
    return result


def _load_or_prepare(folder: Path, prepare) -> tuple:
    hit = load(folder)
    if hit is not None:
        log.info("data: tokenised examples read from the cache %s", folder)
        return hit
    result = prepare()
    store(folder, result)
    return result
