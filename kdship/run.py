"""What every training run shares, `kdship train` and `kdship distill` alike: starting the run (processes, seed,
run folder), its data, evaluating a trained model, and writing the finished output folder with its record."""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from kdship.artifacts import staged_dir, with_relative_sources, write_record
from kdship.biencoder import embed_pairs, retrieval_metrics
from kdship.config import DataConfig, RunConfig
from kdship.data import (IGNORED, Encoded, LmTable, TextTable, encode_labels, label_names_from_data, load_lm_table, load_table,
                         tokenize, tokenize_lm)
from kdship.errors import ConfigError, ModelError
from kdship.evaluate import lm_eval_batches, lm_loss_sums, predict_logits
from kdship.models import lm_max_length
from kdship.loop import LoopState, best_dir, run_dir_for_output
from kdship.runtime import Runtime, seed_everything, start_runtime
from kdship.sanity import Baseline, checks_record, findings, top_prediction_share, warn
from kdship.tokenizer import max_positions_of, save_tokenizer
from kdship.trainee import Trainee


@contextlib.contextmanager
def training_run(cfg: RunConfig) -> Iterator[tuple[Runtime, Path]]:
    """(runtime, run folder) of a run writing cfg.output; the run folder is removed once the output is written."""
    if not cfg.output:
        raise ConfigError("no output folder; pass --output DIR")
    if not cfg.data.train:
        raise ConfigError("no training data; pass --data FILE (or data.train in the recipe)")
    runtime = start_runtime(cfg.device, cfg.precision)
    if cfg.sharding == "fsdp" and runtime.world == 1:
        raise ConfigError("sharding fsdp shards a model across processes, but this run has one; launch it with "
                          "torchrun --nproc-per-node N (or accelerate launch), or use sharding ddp")
    seed_everything(cfg.seed)
    with run_dir_for_output(Path(cfg.output), cfg, runtime) as run_dir:
        yield runtime, run_dir
    if runtime.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    runtime.barrier()


@dataclass
class RunData:
    train: Encoded
    eval: Encoded | None
    train_table: TextTable | LmTable
    eval_table: TextTable | LmTable | None
    label_names: list[str] | None
    max_length: int

    @property
    def baseline(self) -> Baseline | None:
        """What a classifier that learned nothing scores on the eval set (None without labelled eval data)."""
        if self.eval is None or self.eval.labels is None or not self.label_names:
            return None
        return Baseline.of(list(self.eval.labels), self.label_names)

    def record(self) -> dict[str, Any]:
        tables = {"train": (self.train_table, self.train), "eval": (self.eval_table, self.eval)}
        record = {name: {"source": t.source, "fingerprint": t.fingerprint, "n": len(t), **_labels_read(t),
                         **_lm_shape(t, encoded)}
                  for name, (t, encoded) in tables.items() if t}
        return {**record, "max_length": self.max_length}


def _labels_read(table: TextTable | LmTable) -> dict[str, bool]:
    """Whether a text table's labels were read: a transfer-set run trains on the teacher's predictions alone, even
    where its training table has a label column."""
    return {"labels_read": table.raw_labels is not None} if isinstance(table, TextTable) else {}


def _lm_shape(table: TextTable | LmTable, encoded: Encoded) -> dict[str, Any]:
    """For causal-LM data: its kind, the sequences it became, the target tokens, and examples dropped as too long."""
    if not isinstance(table, LmTable):
        return {}
    targets = sum(sum(label != IGNORED for label in f["labels"]) for f in encoded.features)
    return {"kind": table.kind, "sequences": len(encoded.features), "target_tokens": targets,
            "dropped_too_long": encoded.dropped}


def load_run_data(cfg: RunConfig, tokenizer: Any, label_names: list[str] | None, max_length: int) -> RunData:
    """Train (and eval) examples tokenized with `tokenizer` (at most `max_length` tokens, see models.max_tokens);
    labels checked against the model's label names."""
    if cfg.objective == "clm":
        return load_lm_data(cfg.data, tokenizer, max_length)
    labelled = cfg.labelled
    label_col = cfg.data.label_column if labelled else None
    train_table = load_table(cfg.data.train, cfg.data.text_columns, label_col if cfg.train_labelled else None,
                             cfg.data.max_train_samples)
    eval_table = (load_table(cfg.data.eval, cfg.data.text_columns, label_col, cfg.data.max_eval_samples)
                  if cfg.data.eval else None)
    if labelled:
        labelled_table = train_table if cfg.train_labelled else eval_table  # a transfer set: the teacher's labels
        data_names = label_names_from_data(labelled_table.raw_labels) if labelled_table else []
        if label_names is not None and len(data_names) > len(label_names):
            raise ModelError(f"the model has {len(label_names)} labels but {labelled_table.source} has "
                             f"{len(data_names)}; use a model trained on the same labels (to distil from a teacher of "
                             "another task: kdship distill --cross-task)")
        label_names = label_names or data_names
    encode = lambda t: tokenize(tokenizer, t, max_length,  # noqa: E731
                                encode_labels(t.raw_labels, label_names, t.source) if t.raw_labels is not None
                                else None, apart=cfg.objective == "match")
    return RunData(encode(train_table), encode(eval_table) if eval_table else None, train_table, eval_table,
                   label_names if labelled else None, max_length)


