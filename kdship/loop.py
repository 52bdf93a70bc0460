"""The training loop shared by `train` and `distill`: optimizer, schedule, accumulation, periodic evaluation,
best-checkpoint keeping, resumable checkpoints, progress. What a step computes is the caller's `step_fn`."""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdship.config import RunConfig, to_record
from kdship.data import Encoded, bucket_batches, collate
from kdship.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
BEST = "best"
LOG_EVERY = 10  # steps between loss read-outs in the progress line
# Flags that say how to start a run, not what the run is: they may differ between a run and its resume.
START_FLAGS = ("resume", "overwrite")


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (auto or bf16), plain fp32 on CPU (auto) unless bf16 is asked for."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_dir_for(output: Path) -> Path:
    """Where an unfinished run keeps its checkpoint and best weights; removed once the output is in place."""
    return output.parent / f".{output.name}.kdship-run"


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0
    best: dict[str, dict[str, float]] = field(default_factory=dict)  # member -> {"metric": value, "step": step}
    history: list[dict[str, Any]] = field(default_factory=list)
    samples_seen: int = 0
    train_seconds: float = 0.0


@dataclass
class Member:
    """One model the loop trains and keeps the best of (one per student in multi-student distillation)."""

    name: str
    module: nn.Module  # everything of this member that trains: the model, and its projections
    save: Callable[[Path], None]  # writes the model worth keeping into a folder
    metric: str = ""  # key of evaluate()'s result that decides "best"; "" keeps the last weights
    higher_is_better: bool = True


@dataclass
class Objective:
    """What the loop optimises and how it judges progress."""

    # (batch, optimizer step, progress in [0, 1], example indices) -> (loss, logs)
    step_fn: Callable[[dict[str, Any], int, float, list[int]], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[], dict[str, float]] | None  # None without eval data: the last weights are kept
    members: list[Member]
    # state that is not trained but must survive a resume (e.g. sample-selection scores), checkpointed with it
    memory: dict[str, nn.Module] = field(default_factory=dict)
    # how many of a batch's samples get the step (fewer under sample selection): what samples_seen counts
    trained_of: Callable[[int], int] | None = None

    def trainable(self) -> nn.ModuleDict:
        return nn.ModuleDict({m.name: m.module for m in self.members} | {f"memory_{k}": v for k, v in
                                                                           self.memory.items()})


def _optimizer(cfg: RunConfig, members: list[Member]) -> torch.optim.Optimizer:
    """AdamW with decay / no-decay groups per member. Adam's state is per parameter, so this equals one optimizer
    per member with the same schedule; gradients are clipped per member in the loop."""
    groups = []
    for member in members:
        decay, no_decay = [], []
        for name, p in member.module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups += [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=False)


def _scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def total_steps_for(cfg: RunConfig, n_examples: int) -> tuple[int, int]:
    groups_per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    return (cfg.max_steps or max(1, math.ceil(cfg.epochs * groups_per_epoch))), groups_per_epoch


