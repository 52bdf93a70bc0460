"""Examples from files or hub datasets -> tokenized, length-bucketed, dynamically padded batches.

Local formats: csv, tsv (GLUE-style, loaded as is), jsonl/json, parquet, and for unlabeled text (MLM) txt or
txt.gz files with one text per line, or a folder of them. Anything else that is not a local path is tried as a
`datasets` hub id, optionally `id:split`."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from kdship.errors import DataError

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet"}
TEXT_SUFFIXES = {".txt", ".gz"}
# Column names tried in order when text_columns is not given: single texts, then the GLUE pair layouts.
KNOWN_TEXT_COLUMNS = [["sentence"], ["text"], ["sentence1", "sentence2"], ["question", "sentence"],
                      ["premise", "hypothesis"], ["question1", "question2"], ["content"], ["review"]]


@dataclass
class TextTable:
    """Raw examples: texts (one column or a pair) and, for labelled data, raw label values."""

    texts: list[tuple[str, ...]]
    raw_labels: list[Any] | None
    source: str
    fingerprint: str
    columns: list[str] | None = None  # the text columns read (None: plain text)

    def __len__(self) -> int:
        return len(self.texts)


# ---- reading ------------------------------------------------------------------------------------------------------


def _file_fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".tsv":  # GLUE TSVs hold raw quotes: never treat them as CSV quoting
            return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str)
        if suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False, dtype=str)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        return pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data file {path} could not be read as {suffix[1:]}: {first}; check its format") from None


def _read_hub(source: str) -> pd.DataFrame:
    name, _, split = source.partition(":")
    try:
        import datasets

        return datasets.load_dataset(name, split=split or "train").to_pandas()
    except Exception as e:  # datasets raises many types (offline, missing split, bad id): all are "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"'{source}' is not a local file and could not be loaded as a hub dataset ({first}); "
            "check the path or the hub id"
        ) from None


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name.endswith(".txt.gz")))
        if not files:
            raise DataError(f"folder {path} holds no .txt or .txt.gz files; point at a text file or a folder of them")
        return files
    return [path]


def _read_lines(files: Sequence[Path]) -> list[str]:
    lines: list[str] = []
    for f in files:
        opener = gzip.open if f.name.endswith(".gz") else open
        try:
            with opener(f, "rt", encoding="utf-8") as fh:
                lines.extend(line.strip() for line in fh if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"text file {f} could not be read ({e}); give UTF-8 text, one example per line") from None
    return lines


def pick_text_columns(columns: Sequence[str], wanted: Sequence[str] | None, source: str) -> list[str]:
    if wanted:
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{source} has no column {missing[0]!r} (columns: {', '.join(map(str, columns))}); "
                            "set data.text_columns / --text-column")
        return list(wanted)
    for candidate in KNOWN_TEXT_COLUMNS:
        if all(c in columns for c in candidate):
            return candidate
    raise DataError(f"{source} has no text column I recognise (columns: {', '.join(map(str, columns))}); "
                    "set data.text_columns / --text-column")


def load_table(source: str, text_columns: Sequence[str] | None, label_column: str | None,
               max_samples: int | None = None) -> TextTable:
    """Read a labelled (label_column given) or unlabeled (label_column None) table of texts."""
    path = Path(source).expanduser()
    is_text_file = path.is_dir() or path.name.endswith((".txt", ".txt.gz"))
    if path.exists() and is_text_file:
        if label_column is not None and path.is_dir() and not any(path.iterdir()):
            raise DataError(f"data folder {source} is empty; give a data file (csv/tsv/jsonl/parquet), or a folder of "
                            ".txt files for --objective mlm")
        if label_column is not None:
            raise DataError(f"{source} is plain text without labels; classification needs csv/tsv/jsonl/parquet "
                            "with a label column (plain text is for --objective mlm, or for distilling a "
                            "classifier from the teacher alone: --loss kd:1)")
        files = _text_files(path)
        texts = [(t,) for t in _read_lines(files)]
        table = TextTable(texts, None, str(path), _file_fingerprint(files))
    elif path.exists():
        table = _table_from_frame(_read_frame(path), text_columns, label_column, str(path), _file_fingerprint([path]))
    else:
        _refuse_missing_path(source, path)
        frame = _read_hub(source)
        table = _table_from_frame(frame, text_columns, label_column, source, f"hub:{source}:{len(frame)}")
    if len(table) == 0:
        raise DataError(f"data {source} holds no examples; give a file with at least one row")
    if max_samples is not None:
        table = TextTable(table.texts[:max_samples], table.raw_labels and table.raw_labels[:max_samples],
                          table.source, table.fingerprint + f":first{max_samples}", table.columns)
    return table


def _refuse_missing_path(source: str, path: Path) -> None:
    """A source that is not on disk is read as a hub id, unless it was plainly meant as a path."""
    if os.path.lexists(path):
        raise DataError(f"data {source} is a broken link or a link loop; point at the file itself")
    if path.suffix.lower() in TABLE_SUFFIXES | TEXT_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"data file {source} not found; check the path")


def _table_from_frame(frame: pd.DataFrame, text_columns: Sequence[str] | None, label_column: str | None,
                      source: str, fingerprint: str) -> TextTable:
    columns = [str(c) for c in frame.columns]
    cols = pick_text_columns(columns, text_columns, source)
    texts = list(zip(*(frame[c].astype(str).tolist() for c in cols)))
    labels = None
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"{source} has no label column {label_column!r} (columns: {', '.join(columns)}); "
                            "set data.label_column / --label-column")
        labels = frame[label_column].tolist()
        if any(pd.isna(v) or v == "" for v in labels):
            raise DataError(f"{source} has rows without a label in column {label_column!r}; fill or drop them")
    return TextTable(texts, labels, source, fingerprint, cols)


# ---- labels -------------------------------------------------------------------------------------------------------


def _as_int(value: Any) -> int | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


def label_names_from_data(raw: Sequence[Any]) -> list[str]:
    """Integer labels 0..n-1 keep their order; string labels are sorted."""
    ints = [_as_int(v) for v in raw]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise DataError(f"labels must be 0..n-1, found {min(ints)}; remap them")
        return [str(i) for i in range(max(ints) + 1)]
    return sorted({str(v) for v in raw})


def encode_labels(raw: Sequence[Any], label_names: Sequence[str], source: str) -> list[int]:
    """Map raw labels to ids by name; integer labels that are not names are taken as ids."""
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for v in raw:
        i = index.get(str(v))
        as_int = _as_int(v)
        if i is None and as_int is not None:
            i = index.get(str(as_int), as_int if 0 <= as_int < len(label_names) else None)
        if i is None:
            raise DataError(f"{source} has label {v!r}, which the model does not know (labels: "
                            f"{', '.join(label_names)}); check the label column or the model's id2label (a teacher "
                            "of another task: kdship distill --cross-task)")
        ids.append(i)
    return ids


# ---- tokenizing and batching --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Tokenized examples: one dict of token lists per example, plus labels (or None)."""

    features: list[dict[str, list[int]]]
    labels: list[int] | None
    dropped: int = 0  # examples left out (causal LM: no target token within max_length)

    def lengths(self) -> list[int]:
        return [max(len(f["input_ids"]), len(f.get("input_ids" + SECOND, ()))) for f in self.features]


