"""Student vs teacher on the same data: accuracy, macro-F1, retention, agreement, calibration, per-class table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdship.models import under_weights_policy
from kdship.config import EvalConfig
from kdship.data import Encoded, iterate_batches, model_inputs
from kdship.runs import RETRIEVAL_METRICS, headline_metrics


@torch.no_grad()
def predict_logits(model: Any, tokenizer: Any, encoded: Encoded, batch_size: int, device: torch.device,
                   autocast: Any = None) -> torch.Tensor:
    """Logits for every example, in the data's order (batches are length-bucketed, then put back)."""
    model.eval()
    out = torch.empty(len(encoded.features), model.config.num_labels)
    for indices, batch in iterate_batches(tokenizer, encoded, batch_size):
        batch = {k: v.to(device) for k, v in model_inputs(batch).items()}
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(**batch).logits
        out[torch.tensor(indices)] = logits.float().cpu()
    return out


def lm_eval_batches(encoded: Encoded, batch_size: int) -> list[list[int]]:
    """The (masked or causal) LM evaluation's batches: fixed, so that masking (seeded by batch number) is too."""
    from kdship.data import bucket_batches

    return bucket_batches(encoded.lengths(), batch_size, seed=0, shuffle=False)


@torch.no_grad()
def lm_loss_sums(model: Any, tokenizer: Any, encoded: Encoded, batches: list[list[int]], numbers: list[int],
                  device: torch.device, mlm_collator: Any) -> tuple[float, int]:
    """(summed target-token cross-entropy, target tokens) over the evaluation batches numbered `numbers`: masked
    tokens of a masked LM, next tokens of a causal LM (whose targets the data holds, aligned)."""
    from kdship.data import collate

    model.eval()
    total, count = 0.0, 0
    for i in numbers:
        batch = {k: v.to(device) for k, v in collate(tokenizer, encoded, batches[i], mlm_collator, 1000 + i).items()}
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        count += int(labels.ne(-100).sum())
    return total, count