class Checkpointer:
    """One file, written atomically, holding everything a resumed run needs to continue exactly."""

    def __init__(self, run_dir: Path, cfg: RunConfig, data_identity: Any = None):
        self.path = run_dir / CHECKPOINT
        self.fingerprint = {k: v for k, v in to_record(cfg).items() if k not in START_FLAGS}
        self.fingerprint["data_identity"] = data_identity  # a changed data file must not resume old positions

    def save(self, trainable: nn.Module, optimizer: Any, scheduler: Any, state: LoopState) -> None:
        payload = {"config": self.fingerprint, "model": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "state": asdict(state), "rng": _rng_state()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def load(self, trainable: nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        payload = torch.load(self.path, map_location="cpu", weights_only=False)
        changed = [k for k in self.fingerprint if payload["config"].get(k) != self.fingerprint[k]]
        if changed:
            raise ConfigError(f"checkpoint {self.path} was made with a different {changed[0]!r}; resume with the "
                              "same settings, or pass --overwrite to start again")
        trainable.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        _set_rng_state(payload["rng"])
        return LoopState(**payload["state"])


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def run_dir_for_output(output: Path, cfg: RunConfig):
    """Yield the run folder of `output`; if the run fails before its first checkpoint, remove the folder (there is
    nothing to resume), so a bad input leaves nothing behind."""
    run_dir = prepare_run_dir(output, cfg)
    try:
        yield run_dir
    except BaseException:
        if not (run_dir / CHECKPOINT).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def prepare_run_dir(output: Path, cfg: RunConfig) -> Path:
    """Refuse to clobber a finished output or silently restart an interrupted run."""
    run_dir = run_dir_for(output)
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"output {output} already exists; pass --overwrite or choose another --output")
    if (run_dir / CHECKPOINT).exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"an interrupted run of {output} exists; pass --resume to continue it or --overwrite "
                          "to start again")
    if run_dir.exists() and not (cfg.resume and (run_dir / CHECKPOINT).exists()):
        shutil.rmtree(run_dir)  # a dead run's leftovers (tokenizer, best weights) must not leak into a new run
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _is_better(value: float, best: float | None, higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


def best_dir(run_dir: Path, member: str) -> Path:
    return run_dir / BEST / member


def _save_best(member: Member, run_dir: Path) -> None:
    final = best_dir(run_dir, member.name)
    tmp = final.with_name(f"{member.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    member.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def fit(cfg: RunConfig, objective: Objective, train: Encoded, tokenizer: Any, run_dir: Path,
        mlm_collator: Any = None, progress_label: str = "train", data_identity: Any = None) -> LoopState:
    """Run the loop to cfg's step budget, resuming from run_dir's checkpoint when cfg.resume is set."""
    total, groups_per_epoch = total_steps_for(cfg, len(train.features))
    trainable = objective.trainable()
    optimizer = _optimizer(cfg, objective.members)
    scheduler = _scheduler(cfg, optimizer, total)
    checkpointer = Checkpointer(run_dir, cfg, data_identity)
    state = LoopState()
    if cfg.resume and checkpointer.path.exists():
        state = checkpointer.load(trainable, optimizer, scheduler)
    eval_every = cfg.eval_every or groups_per_epoch
    lengths = train.lengths()
    with _progress(progress_label, total, state.step) as bar:
        while state.step < total:
            batches = bucket_batches(lengths, cfg.batch_size, seed=cfg.seed * 1000 + state.epoch, shuffle=True)
            groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
            for gi in range(state.group_in_epoch, len(groups)):
                started = time.perf_counter()
                trainable.train()
                logs: dict[str, float] = {}
                for bi, indices in enumerate(groups[gi]):
                    mask_seed = hash((cfg.seed, state.epoch, gi, bi)) & 0x7FFFFFFF
                    batch = collate(tokenizer, train, indices, mlm_collator, mask_seed)
                    loss, logs = objective.step_fn(batch, state.step, state.step / total, indices)
                    (loss / len(groups[gi])).backward()
                    state.samples_seen += objective.trained_of(len(indices)) if objective.trained_of else len(indices)
                for member in objective.members:
                    torch.nn.utils.clip_grad_norm_(member.module.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.group_in_epoch = gi + 1
                state.train_seconds += time.perf_counter() - started
                bar(state, logs)
                if objective.evaluate and (state.step % eval_every == 0 or state.step == total):
                    _evaluate(objective, state, run_dir)
                if state.step % cfg.save_every == 0 and state.step < total:
                    checkpointer.save(trainable, optimizer, scheduler, state)
                if state.step >= total:
                    break
            else:
                state.epoch += 1
                state.group_in_epoch = 0
    return state


def _evaluate(objective: Objective, state: LoopState, run_dir: Path) -> None:
    metrics = objective.evaluate()
    state.history.append({"step": state.step, "epoch": state.epoch, **metrics})
    for member in objective.members:
        if not member.metric:
            continue
        value = metrics[member.metric]
        best = state.best.get(member.name)
        if _is_better(value, best and best["metric"], member.higher_is_better):
            state.best[member.name] = {"metric": value, "step": state.step}
            _save_best(member, run_dir)


@contextlib.contextmanager
def _progress(label: str, total: int, start: int):
    """A rich progress bar with loss and throughput; yields update(state, logs)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(label, total=total, completed=start, info="")

        def update(state: LoopState, logs: dict[str, Any]) -> None:
            if state.step % LOG_EVERY and state.step != total:
                progress.update(task, completed=state.step)  # formatting the losses would sync the GPU
                return
            rate = state.samples_seen / state.train_seconds if state.train_seconds else 0.0
            info = " ".join(f"{k}={v:.4f}" for k, v in logs.items()) + f" {rate:.0f} samples/s"
            if state.history:
                last = state.history[-1]
                info += " | eval " + " ".join(f"{k}={v:.4f}" for k, v in last.items() if k not in ("step", "epoch"))
            progress.update(task, completed=state.step, info=info)

        yield update