IGNORED = -100  # a label position no loss reads (transformers' convention)
# Suffix of the second text's inputs when a pair is encoded as two separate sequences (dual-tower models).
SECOND = "_b"
INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def tokenize(tokenizer: Any, table: TextTable, max_length: int, labels: list[int] | None,
             apart: bool = False) -> Encoded:
    """Token ids per example. Pairs become one sequence (a cross-encoder reads both texts together) or, with
    `apart`, two sequences whose second has keys ending in _b (a dual-tower model encodes each text alone)."""
    columns = list(zip(*table.texts))
    if apart and len(columns) != 2:
        raise DataError(f"{table.source}: a dual-tower (match) model needs sentence pairs, but the data has "
                        f"{len(columns)} text column; give two with --text-column A --text-column B")
    encoded = [tokenizer(list(c), truncation=True, max_length=max_length) for c in columns] if apart else \
        [tokenizer(*columns, truncation=True, max_length=max_length)]
    features = []
    for i in range(len(table)):
        feature = {}
        for side, enc in zip(("", SECOND), encoded):
            feature |= {k + side: enc[k][i] for k in INPUT_KEYS if k in enc}
        features.append(feature)
    return Encoded(features, labels)


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Batches of similar length (less padding): shuffle, sort within chunks of 50 batches, shuffle batches.

    Deterministic for a given seed, so a resumed run sees exactly the batches it would have seen."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(tokenizer: Any, encoded: Encoded, indices: Sequence[int], mlm_collator: Any = None,
            mask_seed: int | None = None) -> dict[str, Any]:
    """Pad one batch to its longest example. MLM masking is seeded per batch, so it does not depend on history."""
    import torch

    feats = [encoded.features[i] for i in indices]
    if "labels" in feats[0]:  # causal-LM tokens with their own targets
        return _pad_lm(tokenizer, feats)
    if mlm_collator is not None:
        mlm_collator.generator = torch.Generator().manual_seed(mask_seed or 0)
        return dict(mlm_collator(feats))
    batch = _pad_pairs(tokenizer, feats) if "input_ids" + SECOND in feats[0] else dict(tokenizer.pad(feats,
                                                                                                   return_tensors="pt"))
    if encoded.labels is not None:
        batch["labels"] = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    return batch


