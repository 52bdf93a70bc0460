"""`kdship augment`: a larger transfer set for task distillation, made as TinyBERT made its (Jiao et al. 2020, data
augmentation, Algorithm 1): each sentence is copied N times with words replaced, then labelled by the teacher.

A word that is one word piece is replaced (with probability p) by one of the K words a masked-LM predicts in its
place, masked alone in its sentence; a word of several pieces, or every word with method `embedding`, by one of
its K nearest neighbours among whole-word tokens of the masked-LM's input embeddings (TinyBERT used GloVe
neighbours there; the model's own embeddings need no extra download). The teacher then labels every sentence, so
the file is a labelled dataset like any other: `kdship distill --data aug.tsv` (KD reads the teacher's soft
predictions live; CE reads these labels). The settings, sources and counts are written beside the file
(`<file>.kdship.json`), and the file is written atomically."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from kdship.artifacts import SIDECAR, atomic_write_json, atomic_write_text, library_versions
from kdship.config import AugmentConfig, to_record
from kdship.data import load_table
from kdship.errors import ConfigError, ModelError
from kdship.models import build_model, is_mlm, label_names_of, load_config, load_tokenizer, under_weights_policy
from kdship.runtime import pick_device


class WordSubstitutes:
    """Replacement candidates for the words of a sentence: masked-LM predictions for one-piece words, embedding
    neighbours for the rest (or for all, with method embedding)."""

    def __init__(self, model: Any, tokenizer: Any, top_k: int, method: str, device: torch.device):
        self.model, self.tokenizer, self.top_k, self.method, self.device = model, tokenizer, top_k, method, device
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_ids)
        self.whole_words = torch.tensor(sorted(i for t, i in vocab.items() if t.isalpha() and not t.startswith("##")
                                               and i not in special))
        embeddings = model.get_input_embeddings().weight.detach().float()
        self.unit = torch.nn.functional.normalize(embeddings, dim=-1)
        self.neighbours: dict[int, list[str]] = {}

    def of(self, words: list[str]) -> list[list[str]]:
        """Candidates per word (an empty list: the word is kept)."""
        pieces = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        single = [i for i, p in enumerate(pieces) if len(p) == 1] if self.method == "mlm" else []
        predicted = self._predicted(words, single)
        return [predicted.get(i) or (self._neighbours(p[0]) if p else []) for i, p in enumerate(pieces)]

    def _neighbours(self, token: int) -> list[str]:
        if token not in self.neighbours:
            scores = self.unit[self.whole_words] @ self.unit[token]
            best = self.whole_words[scores.topk(self.top_k + 1).indices].tolist()
            self.neighbours[token] = [self.tokenizer.convert_ids_to_tokens(t) for t in best if t != token][:self.top_k]
        return self.neighbours[token]

    @torch.no_grad()
    def _predicted(self, words: list[str], positions: list[int]) -> dict[int, list[str]]:
        """The masked-LM's top-K whole words at each given word, each masked alone: one batch per sentence."""
        if not positions:
            return {}
        encoded = self.tokenizer(words, is_split_into_words=True, truncation=True, return_tensors="pt")
        word_ids = encoded.word_ids()
        spots = {w: word_ids.index(w) for w in positions if w in word_ids}
        if not spots:
            return {}
        ids = encoded["input_ids"].repeat(len(spots), 1)
        for row, (w, p) in enumerate(spots.items()):
            ids[row, p] = self.tokenizer.mask_token_id
        inputs = {k: v.repeat(len(spots), 1).to(self.device) for k, v in encoded.items() if k != "input_ids"}
        logits = self.model(input_ids=ids.to(self.device), **inputs).logits.float()
        allowed = torch.full((logits.shape[-1],), float("-inf"), device=logits.device)
        allowed[self.whole_words.to(logits.device)] = 0.0
        out = {}
        for row, (w, p) in enumerate(spots.items()):
            best = (logits[row, p] + allowed).topk(self.top_k + 1).indices.tolist()
            words_out = [self.tokenizer.convert_ids_to_tokens(t) for t in best]
            out[w] = [c for c in words_out if c.lower() != words[w].lower()][:self.top_k]
        return out


def augmented_copies(words: list[str], candidates: list[list[str]], copies: int, replace_prob: float,
                     rng: random.Random) -> list[str]:
    """`copies` sentences, each word replaced with probability `replace_prob` by a random candidate; copies equal to
    the sentence or to an earlier copy are dropped (TinyBERT's loop keeps drawing; here the count is an upper
    bound)."""
    made, seen = [], {" ".join(words)}
    for _ in range(copies):
        new = [rng.choice(c) if c and rng.random() < replace_prob else w for w, c in zip(words, candidates)]
        text = " ".join(new)
        if text not in seen:
            seen.add(text)
            made.append(text)
    return made