def mlm_loss(model: Any, tokenizer: Any, encoded: Encoded, batch_size: int, device: torch.device,
             mlm_collator: Any) -> float:
    """Mean masked-token cross-entropy with a fixed masking seed, so values compare across runs and models."""
    batches = lm_eval_batches(encoded, batch_size)
    total, count = lm_loss_sums(model, tokenizer, encoded, batches, list(range(len(batches))), device, mlm_collator)
    return total / max(count, 1)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size (Guo et al. 2017)."""
    confidence, predicted = probs.max(-1)
    correct = predicted.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str],
                           ece_bins: int = 15) -> dict[str, Any]:
    predicted = logits.argmax(-1)
    per_class = {}
    f1s = []
    for i, name in enumerate(label_names):
        tp = int(((predicted == i) & (labels == i)).sum())
        predicted_i, actual_i = int((predicted == i).sum()), int((labels == i).sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_i}
        if actual_i:
            f1s.append(f1)
    return {
        "accuracy": predicted.eq(labels).float().mean().item(),
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "ece": expected_calibration_error(logits.softmax(-1), labels, ece_bins),
        "per_class": per_class,
        "n": len(labels),
    }


def compare(student: dict[str, Any], teacher: dict[str, Any], student_logits: torch.Tensor,
            teacher_logits: torch.Tensor) -> dict[str, float]:
    """Retention of the headline metric (accuracy, or recall@1 for retrieval) and agreement of the top choices
    (predicted class, or retrieved right side)."""
    metric = "accuracy" if "accuracy" in student else RETRIEVAL_METRICS[0]  # the headline metric
    return {
        "retention": student[metric] / teacher[metric] if teacher[metric] else 0.0,
        "agreement": student_logits.argmax(-1).eq(teacher_logits.argmax(-1)).float().mean().item(),
    }


@under_weights_policy
def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """`kdship eval`: both models on the same split in one run; writes JSON next to the student (or cfg.output).
    Classifiers and pair-classifying bi-encoders get classification metrics; in-batch bi-encoders retrieval
    metrics (each pair's left side searches all right sides)."""
    from kdship.artifacts import atomic_write_json
    from kdship.biencoder import biencoder_settings, embed_pairs, ranking_metrics, similarities
    from kdship.data import encode_labels, load_table, tokenize
    from kdship.errors import ConfigError, ModelError
    from kdship.runtime import pick_device
    from kdship.models import (build_model, is_causal_lm, load_config, load_tokenizer, max_tokens, model_kind,
                               task_label_names)

    if not cfg.data.eval:
        raise ConfigError("no eval data; pass --data FILE (or data.eval in the recipe)")
    device = pick_device(cfg.device)
    models = {"student": cfg.student} | ({"teacher": cfg.teacher} if cfg.teacher else {})
    configs = {role: load_config(source, role) for role, source in models.items()}
    objective = "clm" if any(is_causal_lm(c) for c in configs.values()) else \
        "match" if biencoder_settings(configs["student"]) else "classify"
    if cfg.objective not in ("auto", objective):
        raise ModelError(f"--objective {cfg.objective}, but student {cfg.student} is {model_kind(configs['student'])}; "
                         "drop --objective (it is read from the models) or evaluate a model of that kind")
    if objective == "clm":
        from kdship.lm_eval import evaluate_lm

        return evaluate_lm(cfg, models, configs, device)
    names = task_label_names(objective, configs["student"])
    if names is None and objective == "classify":
        raise ModelError(f"student {cfg.student} has no classification head; train or distill it first")
    for role, source in models.items():
        # an in-batch bi-encoder's teacher may be any encoder (e.g. a sentence-transformers model): it is read with
        # mean pooling, as distillation read it; labelled models must share the student's kind and labels
        same_kind = names is None or (task_label_names(objective, configs[role]) == names and
                                      bool(biencoder_settings(configs[role])) == (objective == "match"))
        if not same_kind:
            raise ModelError(f"{role} {source} is not the same kind of model as the student (labels or towers "
                             "differ); evaluate models trained for the same task")
    tokenizer = load_tokenizer(cfg.teacher or cfg.student, "teacher" if cfg.teacher else "student")
    table = load_table(cfg.data.eval, cfg.data.text_columns, cfg.data.label_column if names else None,
                       cfg.data.max_eval_samples)
    encoded = tokenize(tokenizer, table, max_tokens(cfg.data.max_length, *configs.values()), None,
                       apart=objective == "match")
    result: dict[str, Any] = {"data": {"source": table.source, "fingerprint": table.fingerprint, "n": len(table)},
                              "label_names": names, "device": str(device)}
    labels = torch.tensor(encode_labels(table.raw_labels, names, table.source)) if names else None
    outputs = {}
    for role, source in models.items():
        # in-batch models are read by their encoder alone (a teacher's pair head, if any, is not used)
        model = build_model(objective, source, match_loss=None if names else "in_batch", keep_exits=True).to(device)
        if names:
            outputs[role] = predict_logits(model, tokenizer, encoded, cfg.batch_size, device)
            metrics = classification_metrics(outputs[role], labels, names, cfg.ece_bins) | (
                _exits(model, tokenizer, encoded, labels, cfg, device) if role == "student" else {})
        else:  # the similarity matrix: its rows' top choices give the agreement
            outputs[role] = similarities(*embed_pairs(model, tokenizer, encoded, cfg.batch_size, device))
            metrics = {**ranking_metrics(outputs[role]), "n": len(encoded.features)}
        result[role] = {"source": source, **metrics}
    if cfg.teacher:
        result["comparison"] = compare(result["student"], result["teacher"], outputs["student"], outputs["teacher"])
    if names:
        result["checks"] = _checks(result, outputs["student"].argmax(-1), labels, names)
    out = Path(cfg.output) if cfg.output else Path(cfg.student) / "eval.json"
    atomic_write_json(out, result)
    result["output"] = str(out)
    return result


def _exits(model: Any, tokenizer: Any, encoded: Encoded, labels: torch.Tensor, cfg: EvalConfig,
           device: torch.device) -> dict[str, Any]:
    """For a model with early exits: each exit's accuracy and, at each threshold, accuracy and where rows stop."""
    from kdship.early_exit import DEFAULT_THRESHOLDS, EarlyExitModel, exit_curve
    from kdship.errors import ConfigError

    if not isinstance(model, EarlyExitModel):
        if cfg.exit_thresholds:
            raise ConfigError(f"--exit-threshold: {cfg.student} has no early exits; evaluate a model made with --exits")
        return {}
    batches, order = [], []
    for indices, batch in iterate_batches(tokenizer, encoded, cfg.batch_size):
        batches.append({k: v.to(device) for k, v in model_inputs(batch).items()})
        order += indices
    thresholds = cfg.exit_thresholds or DEFAULT_THRESHOLDS[cfg.exit_criterion]
    return {"early_exit": exit_curve(model, batches, labels[torch.tensor(order)], thresholds, cfg.exit_criterion)}


def _checks(result: dict[str, Any], top: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Whether the student looks collapsed on this data, and notes on figures that need a second look (each also
    printed as a warning)."""
    from kdship.sanity import Baseline, checks_record, retention_note, top_prediction_share, warn

    metrics = {"accuracy": result["student"]["accuracy"], "top_prediction_share": top_prediction_share(top)}
    if "comparison" in result:
        metrics["agreement"] = result["comparison"]["agreement"]
    checks = checks_record(metrics, Baseline.of(labels.tolist(), names))
    warn("the student", checks["findings"])
    note = retention_note(result.get("comparison", {}).get("retention", 0.0))
    if note:
        from kdship.ui import console

        console().print(f"[yellow]note:[/] {note}")
    return {**checks, "notes": [note] if note else []}


def print_eval(result: dict[str, Any]) -> None:
    """A rich table: one column per model, then (for classifiers) the per-class table of the student."""
    from kdship.ui import console
    from rich.table import Table

    roles = [r for r in ("teacher", "student") if r in result]
    table = Table(title=f"eval on {result['data']['source']} (n={result['data']['n']})")
    table.add_column("metric")
    for role in roles:
        table.add_column(role, justify="right")
    for metric in headline_metrics(result):
        table.add_row(metric, *(f"{result[r][metric]:.4f}" for r in roles))
    for metric, value in result.get("comparison", {}).items():
        table.add_row(metric, *([""] * (len(roles) - 1)), f"{value:.4f}")
    out = console()
    out.print(table)
    if result["label_names"]:
        out.print(_per_class_table(result["student"]["per_class"]))
    if result.get("generations", {}).get("samples"):
        out.print(_generations_table(result))
    out.print(f"wrote {result['output']}")


def _generations_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    roles = [r for r in ("teacher", "student") if r in result]
    table = Table(title=f"greedy generations ({result['generations']['max_new_tokens']} new tokens at most)")
    for col in ("prompt", *roles):
        table.add_column(col, overflow="fold")
    for sample in result["generations"]["samples"]:
        table.add_row(sample["prompt"], *(sample[r] for r in roles))
    return table


def _per_class_table(per_class: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="student per class")
    for col in ("label", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for name, row in per_class.items():
        table.add_row(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    return table