def _pad_lm(tokenizer: Any, feats: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Causal-LM examples padded on the right (positions then count from each text's start, as in generation's
    first token), padding masked out and never a target."""
    import torch

    longest = max(len(f["input_ids"]) for f in feats)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = lambda values, value: values + [value] * (longest - len(values))  # noqa: E731
    return {"input_ids": torch.tensor([fill(f["input_ids"], pad) for f in feats]),
            "attention_mask": torch.tensor([fill([1] * len(f["input_ids"]), 0) for f in feats]),
            "labels": torch.tensor([fill(f["labels"], IGNORED) for f in feats])}


def _pad_pairs(tokenizer: Any, feats: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Pad both sides of each pair to one length, so their hidden states stack on the batch axis."""
    longest = max(len(f[k]) for f in feats for k in ("input_ids", "input_ids" + SECOND))
    batch = {}
    for side in ("", SECOND):
        texts = [{k: f[k + side] for k in INPUT_KEYS if k + side in f} for f in feats]
        padded = tokenizer.pad(texts, padding="max_length", max_length=longest, return_tensors="pt")
        batch |= {k + side: v for k, v in padded.items()}
    return batch


def partners(n: int, device: Any) -> Any:
    """The in-batch targets of a dual-tower batch: row i's partner is column i."""
    import torch

    return torch.arange(n, device=device)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What a model's forward takes from a batch: everything but the labels (a loss computed here reads them)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def targets(batch: dict[str, Any], logits: Any) -> Any:
    """The labels a batch's logits are scored against: its labels, or for in-batch matching the partners."""
    return batch["labels"] if "labels" in batch else partners(len(logits), logits.device)


def token_mask(batch: dict[str, Any]) -> Any:
    """The real-token mask of the hidden states a model returns for this batch (both sides for pairs)."""
    import torch

    if "attention_mask" + SECOND in batch:
        return torch.cat([batch["attention_mask"], batch["attention_mask" + SECOND]])
    return batch["attention_mask"]


def iterate_batches(tokenizer: Any, encoded: Encoded, batch_size: int) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """Evaluation order: length-bucketed, unshuffled; yields (indices, batch)."""
    for indices in bucket_batches(encoded.lengths(), batch_size, seed=0, shuffle=False):
        yield indices, collate(tokenizer, encoded, indices)


# ---- causal-LM data -----------------------------------------------------------------------------------------------
# Three shapes: plain text (txt files, or a table with a text column), packed into blocks that are all targets;
# prompt/response rows, whose loss is on the response; chat `messages`, whose loss is on the assistant's turns.
LM_KINDS = ("text", "prompt_response", "chat")


@dataclass
class LmTable:
    """Raw causal-LM examples: strings (text), (prompt, response) pairs, or lists of chat messages."""

    kind: str
    items: list[Any]
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.items)


