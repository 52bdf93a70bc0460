"""Every exported variant is run against the PyTorch model on real inputs at several shapes, and re-measured on
the eval split. A miss fails the export unless the user explicitly allows it (recorded in the manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdship.exporters import Exporter


def _feeds(tokenizer: Any, texts: list[tuple[str, ...]], names: list[str], max_length: int,
           pad_to_max: bool = False) -> dict[str, np.ndarray]:
    columns = list(zip(*texts))
    enc = tokenizer(*columns, truncation=True, max_length=max_length, return_tensors="np",
                    padding="max_length" if pad_to_max else True)
    return {n: enc[n].astype(np.int64) for n in names}


def parity_cases(tokenizer: Any, texts: list[tuple[str, ...]], names: list[str], max_length: int,
                 vocab_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Real texts at batch 1 (shortest), batch 1 at the longest sequence, a padded batch of 8; and random ids."""
    by_length = sorted(texts, key=lambda t: sum(len(s) for s in t))
    long_text = " ".join([" ".join(by_length[-1])] * max_length)  # repeated until truncation: the longest sequence
    longest = tuple(long_text for _ in texts[0])
    rng = np.random.default_rng(0)
    random_ids = rng.integers(5, vocab_size, size=(4, 33), dtype=np.int64)
    random_case = {"input_ids": random_ids, "attention_mask": np.ones_like(random_ids)}
    if "token_type_ids" in names:
        random_case["token_type_ids"] = np.zeros_like(random_ids)
    return {
        "real b1 shortest": _feeds(tokenizer, by_length[:1], names, max_length),
        f"real b1 seq{max_length}": _feeds(tokenizer, [longest], names, max_length, pad_to_max=True),
        "real b8 padded": _feeds(tokenizer, by_length[:: max(1, len(by_length) // 8)][:8], names, max_length),
        "random b4 seq33": random_case,
    }


# parity inputs for a model exported without data: sentences of many kinds and lengths, then word salads drawn
# from the tokenizer's own vocabulary, so every variant still sees real token statistics, padding and long inputs
BUILTIN_SENTENCES = [
    "ok", "No.", "The service was quick and the staff were friendly.", "I would not buy this again.",
    "What time does the store open on Sundays?", "The results, as of 3 March 2024, were 12.5% above the forecast.",
    "An utterly forgettable film with one brilliant scene.", "Please reset my password; the link has expired.",
    "It rained all day, so we stayed in and read.", "Café prices in Zürich are high, but the coffee is excellent!",
    "The model's accuracy dropped after quantisation, which nobody noticed for weeks.",
    "Terms and conditions apply. See the full document for details on eligibility, limits and exclusions.",
    "He said it was fine. It was not fine.", "Shipping took 3-5 business days (as promised).",
    "A long, winding, occasionally brilliant and frequently exhausting story about a family, a farm, and the "
    "decades of drought, debt and stubborn hope that shaped three generations of them.",
]


def builtin_texts(tokenizer: Any, columns: int, count: int = 256, seed: int = 0) -> list[tuple[str, ...]]:
    """`count` inputs of `columns` texts each: the built-in sentences, then random word salads of 2-80 words."""
    rng = np.random.default_rng(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and not w.startswith("##")] or list(BUILTIN_SENTENCES)
    salads = [" ".join(rng.choice(words, size=int(rng.integers(2, 81)))) for _ in range(count * columns)]
    pool = BUILTIN_SENTENCES * columns + salads
    return [tuple(pool[i * columns + c] for c in range(columns)) for i in range(count)]


@torch.no_grad()
def torch_reference(model: Any, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """PyTorch's logits and, for a model with early exits, every exit's logits ([batch, exits, labels]; else None),
    from one forward call."""
    out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    exits = getattr(out, "exit_logits", None)
    return out.logits.float().numpy(), None if exits is None else torch.stack(exits, 1).float().numpy()


def check_exits(exporter: Exporter, path: Path, cases: dict[str, dict[str, np.ndarray]],
                reference: dict[str, np.ndarray], eval_batches: list[dict[str, np.ndarray]],
                reference_eval: np.ndarray) -> dict[str, Any] | None:
    """The exported `exit_logits` output against PyTorch's, for an ONNX file that has one (None otherwise): the
    exits ship with the model, so a server that reads them gets what was trained. Judged as the final logits are:
    differences over the shape cases, label agreement pooled over the eval split (a shape case holds a few rows,
    where one near-tie flipped by quantisation would read as a large disagreement)."""
    import onnxruntime as ort

    if path.suffix != ".onnx":
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if "exit_logits" not in {o.name for o in session.get_outputs()}:
        return None
    def exit_logits(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["exit_logits"], feeds)[0]

    max_abs = max(float(np.abs(exit_logits(feeds) - reference[name]).max()) for name, feeds in cases.items())
    got = np.concatenate([exit_logits(feeds) for feeds in eval_batches])
    agreement = (got.argmax(-1) == reference_eval.argmax(-1)).mean(0)  # per exit, over the eval rows
    result = {"max_abs": max_abs, "agreement": float(agreement.min()), "eval_n": len(got)}
    bound = exporter.tolerance.max_abs
    result["passed"] = ((result["max_abs"] <= bound) if bound is not None else
                        result["agreement"] >= exporter.tolerance.min_agreement)
    return result


def batched(tokenizer: Any, texts: list[tuple[str, ...]], names: list[str], max_length: int,
            size: int = 64) -> list[dict[str, np.ndarray]]:
    return [_feeds(tokenizer, texts[i:i + size], names, max_length) for i in range(0, len(texts), size)]


def check_variant(exporter: Exporter, path: Path, cases: dict[str, dict[str, np.ndarray]],
                  reference: dict[str, np.ndarray], eval_batches: list[dict[str, np.ndarray]],
                  reference_eval: np.ndarray, labels: np.ndarray | None, max_accuracy_drop: float) -> dict[str, Any]:
    """Differences per shape, label agreement and accuracy on the eval split, and whether each meets its bound."""
    run = exporter.load(path)
    shapes = {}
    for name, feeds in cases.items():
        diff = np.abs(run(feeds) - reference[name])
        shapes[name] = {"shape": list(feeds["input_ids"].shape), "max_abs": float(diff.max()),
                        "mean_abs": float(diff.mean())}
    logits = np.concatenate([run(feeds) for feeds in eval_batches])
    predicted, expected = logits.argmax(-1), reference_eval.argmax(-1)
    result: dict[str, Any] = {"shapes": shapes, "max_abs": max(s["max_abs"] for s in shapes.values()),
                              "tolerance": {"max_abs": exporter.tolerance.max_abs,
                                            "min_agreement": exporter.tolerance.min_agreement},
                              "agreement": float((predicted == expected).mean()), "eval_n": len(predicted)}
    checks = {"agreement": result["agreement"] >= exporter.tolerance.min_agreement}
    if exporter.tolerance.max_abs is not None:
        checks["max_abs"] = result["max_abs"] <= exporter.tolerance.max_abs
    if labels is not None:
        result["accuracy"] = float((predicted == labels).mean())
        result["pytorch_accuracy"] = float((expected == labels).mean())
        result["accuracy_drop"] = result["pytorch_accuracy"] - result["accuracy"]
        checks["accuracy_drop"] = result["accuracy_drop"] <= max_accuracy_drop
    result["checks"] = checks
    result["passed"] = all(checks.values())
    return result


def print_parity(results: dict[str, dict[str, Any]]) -> None:
    from kdship.ui import console
    from rich.table import Table

    table = Table(title="export parity vs PyTorch")
    for col in ("variant", "case", "shape", "max abs", "mean abs", "agreement", "accuracy (drop)", ""):
        table.add_column(col)
    for variant, r in results.items():
        mark = "[green]✓[/green]" if r["passed"] else "[red]✗[/red]"
        accuracy = f"{r['accuracy']:.4f} ({r['accuracy_drop']:+.4f})" if "accuracy" in r else ""
        for i, (case, s) in enumerate(r["shapes"].items()):
            first = i == 0
            table.add_row(variant if first else "", case, "x".join(map(str, s["shape"])), f"{s['max_abs']:.2e}",
                          f"{s['mean_abs']:.2e}", f"{r['agreement']:.4f}" if first else "", accuracy if first else "",
                          mark if first else "")
        failed = [k for k, ok in r["checks"].items() if not ok]
        if failed:
            table.add_row("", f"[red]failed: {', '.join(failed)}[/red]", "", "", "", "", "", "")
    console().print(table)