def load_lm_data(data: DataConfig, tokenizer: Any, max_length: int) -> RunData:
    """Causal-LM train (and eval) data: packed text, prompt/response or chat (kdship.data.tokenize_lm)."""
    max_length = lm_max_length(data, max_length)
    train_table = load_lm_table(data.train, data.text_columns, data.max_train_samples)
    eval_table = load_lm_table(data.eval, data.text_columns, data.max_eval_samples) if data.eval else None
    return RunData(tokenize_lm(tokenizer, train_table, max_length),
                   tokenize_lm(tokenizer, eval_table, max_length) if eval_table else None, train_table, eval_table,
                   None, max_length)


def mlm_collator_for(cfg: RunConfig, tokenizer: Any) -> Any:
    if cfg.objective != "mlm":
        return None
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise ModelError("the tokenizer has no [MASK] token, so it cannot do masked-LM; use --objective classify")
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability, seed=0)


def my_share(n: int, runtime: Runtime) -> tuple[list[int], int]:
    """This process's equal share of n items (0..n-1), and how many repeats of the last item pad it to the size of
    the others: every process runs as many batches, which a sharded model needs (its forward calls gather
    weights together). Padding is computed but not counted."""
    per = math.ceil(n / runtime.world)
    start = runtime.rank * per
    mine = list(range(start, min(start + per, n)))
    return mine, per - len(mine)


def _padded_share(encoded: Encoded, runtime: Runtime) -> Encoded:
    mine, padding = my_share(len(encoded.features), runtime)
    return Encoded([encoded.features[i] for i in mine + [len(encoded.features) - 1] * padding], None)


def predict_everywhere(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int,
                       runtime: Runtime) -> torch.Tensor:
    """Logits for every example, on this process's device. Each process predicts an equal share, then the shares
    are gathered: a pass over the data costs 1/N of it per process."""
    logits = predict_logits(model, tokenizer, _padded_share(encoded, runtime), batch_size, runtime.device,
                            runtime.autocast)
    return runtime.accelerator.gather(logits.to(runtime.device))[:len(encoded.features)]