def load_lm_table(source: str, text_columns: Sequence[str] | None = None, max_samples: int | None = None) -> LmTable:
    """Causal-LM examples from a table with prompt and response columns or a `messages` column (chat), a table with
    a text column, or plain text: any other local file (.txt, .txt.gz, WikiText's .tokens, ...) or a folder of
    .txt[.gz] files, one text per line; the shape is read from what the file holds."""
    path = Path(source).expanduser()
    if path.exists() and (path.is_dir() or path.suffix.lower() not in TABLE_SUFFIXES):
        files = _text_files(path)
        table = LmTable("text", _read_lines(files), str(path), _file_fingerprint(files))
    elif path.exists():
        table = _lm_table_from_frame(_read_frame(path), text_columns, str(path), _file_fingerprint([path]))
    else:
        _refuse_missing_path(source, path)
        frame = _read_hub(source)
        table = _lm_table_from_frame(frame, text_columns, source, f"hub:{source}:{len(frame)}")
    if len(table) == 0:
        raise DataError(f"data {source} holds no examples; give a file with at least one row")
    return _first_rows(table, max_samples)


def _first_rows(table: LmTable, count: int | None) -> LmTable:
    if count is None:
        return table
    return LmTable(table.kind, table.items[:count], table.source, table.fingerprint + f":first{count}")


def load_prompt_table(source: str, max_samples: int | None = None) -> LmTable:
    """Prompts to continue: a table's `prompt` column (responses beside it are ignored: they are written anew),
    chat `messages` (a conversation may end with the user's turn), or any data load_lm_table reads."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        frame = _read_frame(path)
        if "prompt" in frame.columns:
            prompts = frame["prompt"].tolist()
            bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()), None)
            if bad is not None:
                raise DataError(f"{source} row {bad + 1}: the prompt must be a non-empty string; fix or drop the row")
            return _first_rows(LmTable("prompts", prompts, str(path), _file_fingerprint([path])), max_samples)
        if "messages" in frame.columns:
            chats = [_chat_messages(m, source, i, needs_assistant=False) for i, m in enumerate(frame["messages"])]
            return _first_rows(LmTable("chat", chats, str(path), _file_fingerprint([path])), max_samples)
    return load_lm_table(source, None, max_samples)


def _lm_table_from_frame(frame: Any, text_columns: Sequence[str] | None, source: str, fingerprint: str) -> LmTable:
    columns = [str(c) for c in frame.columns]
    if "messages" in columns and not text_columns:
        return LmTable("chat", [_chat_messages(m, source, i) for i, m in enumerate(frame["messages"])], source,
                       fingerprint)
    if {"prompt", "response"} <= set(columns) and not text_columns:
        pairs = list(zip(frame["prompt"].tolist(), frame["response"].tolist()))
        bad = next((i for i, (p, r) in enumerate(pairs) if not isinstance(p, str) or not isinstance(r, str) or not r),
                   None)
        if bad is not None:
            raise DataError(f"{source} row {bad + 1}: prompt and response must be strings, and the response not "
                            "empty; fix or drop the row")
        return LmTable("prompt_response", pairs, source, fingerprint)
    try:
        column = pick_text_columns(columns, text_columns, source)
    except DataError:
        raise DataError(f"{source} has no prompt and response columns, no messages column and no text column "
                        f"(columns: {', '.join(columns)}); give JSONL with prompt/response fields or chat messages, "
                        "plain text, or --text-column") from None
    if len(column) != 1:
        raise DataError(f"{source}: a causal LM reads one text column, not a pair; pass --text-column NAME")
    return LmTable("text", [t for t in frame[column[0]].astype(str).tolist() if t.strip()], source, fingerprint)


def _chat_messages(value: Any, source: str, row: int, needs_assistant: bool = True) -> list[dict[str, str]]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in value)
    if not ok or (needs_assistant and not any(m["role"] == "assistant" for m in value)):
        raise DataError(f"{source} row {row + 1}: messages must be a list of {{role, content}} with roles system, "
                        "user or assistant, and at least one assistant turn (the loss is on those); fix the row")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def tokenize_lm(tokenizer: Any, table: LmTable, max_length: int) -> Encoded:
    """Causal-LM token ids with their targets. Targets are aligned with the positions that predict them (labels[t]
    is token t + 1, IGNORED where no loss is read: prompts, user turns, the last position), so every loss reads
    logits[t] against labels[t] as for masked LMs, and nothing shifts again. Text is packed into blocks of max_length; a prompt/response or chat example
    longer than that is cut at max_length, and one left without a target token is dropped (counted in
    `Encoded.dropped`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-text token, which causal-LM data needs between texts; use a "
                        "decoder's tokenizer (or kdship train --init ... --objective clm, which trains one)")
    if table.kind == "text":
        return _packed_blocks(tokenizer, table.items, max_length, eos)
    examples = [_prompt_response(tokenizer, p, r, eos) for p, r in table.items] if table.kind == "prompt_response" \
        else [_chat_example(tokenizer, m, table.source) for m in table.items]
    features = []
    for ids, labels in examples:
        ids, labels = ids[:max_length], next_token_targets(labels[:max_length])
        if any(label != IGNORED for label in labels):
            features.append({"input_ids": ids, "labels": labels})
    if not features:
        raise DataError(f"{table.source}: no example keeps a response token within max_length {max_length}; raise "
                        "--max-length or shorten the prompts")
    return Encoded(features, None, dropped=len(examples) - len(features))