def _tokenizer_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(backend.model).__name__ if backend is not None else type(tokenizer).__name__


def _word_piece(tokenizer: Any) -> bool:
    """Whether the vocabulary is WordPiece (whole words, continuations marked ##) behind a fast tokenizer (whose
    word_ids say which tokens make each word)."""
    return getattr(tokenizer, "is_fast", False) and _tokenizer_kind(tokenizer) == "WordPiece"


def _clean(text: str) -> str:
    return " ".join(str(text).split())  # one line, no tabs: the TSV stays one example per line


@under_weights_policy
def augment(cfg: AugmentConfig) -> dict[str, Any]:
    """Write cfg.output: the data's rows (unless keep_original is off) and their augmented copies, all labelled by
    cfg.teacher, as TSV with the data's text columns and a label column."""
    from kdship.evaluate import predict_logits
    from kdship.data import Encoded, TextTable, tokenize

    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"output {out} already exists; pass --overwrite or choose another -o")
    if out.is_dir():
        raise ConfigError(f"output {out} is a folder; give the .tsv file to write")
    device = pick_device(cfg.device)
    mlm_config, teacher_config = load_config(cfg.model, "masked-LM"), load_config(cfg.teacher, "teacher")
    if cfg.method == "mlm" and not is_mlm(mlm_config):
        raise ModelError(f"--model {cfg.model} has no masked-LM head, so it cannot predict words; give a masked-LM "
                         "(e.g. one made with kdship train --objective mlm, or bert-base-uncased), or use --method "
                         "embedding (neighbours in any encoder's input embeddings)")
    label_names = label_names_of(teacher_config)
    if label_names is None:
        raise ModelError(f"--teacher {cfg.teacher} is not a classifier, so it cannot label the new sentences; give "
                         "the fine-tuned teacher you will distill from")
    tokenizer = load_tokenizer(cfg.model, "masked-LM")
    if not _word_piece(tokenizer):
        raise ModelError(f"--model {cfg.model} has a {_tokenizer_kind(tokenizer)} vocabulary; kdship augment reads "
                         "whole words and their ##pieces as BERT's WordPiece writes them: give a WordPiece (BERT-family) "
                         "model")
    teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
    table = load_table(cfg.data.train, cfg.data.text_columns, None, cfg.data.max_train_samples)
    # embedding neighbours need only the input embeddings, which any encoder has (read here through a classifier)
    mlm = build_model("mlm" if cfg.method == "mlm" else "classify", source=cfg.model).to(device).eval()
    substitutes = WordSubstitutes(mlm, tokenizer, cfg.top_k, cfg.method, device)
    rng = random.Random(cfg.seed)
    started = time.perf_counter()
    rows: list[tuple[str, ...]] = []
    for texts in table.texts:
        if cfg.keep_original:
            rows.append(tuple(_clean(t) for t in texts))
        variants = []
        for text in texts:  # each text of a pair on its own; copies are then paired in order
            words = _clean(text).split(" ")
            variants.append(augmented_copies(words, substitutes.of(words), cfg.copies, cfg.replace_prob, rng))
        rows += list(zip(*[v + [_clean(t)] * (max(map(len, variants)) - len(v)) for v, t in zip(variants, texts)]))
    teacher = build_model("classify", source=cfg.teacher).to(device).eval()
    encoded = tokenize(teacher_tokenizer, TextTable(rows, None, str(out), ""), cfg.data.max_length, None)
    top = predict_logits(teacher, teacher_tokenizer, Encoded(encoded.features, None), cfg.batch_size, device).argmax(-1)
    columns = table.columns or [f"text{i + 1}" for i in range(len(rows[0]))]
    lines = ["\t".join([*columns, cfg.data.label_column])]
    lines += ["\t".join([*row, label_names[int(label)]]) for row, label in zip(rows, top)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    facts = {"command": "augment", "config": to_record(cfg), "versions": library_versions(),
             "source": {"data": table.source, "fingerprint": table.fingerprint, "rows": len(table)},
             "rows": len(rows), "augmented_rows": len(rows) - (len(table) if cfg.keep_original else 0),
             "label_counts": {n: int((top == i).sum()) for i, n in enumerate(label_names)},
             "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(Path(str(out) + SIDECAR), facts)
    return {"output": str(out), **facts}

