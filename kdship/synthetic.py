"""A small, generated, compositional sentiment language: the built-in task of `kdship quickstart` and the tests.

It is synthetic (documented as such): sentences are built from a grammar and labelled by a rule, so a model must
learn composition, not keywords alone:
- a clause is "the NOUN VERB [INTENSIFIER] [NEGATION] ADJECTIVE"; the adjective's polarity, flipped by a negation
  ("not", "never", "hardly"), is the clause's polarity;
- "X but Y" / "X yet Y" / "although X , Y" take Y's polarity (the contrast decides); "X and Y" joins agreeing clauses;
- optional openers ("honestly ,", "in the end ,") carry no signal.
"""

from __future__ import annotations

import random
from pathlib import Path

from kdship.artifacts import atomic_write_text

POSITIVE = ["good", "great", "brilliant", "charming", "clever", "moving", "delightful", "superb", "fresh", "gripping"]
NEGATIVE = ["bad", "dull", "awful", "boring", "clumsy", "tedious", "bland", "weak", "messy", "forgettable"]
NOUNS = ["movie", "plot", "acting", "script", "soundtrack", "ending", "cast", "dialogue", "pacing", "story",
         "camera work", "director"]
VERBS = ["was", "is", "felt", "seemed", "looked", "sounded"]
INTENSIFIERS = ["really", "quite", "very", "rather", "truly", "so"]
NEGATIONS = ["not", "never", "hardly"]
OPENERS = ["honestly ,", "in the end ,", "to be fair ,", "overall ,", "frankly ,"]
LABELS = ["negative", "positive"]


def _clause(rng: random.Random, polarity: int) -> str:
    negated = rng.random() < 0.4
    adjective = rng.choice(POSITIVE if polarity != negated else NEGATIVE)
    words = ["the", rng.choice(NOUNS), rng.choice(VERBS)]
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS))
    if negated:
        words.append(rng.choice(NEGATIONS))
    return " ".join(words + [adjective])


def sentence(rng: random.Random, compositional: bool = True) -> tuple[str, int]:
    """One labelled sentence (label 1 = positive); compositional=False gives single clauses only (an easier task)."""
    label = rng.randint(0, 1)
    form = rng.random() if compositional else 0.0
    if form < 0.35:
        text = _clause(rng, label)
    elif form < 0.65:
        text = f"{_clause(rng, 1 - label)} {rng.choice(['but', 'yet'])} {_clause(rng, label)}"
    elif form < 0.8:
        text = f"although {_clause(rng, 1 - label)} , {_clause(rng, label)}"
    else:
        text = f"{_clause(rng, label)} and {_clause(rng, label)}"
    if compositional and rng.random() < 0.3:
        text = f"{rng.choice(OPENERS)} {text}"
    return text, label


def write_split(path: Path, n: int, seed: int, compositional: bool = True) -> Path:
    """A GLUE-style TSV (`sentence<TAB>label`, label names negative/positive)."""
    rng = random.Random(seed)
    examples = (sentence(rng, compositional) for _ in range(n))
    rows = ["sentence\tlabel"] + [f"{t}\t{LABELS[y]}" for t, y in examples]
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def paraphrase(rng: random.Random, text: str) -> str:
    """The same statement in other words: verbs swapped for other linking verbs, intensifiers dropped or added,
    an opener added or removed. Nouns, adjectives and negations stay, so the meaning does."""
    words = [w for w in text.split() if w not in INTENSIFIERS]
    out = []
    for w in words:
        out.append(rng.choice(VERBS) if w in VERBS else w)
        if w in VERBS and rng.random() < 0.3:
            out.append(rng.choice(INTENSIFIERS))
    rephrased = " ".join(out)
    opener = next((o for o in OPENERS if rephrased.startswith(o)), None)
    if opener:
        return rephrased.removeprefix(opener).strip()
    return f"{rng.choice(OPENERS)} {rephrased}" if rng.random() < 0.5 else rephrased


def write_pairs(path: Path, n: int, seed: int, labelled: bool = False) -> Path:
    """A sentence-pair TSV (`sentence1<TAB>sentence2`) for dual-tower matching: paraphrase pairs; with `labelled`,
    half of the pairs are two unrelated sentences and a label column says which (paraphrase / different)."""
    rng = random.Random(seed)
    rows = ["sentence1\tsentence2" + ("\tlabel" if labelled else "")]
    for _ in range(n):
        left = sentence(rng)[0]
        same = not labelled or rng.random() < 0.5
        right = paraphrase(rng, left) if same else sentence(rng)[0]
        rows.append(f"{left}\t{right}" + (f"\t{'paraphrase' if same else 'different'}" if labelled else ""))
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path