def _packed_blocks(tokenizer: Any, texts: list[str], max_length: int, eos: int) -> Encoded:
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream += ids + [eos]
    blocks = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) > 1]  # a lone token has nothing to predict
    return Encoded([{"input_ids": b, "labels": next_token_targets(b)} for b in blocks], None)


def next_token_targets(labels: list[int]) -> list[int]:
    """Per-token labels (transformers' convention: the token itself) -> the target each position predicts."""
    return labels[1:] + [IGNORED]


def _prompt_response(tokenizer: Any, prompt: str, response: str, eos: int) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None):
        return _chat_example(tokenizer, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}], "")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    return prompt_ids + response_ids, [IGNORED] * len(prompt_ids) + response_ids


def _chat_example(tokenizer: Any, messages: list[dict[str, str]], source: str) -> tuple[list[int], list[int]]:
    """The conversation as the tokenizer's chat template renders it; targets are the tokens of the assistant turns,
    found as characters (the text up to a turn with the generation prompt, then through the turn) and mapped to
    tokens by their offsets: tokenizing the pieces apart would cut tokens that span a turn's edge."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} holds chat messages but the tokenizer has no chat template; give prompt/response "
                        "rows instead, or a tokenizer with a chat template")
    render = lambda upto, prompt: tokenizer.apply_chat_template(  # noqa: E731
        messages[:upto], tokenize=False, add_generation_prompt=prompt)
    text = render(len(messages), False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(turn, True), render(turn + 1, False)
            if not (text.startswith(before) and text.startswith(through)):
                raise DataError(f"{source}: the tokenizer's chat template renders a conversation's start differently "
                                "from the whole, so its assistant turns cannot be found; give prompt/response rows")
            spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [token if any(a < end and b > start for start, end in spans) else IGNORED
              for token, (a, b) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def lm_texts(table: LmTable) -> Iterator[str]:
    """Every text of causal-LM examples, in order (what a tokenizer is trained on)."""
    for item in table.items:
        if table.kind == "text":
            yield item
        elif table.kind == "prompt_response":
            yield from item
        else:
            yield from (m["content"] for m in item)


def lm_prompts(table: LmTable, count: int, words: int = 8) -> list[Any]:
    """Prompts to generate from: the data's prompts (a chat without its last assistant turn), or the first words
    of its texts."""
    if table.kind == "prompt_response":
        return [p for p, _ in table.items[:count]]
    if table.kind == "chat":
        return [m[:max(i for i, x in enumerate(m) if x["role"] == "assistant")] for m in table.items[:count]]
    return [" ".join(t.split()[:words]) for t in table.items[:count] if len(t.split()) > words // 2]
