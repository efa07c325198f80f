"""Reference log-probs computed once in a pre-pass and cached on disk (``strategy: precomputed``).

The pre-pass scores every train and eval example with the source strategy (a frozen
reference model, or the LoRA base with adapters disabled) through the same collator, layout,
LM head and precision as the live path, then frees the reference model. Values are stored
per example (keyed by its content hash, ``EncodedExample.uid``) and role: the sequence
log-prob, its token count and every token's log-prob (LD-DPO's prefix sums need them). KTO's
mismatched rows are a role fixed per example (prefopt.data.roles), so they cache too.

The cache lives in ``reference.cache_dir`` (default OUTPUT_DIR/reference_cache) in a folder
named by a key over everything the values depend on: the reference weights (a hash of the
tensors; LoRA adapters excluded), the examples (their token ids, hence the data, the
tokenizer and the tokenisation settings; an image's by its pixels, not its path), the roles, the
layout, the LM-head mode, the attention implementation and the precision; for a vision-language
model also the processor's settings (image size, mean, std, ...: they make the pixel values,
which the token ids do not show). A folder holds ``logps.safetensors`` and a
``manifest.json`` with the key's parts and the file's checksum; a folder that is incomplete,
whose checksum does not match, or that lacks an example is recomputed (with a log line),
never used. Writes go to a temporary folder renamed into place.

Token-level reference distributions (TDPO) are a vocabulary-sized vector per token; they are
not cached: such losses refuse this strategy before anything is computed.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from prefopt import console
from prefopt.data.collate import Batch
from prefopt.errors import ConfigError, PrefoptError
from prefopt.logps import SequenceScores, unwrap_model
from prefopt.vlm import processor_digest, processor_of

log = logging.getLogger("prefopt")
CACHE_VERSION = 1
DATA_FILE, MANIFEST = "logps.safetensors", "manifest.json"


class ReferenceCache:
    """Per-example reference values by role, looked up by example id."""

    def __init__(self, tensors: dict[str, torch.Tensor], roles: list[str]):
        self.roles = roles
        self.tensors = tensors
        self.row = {int(uid): i for i, uid in enumerate(tensors["uids"].tolist())}

    @classmethod
    def from_records(cls, records: list[tuple[int, dict]], roles: list[str]) -> "ReferenceCache":
        """``records``: (uid, {role: (sequence log-prob, token log-probs)}) per example."""
        records = sorted(dict(records).items())  # one entry per uid, in a fixed order
        tensors = {"uids": torch.tensor([uid for uid, _ in records], dtype=torch.int64)}
        for role in roles:
            values = [by_role[role] for _, by_role in records]
            tokens = [torch.as_tensor(t, dtype=torch.float32) for _, t in values]
            tensors[f"{role}.logps"] = torch.tensor([v for v, _ in values], dtype=torch.float32)
            tensors[f"{role}.lengths"] = torch.tensor([len(t) for t in tokens], dtype=torch.int64)
            tensors[f"{role}.offsets"] = torch.cumsum(torch.tensor([0] + [len(t) for t in tokens]), 0)
            tensors[f"{role}.tokens"] = torch.cat(tokens) if tokens else torch.zeros(0)
        return cls(tensors, roles)

    def missing(self, uids) -> list[int]:
        return [u for u in uids if u not in self.row]

    def scores(self, batch: Batch) -> SequenceScores:
        """The reference SequenceScores of ``batch``'s sequences, as the live path would give them."""
        n, device = batch.num_sequences, batch.token_target.device
        logps = torch.zeros(n)
        pieces: list[torch.Tensor | None] = [None] * n
        rows = []
        for uid in batch.example_ids.tolist():
            if uid not in self.row:
                raise PrefoptError(f"example {uid:x} is not in the precomputed reference cache; it was not part "
                                   f"of the data the cache was computed for")
            rows.append(self.row[uid])
        lengths = batch.sequence_lengths.cpu()
        for role, sequences in batch.index.items():
            t = self.tensors
            for i, s in enumerate(sequences.tolist()):
                r = rows[i]
                if int(t[f"{role}.lengths"][r]) != int(lengths[s]):
                    raise PrefoptError(f"the precomputed reference cache holds {int(t[f'{role}.lengths'][r])} "
                                       f"tokens for a {role} sequence of {int(lengths[s])}: a stale cache")
                logps[s] = t[f"{role}.logps"][r]
                pieces[s] = t[f"{role}.tokens"][t[f"{role}.offsets"][r]:t[f"{role}.offsets"][r + 1]]
        zeros = torch.zeros(n, device=device)
        return SequenceScores(logps.to(device), batch.sequence_lengths, zeros, zeros,
                              token_logps=torch.cat(pieces).to(device))

    # ------------------------------------------------------------------ disk
    def write(self, folder: Path, manifest: dict) -> None:
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.tensors, str(tmp / DATA_FILE))
        manifest = {**manifest, "sha256": _file_digest(tmp / DATA_FILE), "examples": len(self.row)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for path in (tmp / DATA_FILE, tmp / MANIFEST):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    @classmethod
    def read(cls, folder: Path, manifest: dict) -> tuple["ReferenceCache | None", str]:
        """The cache in ``folder`` when it is complete and matches ``manifest``, else (None, why)."""
        path, meta = folder / DATA_FILE, folder / MANIFEST
        if not path.is_file() or not meta.is_file():
            return None, "no cache yet"
        try:
            stored = json.loads(meta.read_text())
        except json.JSONDecodeError:
            return None, "its manifest is unreadable"
        if {k: stored.get(k) for k in manifest} != manifest:
            return None, "its key does not match"
        if stored.get("sha256") != _file_digest(path):
            return None, "its checksum does not match (a partial or corrupt file)"
        return cls(load_file(str(path)), manifest["roles"]), ""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _on_main(accelerator, fn):
    """``fn()`` on the main process, its (picklable) result on every process."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [fn() if accelerator.is_main_process else None]
    broadcast_object_list(box)
    return box[0]


def weights_fingerprint(model, sharded: bool) -> str:
    """A hash of the reference's weights (LoRA adapters excluded: the reference is the base).
    Parameters and buffers are read as they are (no state_dict hooks, which are collectives under
    FSDP); a sharded model (FSDP, DeepSpeed) has no local copy to hash."""
    raw = unwrap_model(model)
    if sharded:
        return "sharded:" + str(getattr(raw.config, "_name_or_path", "?"))
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted([*raw.named_parameters(), *raw.named_buffers()], key=lambda item: item[0]):
        if "lora_" in name:
            continue
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(model, sharded: bool) -> str:
    with console.phase("hashing the reference weights (the cache key)"):
        return weights_fingerprint(model, sharded)


class PrecomputedReference:
    name = "precomputed"

    def __init__(self, source, cache_dir: str | None):
        self.source = source
        self.cache_dir = cache_dir
        self.description = f"precomputed from {source.description}"
        self.cache: ReferenceCache | None = None
        self.folder: Path | None = None

    def prepare(self, ctx) -> None:
        if ctx.token_level:
            raise ConfigError("reference.strategy=precomputed cannot serve token-level losses (TDPO): they need the "
                              "reference's full distribution over the vocabulary at every token, which a cache "
                              "cannot hold; use reference.strategy=model (or lora)")
        self.source.prepare(ctx)
        acc = ctx.accelerator
        examples = {ex.uid: ex for data in ctx.datasets.values() for ex in data}
        roles = list(ctx.collator.roles)
        scoring = self.source.scoring
        raw = unwrap_model(self.source.model)
        manifest = {
            "version": CACHE_VERSION,
            "reference": _on_main(acc, lambda: _fingerprint(self.source.model, _sharded(acc))),
            "model_config": hashlib.blake2b(raw.config.to_json_string().encode(), digest_size=16).hexdigest(),
            "roles": roles,
            "examples_hash": hashlib.blake2b(json.dumps(sorted(examples)).encode(), digest_size=16).hexdigest(),
            "layout": ctx.collator.layout, "lm_head": scoring.head, "attention": scoring.attn,
            "dtype": str(scoring.dtype), "mixed_precision": str(acc.mixed_precision)}
        if (processor := processor_digest(processor_of(ctx.tokenizer))) is not None:
            manifest["processor"] = processor  # its settings make the pixel values, which no id shows
        key = hashlib.blake2b(json.dumps(manifest, sort_keys=True).encode(), digest_size=10).hexdigest()
        self.folder = Path(self.cache_dir) if self.cache_dir else Path(ctx.output_dir) / "reference_cache"
        self.folder = self.folder / key

        def check() -> str:  # why the cache cannot be used, or "" (decided once, on the main process)
            cache, why = ReferenceCache.read(self.folder, manifest)
            if cache is not None and cache.missing(examples):
                why = f"it lacks {len(cache.missing(examples))} example(s)"
            if manifest["reference"].startswith("sharded:"):
                why = "the reference is sharded, so its weights cannot be hashed to tell a stale cache"
            return why
        why = _on_main(acc, check)
        if why:
            if acc.is_main_process and why != "no cache yet":
                log.warning("reference cache %s is not used (%s); recomputing", self.folder, why)
            cache = self._compute(ctx, list(examples.values()), roles)
            if acc.is_main_process:
                cache.write(self.folder, manifest)
            acc.wait_for_everyone()
        else:
            cache, _ = ReferenceCache.read(self.folder, manifest)
            if acc.is_main_process:
                log.info("reference log-probs: %d examples from the cache %s", len(examples), self.folder)
        self.cache = cache
        self.source.release()  # the reference model is no longer needed
        gc.collect()

    def _compute(self, ctx, examples: list, roles: list[str]) -> ReferenceCache:
        """Score every example once, each process its share, then gather every process's records.
        Every process runs the same number of forwards (a sharded or DDP forward is a collective):
        a process whose share ran out scores a filler batch whose records are dropped."""
        from accelerate.utils import gather_object

        from prefopt.train.batches import EvalBatchSampler, example_tokens

        acc = ctx.accelerator
        ordered = sorted(examples, key=lambda e: -example_tokens(e))  # similar lengths together
        sampler = EvalBatchSampler(len(ordered), ctx.batch_size, acc.num_processes, acc.process_index)
        records = []
        for indices in console.progress(sampler, "reference log-probs", unit="batch"):  # the main process's
            part = [ordered[i % len(ordered)] for i in indices]
            batch = ctx.collator(part).to(acc.device)
            scores = self.source.scores(batch)
            if indices[0] >= len(ordered):  # a filler batch
                continue
            counts = torch.bincount(batch.token_sequence, minlength=batch.num_sequences)
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
            tokens = scores.token_logps.float().cpu()
            logps = scores.logps.float().cpu().tolist()
            for i, ex in enumerate(part):
                by_role = {}
                for role in roles:
                    s = int(batch.index[role][i])
                    by_role[role] = (logps[s], tokens[offsets[s]:offsets[s + 1]].clone())
                records.append((ex.uid, by_role))
        if acc.num_processes > 1:
            records = gather_object(records)
        if acc.is_main_process:
            log.info("reference log-probs: computed for %d examples (%s)", len(examples), self.source.description)
        return ReferenceCache.from_records(records, roles)

    def scores(self, batch: Batch, keep_token_logprobs: bool = False) -> SequenceScores:
        return self.cache.scores(batch)
