"""The top-K teacher-logit cache of causal-LM distillation: at every target token of the training data, the
teacher's K most likely next tokens and their log-probabilities, written once and read memory-mapped, so that a
distillation trains without loading the teacher (one that does not fit beside the student, or whose forward
passes cost more than the student's training).

On disk, a folder: `cache.json` (the settings, the data's fingerprint, the teacher's identity, the sizes),
`index.npy` (per example: shard, first row, rows) and shards `log_probs-NNNNN.npy` (float16, [rows, K]) and
`token_ids-NNNNN.npy` (int32, [rows, K]), one row per target token in the order the examples hold them. It is
written into a staging folder and renamed into place, so a cache folder is complete or absent.

The loss on the cache compares student and teacher over K + 1 outcomes, the teacher's K tokens and all other
tokens as one (kdship.losses.top_k_buckets): the student's mass outside the teacher's top K meets the teacher's
tail mass (exact at temperature 1, taken as spread evenly over the other tokens at another). The mean tail mass
is recorded (`mean_tail_mass`), so a K too small for the teacher shows. With K the vocabulary size the loss is
exactly the full one."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from kdship.artifacts import atomic_write_json, check_output_dir, read_json, readable_as_umask_says, sha256_file
from kdship.config import CacheTeacherConfig, to_record
from kdship.data import IGNORED, Encoded, collate, model_inputs
from kdship.errors import DataError, ModelError
from kdship.models import (build_model, is_causal_lm, load_config, load_tokenizer, max_tokens, model_kind,
                           under_weights_policy)
from kdship.run import RunData, load_lm_data, my_share
from kdship.runtime import Runtime, start_runtime

CACHE_FORMAT = "kdship-topk-cache-1"
MANIFEST = "cache.json"
REQUIRED = {"k", "vocab_size", "tokens", "bytes", "bytes_per_token", "shard_rows", "mean_tail_mass", "build_seconds",
            "data", "teacher"}
SHARD_ROWS = 1 << 20  # target tokens per shard file: K=64 makes 128 MiB of log-probs and 256 MiB of token ids


def data_fingerprint(encoded: Encoded) -> str:
    """A hash of the token ids and targets themselves: it changes with the data, the tokenizer, max_length and
    the packing, everything that decides which rows the cache holds."""
    h = hashlib.sha256()
    for feature in encoded.features:
        h.update(np.asarray(feature["input_ids"], np.int64).tobytes())
        h.update(np.asarray(feature["labels"], np.int64).tobytes())
    return "sha256:" + h.hexdigest()


def teacher_fingerprint(sources: list[str], combine: dict[str, Any] | None) -> dict[str, Any]:
    """Who made the cache: each teacher by a hash of all its weight files (a sharded checkpoint too) and its
    absolute path (its source as given where it is a hub id), and how several were combined."""
    keys = []
    for source in sources:
        folder = Path(source)
        files = (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))) \
            if folder.is_dir() else []
        h = hashlib.sha256()
        for file in files:
            h.update(file.name.encode() + bytes.fromhex(sha256_file(file)))
        keys.append({"source": str(folder.resolve()) if folder.exists() else source,
                     "weights_sha256": h.hexdigest() if files else None})
    return {"teachers": keys, **({"combine": combine} if combine else {})}


def cache_about(data: RunData, teacher: dict[str, Any]) -> dict[str, Any]:
    """What a cache is of: the training data (source, fingerprint, sequences, max_length) and the teacher."""
    return {"data": {"source": data.train_table.source, "fingerprint": data_fingerprint(data.train),
                     "sequences": len(data.train.features), "max_length": data.max_length}, "teacher": teacher}


def _same_teacher(made: dict[str, Any], now: dict[str, Any]) -> bool:
    key = lambda t: t["weights_sha256"] or t["source"]  # noqa: E731
    return ([key(t) for t in made["teachers"]] == [key(t) for t in now["teachers"]]
            and made.get("combine") == now.get("combine"))


def _layout(counts: list[int]) -> tuple[np.ndarray, list[int]]:
    """Per example (shard, first row, rows), examples packed whole into shards of at most SHARD_ROWS rows; and the
    rows of each shard."""
    index, shards = np.zeros((len(counts), 3), np.int64), [0]
    for i, count in enumerate(counts):
        if shards[-1] and shards[-1] + count > SHARD_ROWS:
            shards.append(0)
        index[i] = (len(shards) - 1, shards[-1], count)
        shards[-1] += count
    return index, shards


def _shard_names(shard: int) -> tuple[str, str]:
    return f"log_probs-{shard:05d}.npy", f"token_ids-{shard:05d}.npy"


@dataclass
class TopKCache:
    folder: Path
    manifest: dict[str, Any]
    index: np.ndarray
    log_probs: list[np.ndarray]
    token_ids: list[np.ndarray]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @classmethod
    def open(cls, folder: Path) -> "TopKCache":
        folder = Path(folder)
        try:
            manifest = read_json(folder / MANIFEST)
            if manifest.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}")
            missing = REQUIRED - manifest.keys()
            if missing:
                raise ValueError(f"cache.json lacks {', '.join(sorted(missing))}")
            index = np.load(folder / "index.npy")
            shards = [[np.load(folder / name, mmap_mode="r") for name in _shard_names(s)]
                      for s in range(len(manifest["shard_rows"]))]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{folder} is not a complete kdship top-K cache ({type(e).__name__}: {e}); make one with "
                            "kdship cache-teacher, or pass --teacher-cache topk:K") from None
        return cls(folder, manifest, index, [s[0] for s in shards], [s[1] for s in shards])

    def check_fits(self, about: dict[str, Any], vocab_size: int) -> None:
        """Refuse a cache made from other data (`about`: cache_about of this run) or by another teacher: its rows
        would not be this run's tokens."""
        made = self.manifest
        if made["data"]["fingerprint"] != about["data"]["fingerprint"]:
            raise DataError(f"teacher cache {self.folder} was made from other data ({made['data']['source']}, "
                            f"{made['data']['sequences']} sequences at max_length {made['data']['max_length']}); "
                            "give the same data and --max-length, or make the cache again")
        if not _same_teacher(made["teacher"], about["teacher"]):
            raise DataError(f"teacher cache {self.folder} was made by another teacher "
                            f"({', '.join(t['source'] for t in made['teacher']['teachers'])}); pass that teacher, or "
                            "make the cache again")
        if made["vocab_size"] != vocab_size:
            raise DataError(f"teacher cache {self.folder} holds a {made['vocab_size']}-token vocabulary, this run "
                            f"{vocab_size}; make the cache again")

    def outputs(self, labels: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's cached (log-probabilities, token ids), [batch, seq, K] on `labels`' device, filled at the
        target positions (labels not IGNORED) and zero elsewhere (no loss reads those)."""
        rows = [self.index[i] for i in indices]
        log_probs = np.concatenate([self.log_probs[s][first:first + n] for s, first, n in rows])
        token_ids = np.concatenate([self.token_ids[s][first:first + n] for s, first, n in rows])
        targets = labels.ne(IGNORED).cpu()  # (one device sync per step, not one per use)
        if log_probs.shape[0] != int(targets.sum()):
            raise DataError(f"teacher cache {self.folder} does not hold this batch's target tokens; make it again")
        full_log_probs = torch.zeros(*labels.shape, self.k)
        full_ids = torch.zeros(*labels.shape, self.k, dtype=torch.long)
        full_log_probs[targets] = torch.from_numpy(log_probs.astype(np.float32))
        full_ids[targets] = torch.from_numpy(token_ids.astype(np.int64))
        return full_log_probs.to(labels.device), full_ids.to(labels.device)

    def record(self) -> dict[str, Any]:
        keys = ("k", "tokens", "bytes", "bytes_per_token", "mean_tail_mass", "build_seconds")
        return {"folder": str(self.folder), **{key: self.manifest[key] for key in keys}}


def write_topk_cache(folder: Path, teacher_logits: Callable[[dict[str, Any]], torch.Tensor], tokenizer: Any,
                     encoded: Encoded, k: int, vocab_size: int, batch_size: int, runtime: Runtime,
                     about: dict[str, Any], overwrite: bool = False) -> TopKCache:
    """Compute and write the cache of `encoded` into `folder`, each process taking an equal share of the
    examples; `teacher_logits(inputs)` is the (combined) teacher's [batch, seq, vocab] scores. `about` goes into
    the manifest (data source and max_length, the teacher's fingerprint). Every process returns the opened
    cache."""
    if not 1 <= k <= vocab_size:
        raise DataError(f"top-K cache: K {k} must be between 1 and the vocabulary size {vocab_size}")
    started = time.perf_counter()
    counts = [sum(label != IGNORED for label in f["labels"]) for f in encoded.features]
    index, shard_rows = _layout(counts)
    staging = Path(runtime.from_main(_new_staging(folder, overwrite) if runtime.is_main else None))
    try:
        if runtime.is_main:
            _allocate_shards(staging, shard_rows, k)
        runtime.barrier()
        tail = runtime.total(_fill_share(staging, teacher_logits, tokenizer, encoded, index, k, batch_size, runtime))
        if runtime.is_main:
            tokens = int(sum(counts))
            _publish(staging, folder, index, {
                "format": CACHE_FORMAT, "k": k, "vocab_size": vocab_size, "examples": len(counts), "tokens": tokens,
                "bytes_per_token": k * 6, "bytes": tokens * k * 6, "shard_rows": shard_rows,
                "mean_tail_mass": round(tail / max(tokens, 1), 6),
                "build_seconds": round(time.perf_counter() - started, 3), **about})
        runtime.barrier()
    except BaseException:  # an error or Ctrl-C: no half-written cache stays beside the output
        if runtime.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return TopKCache.open(folder)


def _allocate_shards(staging: Path, shard_rows: list[int], k: int) -> None:
    for shard, rows in enumerate(shard_rows):
        for name, dtype in zip(_shard_names(shard), (np.float16, np.int32)):
            np.lib.format.open_memmap(staging / name, mode="w+", dtype=dtype, shape=(rows, k)).flush()


def _publish(staging: Path, folder: Path, index: np.ndarray, manifest: dict[str, Any]) -> None:
    """The index and manifest written last, then the folder renamed into place: a cache is complete or absent."""
    np.save(staging / "index.npy", index)
    atomic_write_json(staging / MANIFEST, manifest)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _new_staging(folder: Path, overwrite: bool) -> str:
    folder = Path(folder)
    check_output_dir(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.staging.")
    readable_as_umask_says(Path(staging))  # (mkdtemp makes it 0700) a cache reads like any other folder
    return staging


def _write_rows(shards: dict[int, list[np.ndarray]], index: np.ndarray, indices: list[int], values: np.ndarray,
                ids: np.ndarray) -> None:
    """The batch's rows (its examples' target tokens, in order) into each example's place in its shard."""
    row = 0
    for i in indices:
        shard, first, count = (int(x) for x in index[i])
        shards[shard][0][first:first + count] = values[row:row + count]
        shards[shard][1][first:first + count] = ids[row:row + count]
        row += count


def _top_k(scores: torch.Tensor, k: int, rows_at_once: int = 4096) -> tuple[np.ndarray, np.ndarray, float]:
    """The top-k log-probabilities (float16) and token ids (int32) of each row of [rows, vocab] scores, and the
    summed tail mass beyond them; computed in float32 a slice of rows at a time (a large vocabulary's float32
    copy of every row at once would not fit beside the models)."""
    values, ids, tail = [], [], 0.0
    for chunk in scores.split(rows_at_once):
        top = F.log_softmax(chunk.float(), -1).topk(k, -1)
        tail += float((1 - top.values.exp().sum(-1)).clamp_min(0).sum())
        values.append(top.values.half().cpu().numpy())
        ids.append(top.indices.int().cpu().numpy())
    return np.concatenate(values), np.concatenate(ids), tail


def _fill_share(staging: Path, teacher_logits: Callable[[dict[str, Any]], torch.Tensor], tokenizer: Any,
                encoded: Encoded, index: np.ndarray, k: int, batch_size: int, runtime: Runtime) -> float:
    """Write this process's share of the rows; returns the tail mass (1 - the top K's probability) it summed."""
    mine, padding = my_share(len(encoded.features), runtime)
    shards = {s: [np.load(staging / name, mmap_mode="r+") for name in _shard_names(s)]
              for s in sorted({int(index[i][0]) for i in mine})}
    tail = 0.0
    order = mine + [len(encoded.features) - 1] * padding  # as many batches as every other process: a sharded
    with torch.no_grad():                                # teacher's forward calls gather its weights together
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = {key: v.to(runtime.device) for key, v in collate(tokenizer, encoded, indices).items()}
            with runtime.autocast():
                logits = teacher_logits(model_inputs(batch))
            real = max(0, min(len(indices), len(mine) - start))  # the padding's rows are not written
            indices, targets = indices[:real], batch["labels"][:real].ne(IGNORED)
            if not real:
                continue
            values, ids, batch_tail = _top_k(logits[:real][targets], k)
            tail += batch_tail
            _write_rows(shards, index, indices, values, ids)
    for log_probs, token_ids in shards.values():
        log_probs.flush()
        token_ids.flush()
    return tail


@under_weights_policy
def cache_teacher(cfg: CacheTeacherConfig) -> dict[str, Any]:
    """`kdship cache-teacher`: the teacher's top-K cache of cfg.data, encoded as a distillation from this teacher
    encodes it (same tokenizer, packing and max_length), so `kdship distill --teacher-cache DIR` reads it."""
    config = load_config(cfg.teacher, "teacher")
    if not is_causal_lm(config):
        raise ModelError(f"teacher {cfg.teacher} is {model_kind(config)}; a top-K cache is of a causal LM's "
                         "next-token predictions (classifiers' logits are cached by kdship distill itself)")
    output = Path(cfg.output)
    check_output_dir(output, cfg.overwrite)
    runtime = start_runtime(cfg.device, cfg.precision)
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    data = load_lm_data(cfg.data, tokenizer, max_tokens(cfg.data.max_length, config))
    model = build_model("clm", source=cfg.teacher).to(runtime.device).eval()
    about = cache_about(data, teacher_fingerprint([cfg.teacher], None)) | {"config": to_record(cfg)}
    cache = write_topk_cache(output, lambda inputs: model(**inputs).logits, tokenizer, data.train, cfg.top_k,
                             config.vocab_size, cfg.batch_size, runtime, about, cfg.overwrite)
    return {"output": str(output), **cache.record()}