def embed_everywhere(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int,
                     runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' embeddings of every pair, each process embedding an equal share (on the CPU, on every process)."""
    left, right = embed_pairs(model, tokenizer, _padded_share(encoded, runtime), batch_size, runtime.device,
                              runtime.autocast)
    both = runtime.accelerator.gather(torch.stack([left, right], 1).to(runtime.device))[:len(encoded.features)].cpu()
    return both[:, 0], both[:, 1]


def lm_loss_everywhere(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int, runtime: Runtime,
                        mlm_collator: Any) -> float:
    """The mean target-token cross-entropy of a masked LM (with `mlm_collator`'s masking) or a causal LM (targets
    in the data), each process taking an equal share of the fixed evaluation batches: the same batches and masks
    as one process would use, so the value does not depend on how many processes ran."""
    batches = lm_eval_batches(encoded, batch_size)
    mine, padding = my_share(len(batches), runtime)
    total, count = lm_loss_sums(model, tokenizer, encoded, batches, mine, runtime.device, mlm_collator)
    if padding:  # run as the others do (a sharded model needs every process's forward calls), not counted
        lm_loss_sums(model, tokenizer, encoded, batches, [len(batches) - 1] * padding, runtime.device, mlm_collator)
    return runtime.total(total) / max(runtime.total(count), 1)


def lm_metrics(loss: float) -> dict[str, float]:
    """A causal LM's mean next-token cross-entropy on the eval data and its perplexity."""
    return {"lm_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@dataclass
class Evaluation:
    """How a run judges one trained model: `run()` gives its metrics; `metric` of them decides the best step."""

    run: Callable[[], dict[str, float]] | None  # None without eval data (or for feature matching): keep the last
    metric: str = ""
    higher_is_better: bool = True


def evaluation_for(cfg: RunConfig, model: nn.Module, tokenizer: Any, data: RunData, runtime: Runtime,
                   mlm_collator: Any) -> Evaluation:
    """The evaluation of the run's objective: accuracy, masked-LM loss, or retrieval recall@1."""
    if data.eval is None or cfg.objective == "features":
        return Evaluation(None)
    batch = cfg.eval_batch_size
    if cfg.objective == "mlm":
        return Evaluation(lambda: {"mlm_loss": lm_loss_everywhere(model, tokenizer, data.eval, batch, runtime,
                                                                   mlm_collator)}, "mlm_loss", higher_is_better=False)
    if cfg.objective == "clm":
        return Evaluation(lambda: lm_metrics(lm_loss_everywhere(model, tokenizer, data.eval, batch, runtime, None)),
                          "lm_loss", higher_is_better=False)
    if not cfg.labelled:  # in-batch matching: each eval pair's left side retrieves among all right sides
        return Evaluation(lambda: retrieval_metrics(*embed_everywhere(model, tokenizer, data.eval, batch, runtime)),
                          "recall_at_1")
    labels = torch.tensor(data.eval.labels)

    def accuracy() -> dict[str, float]:
        top = predict_everywhere(model, tokenizer, data.eval, batch, runtime).argmax(-1).cpu()
        metrics = label_metrics(top, labels)
        warn("the model", findings(metrics, data.baseline))
        return metrics

    return Evaluation(accuracy, "accuracy")


def label_metrics(top: torch.Tensor, labels: torch.Tensor, teacher_top: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy of top choices, their agreement with the teacher's, and the share of the most predicted class (1.0:
    one answer for everything)."""
    metrics = {"accuracy": top.eq(labels).float().mean().item()}
    if teacher_top is not None:
        metrics["agreement"] = top.eq(teacher_top).float().mean().item()
    return metrics | {"top_prediction_share": top_prediction_share(top)}


def trainee_metrics(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """One trainee's metrics from a history entry (multi-student entries are keyed 'name/metric')."""
    return {k.removeprefix(prefix): v for k, v in entry.items() if k in ("step", "epoch") or k.startswith(prefix)}


def training_summary(state: LoopState, trainee: Trainee, runtime: Runtime, batch_size: int,
                     grad_accum: int) -> dict[str, Any]:
    """Steps, samples and throughput, the batch per device (the samples that get the step) and over all
    processes and accumulated micro-batches, and the first and last losses."""
    best = state.best.get(trainee.name, {})
    return {"steps": state.step, "best_step": best.get("step"), "samples_seen": state.samples_seen,
            "train_seconds": round(state.train_seconds, 3),
            "samples_per_second": round(state.samples_seen / max(state.train_seconds, 1e-9), 2),
            "processes": runtime.world, "per_device_batch": batch_size,
            "global_batch": batch_size * runtime.world * grad_accum, **trainee.trace.summary(runtime)}


def final_weights(run_dir: Path, state: LoopState, trainee: Trainee, runtime: Runtime) -> Path:
    """The folder of the weights to ship: the best evaluated, or without evaluation the last (saved now: every
    process calls this, as a sharded model is gathered)."""
    best = best_dir(run_dir, trainee.name)
    if best.exists():
        return best
    last = run_dir / "last" / trainee.name
    trainee.save(last, runtime)
    runtime.barrier()
    return last


def output_record(state: LoopState, trainee: Trainee, record: dict[str, Any],
                  baseline: Baseline | None = None) -> dict[str, Any]:
    """The record with the trainee's metrics at its best step, its evaluation history, and whether those metrics
    look collapsed (against `baseline`, the eval set's majority class)."""
    best_step = state.best.get(trainee.name, {}).get("step")
    metrics = next((trainee_metrics(h, trainee.prefix) for h in state.history if h["step"] == best_step), {})
    checks = checks_record(metrics, baseline)
    return {**record, "metrics": metrics, "history": [trainee_metrics(h, trainee.prefix) for h in state.history],
            **({"checks": checks} if checks else {})}


def write_model_folder(folder: Path, weights: Path, tokenizer: Any, record: dict[str, Any]) -> None:
    """Weights, tokenizer and kdship.json into `folder` (a staged folder: rank 0 only)."""
    shutil.copytree(weights, folder, dirs_exist_ok=True)
    save_tokenizer(tokenizer, folder, max_positions_of(folder))
    write_record(folder, record)


def write_output(output: Path, run_dir: Path, state: LoopState, trainee: Trainee, tokenizer: Any,
                 record: dict[str, Any], overwrite: bool, runtime: Runtime,
                 baseline: Baseline | None = None) -> dict[str, Any]:
    """One model's output folder, written atomically by rank 0."""
    weights = final_weights(run_dir, state, trainee, runtime)
    record = with_relative_sources(output_record(state, trainee, record, baseline), output)
    if runtime.is_main:
        with staged_dir(output, overwrite=overwrite) as tmp:
            write_model_folder(tmp, weights, tokenizer, record)
    runtime.barrier()
    return {"output": str(output), **record}
