"""The training loop shared by `train` and `distill`: optimizer, schedule, accumulation, periodic evaluation,
best-checkpoint keeping, resumable checkpoints, progress, over one process or several. What a step computes is the
caller's `step` (which techniques may have wrapped)."""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from kdship.config import RunConfig, to_record
from kdship.data import Encoded, bucket_batches, collate
from kdship.errors import ConfigError
from kdship.runtime import Runtime, full_state_dict, load_full_state_dict, unwrapped
from kdship.tracking import logging_dir_for, tracked
from kdship.trainee import Forward, Trainee

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "kdship-checkpoint/2"
BEST = "best"
LOG_EVERY = 10  # steps between loss read-outs in the progress line
PLAIN_EVERY_SECONDS = 30.0  # between progress lines when stdout is not a terminal (logs, CI)
# Flags that say how to start a run, not what the run is: they may differ between a run and its resume.
START_FLAGS = ("resume", "overwrite", "allow_pickle_weights")


@dataclass
class StepInput:
    """One micro-batch as a step sees it. Techniques may narrow it (`rows`) or ask the trained model for more
    outputs (`asking`) before handing it on."""

    tensors: dict[str, Tensor]  # on the device
    indices: list[int]  # the examples' positions in the training data
    step: int  # optimizer step, 0-based
    progress: float  # step / total steps
    outputs: frozenset[str] = frozenset()  # extra outputs of the trained model's forward (hidden_states, heads)

    def asking(self, *outputs: str) -> "StepInput":
        return replace(self, outputs=self.outputs | set(outputs))

    def rows(self, rows: Tensor) -> "StepInput":
        rows = rows.to(self.tensors["input_ids"].device)
        return replace(self, tensors={k: v[rows] for k, v in self.tensors.items()},
                       indices=[self.indices[r] for r in rows.tolist()])


@dataclass
class StepResult:
    loss: Tensor
    logs: dict[str, Any]  # detached tensors or floats: read only when the progress line shows them
    samples: int  # how many samples got the step
    forwards: dict[str, Forward] = field(default_factory=dict)  # each trained model's forward, for techniques

    def with_loss(self, loss: Tensor, logs: dict[str, Any]) -> "StepResult":
        return replace(self, loss=loss, logs=self.logs | logs)

    def logging(self, logs: dict[str, Any]) -> "StepResult":
        return replace(self, logs=self.logs | logs)


Step = Callable[[StepInput], StepResult]


@dataclass
class TrainingPlan:
    """What the loop trains, how one step computes its loss, and how progress is judged."""

    step: Step
    evaluate: Callable[[], dict[str, float]] | None  # None without eval data: the last weights are kept
    trainees: list[Trainee]
    # state that is not trained but must survive a resume (e.g. sample-selection scores), per process
    memory: dict[str, nn.Module] = field(default_factory=dict)
    draw_size: int | None = None  # examples each process draws per micro-batch; None: the batch size
    batches: Callable[[int], list[list[int]]] | None = None  # epoch -> its global batches; None: shuffled buckets


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0
    best: dict[str, dict[str, float]] = field(default_factory=dict)  # trainee -> {"metric": value, "step": step}
    history: list[dict[str, Any]] = field(default_factory=list)
    samples_seen: int = 0  # over all processes
    train_seconds: float = 0.0


def run_dir_for(output: Path) -> Path:
    """Where an unfinished run keeps its checkpoint and best weights; removed once the output is in place."""
    return output.parent / f".{output.name}.kdship-run"


def _optimizer(cfg: RunConfig, trainees: list[Trainee]) -> torch.optim.Optimizer:
    """AdamW with decay / no-decay groups per trainee. Adam's state is per parameter, so this equals one optimizer
    per trainee with the same schedule; gradients are clipped per trainee in the loop."""
    groups = []
    for trainee in trainees:
        decay, no_decay = [], []
        for name, p in trainee.module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        lr = trainee.lr or cfg.lr
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], fused=False)


def _scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def total_steps_for(cfg: RunConfig, n_examples: int, world: int = 1, draw_size: int | None = None) -> tuple[int, int]:
    """(optimizer steps of the run, steps per epoch). Each process draws `draw_size` examples per micro-batch
    (default batch_size; more when a technique keeps only some of them), so a step draws draw_size x processes x
    grad_accum examples."""
    draw_size = draw_size or cfg.batch_size
    groups_per_epoch = math.ceil(math.ceil(n_examples / (draw_size * world)) / cfg.grad_accum)
    return (cfg.max_steps or max(1, math.ceil(cfg.epochs * groups_per_epoch))), groups_per_epoch


def global_batches(lengths: list[int], cfg: RunConfig, world: int, epoch: int, draw_size: int) -> list[list[int]]:
    """One epoch's global batches (draw_size x processes examples, the same on every process). A last batch with
    fewer examples than processes is dropped: every process needs at least one."""
    batches = bucket_batches(lengths, draw_size * world, seed=cfg.seed * 1000 + epoch, shuffle=True)
    return [b for b in batches if len(b) >= world]


class Checkpointer:
    """One file, written atomically by rank 0, holding everything a resumed run needs to continue exactly: the
    trained weights, optimizer, schedule and loop state, and each process's random state and technique memory.
    It holds tensors and plain data only, and loads with weights_only=True (a planted pickle runs no code)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, runtime: Runtime, data_identity: Any = None):
        self.path = run_dir / CHECKPOINT
        self.runtime = runtime
        self.fingerprint = {k: v for k, v in to_record(cfg).items() if k not in START_FLAGS}
        self.fingerprint["data_identity"] = data_identity  # a changed data file must not resume old positions

    def save(self, plan: TrainingPlan, optimizer: Any, scheduler: Any, state: LoopState) -> None:
        trainees = {t.name: full_state_dict(t.module) for t in plan.trainees}  # gathers FSDP shards: all call it
        optim = _optimizer_state(plan, optimizer)
        mine = {"rng": _rng_state(), "memory": {k: v.state_dict() for k, v in plan.memory.items()},
                "trainees": {t.name: t.progress_state() for t in plan.trainees}}
        per_process = self.runtime.gather_objects(mine)
        if self.runtime.is_main:
            payload = {"format": CHECKPOINT_FORMAT, "config": self.fingerprint, "processes": self.runtime.world,
                       "trainees": trainees, "optimizer": optim, "scheduler": scheduler.state_dict(),
                       "state": asdict(state), "per_process": per_process}
            tmp = self.path.with_suffix(".tmp")
            torch.save(payload, tmp)
            os.replace(tmp, self.path)
        self.runtime.barrier()

    def load(self, plan: TrainingPlan, optimizer: Any, scheduler: Any) -> LoopState:
        payload = self._read()
        try:
            return self._restore(payload, plan, optimizer, scheduler)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # parts that do not fit this run
            raise ConfigError(f"{self.path} does not fit this run ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else 'malformed'}); pass "
                              "--overwrite to start again") from None

    def _restore(self, payload: dict[str, Any], plan: TrainingPlan, optimizer: Any, scheduler: Any) -> LoopState:
        changed = [k for k in self.fingerprint if payload["config"].get(k) != self.fingerprint[k]]
        if changed:
            raise ConfigError(f"checkpoint {self.path} was made with a different {changed[0]!r}; resume with the "
                              "same settings, or pass --overwrite to start again")
        if payload["processes"] != self.runtime.world:
            raise ConfigError(f"checkpoint {self.path} was made by {payload['processes']} processes, this run has "
                              f"{self.runtime.world}; resume with the same number of processes")
        for t in plan.trainees:
            load_full_state_dict(t.module, payload["trainees"][t.name])
        _load_optimizer_state(plan, optimizer, payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        mine = payload["per_process"][self.runtime.rank]
        for name, module in plan.memory.items():
            module.load_state_dict(mine["memory"][name])
        for t in plan.trainees:
            t.load_progress_state(mine["trainees"][t.name])
        _set_rng_state(mine["rng"])
        return LoopState(**payload["state"])

    def _read(self) -> dict[str, Any]:
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # anything the unpickler raises: refused pickles, foreign or damaged files
            reason = "it holds objects other than tensors and plain data" if "weights_only" in str(e) else (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" if str(e).strip() else type(e).__name__)
            raise ConfigError(f"{self.path} is not a kdship checkpoint that can be loaded safely ({reason}); "
                              "pass --overwrite to start again") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{self.path} is not a checkpoint of this kdship version; pass --overwrite to start "
                              "again")
        shape = {"config": dict, "processes": int, "trainees": dict, "optimizer": dict, "scheduler": dict,
                 "state": dict, "per_process": list}
        wrong = next((key for key, kind in shape.items() if not isinstance(payload.get(key), kind)), None)
        if wrong is not None:
            raise ConfigError(f"{self.path} is damaged (its {wrong!r} entry is missing or malformed); pass "
                              "--overwrite to start again")
        return payload


def _trained(plan: TrainingPlan) -> nn.ModuleDict:
    return nn.ModuleDict({t.name: unwrapped(t.module) for t in plan.trainees})


def _optimizer_state(plan: TrainingPlan, optimizer: Any) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, whole (FSDP shards gathered): all processes call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(_trained(plan), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(plan: TrainingPlan, optimizer: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient (a pooler no loss reads) has no Adam state to restore
    set_optimizer_state_dict(_trained(plan), optimizer, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def _rng_state() -> dict[str, Any]:
    """Random state as tensors and plain numbers (loadable with weights_only=True)."""
    numpy = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": numpy["state"]["pos"],
                       "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def run_dir_for_output(output: Path, cfg: RunConfig, runtime: Runtime):
    """Yield the run folder of `output`; if the run fails before its first checkpoint, remove the folder (there is
    nothing to resume), so a bad input leaves nothing behind."""
    run_dir = prepare_run_dir(output, cfg, runtime)
    try:
        yield run_dir
    except BaseException:
        if runtime.is_main and not (run_dir / CHECKPOINT).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def prepare_run_dir(output: Path, cfg: RunConfig, runtime: Runtime) -> Path:
    """Refuse to clobber a finished output or silently restart an interrupted run. Every process checks (so
    every process stops on a refusal), rank 0 alone clears and creates."""
    run_dir = run_dir_for(output)
    if output.exists() and not cfg.overwrite:
        raise ConfigError(f"output {output} already exists; pass --overwrite or choose another --output")
    if (run_dir / CHECKPOINT).exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"an interrupted run of {output} exists; pass --resume to continue it or --overwrite "
                          "to start again")
    runtime.barrier()
    if runtime.is_main:
        if run_dir.exists() and not (cfg.resume and (run_dir / CHECKPOINT).exists()):
            shutil.rmtree(run_dir)  # a dead run's leftovers (tokenizer, best weights) must not leak into a new run
        run_dir.mkdir(parents=True, exist_ok=True)
    runtime.barrier()
    return run_dir


def _is_better(value: float, best: float | None, higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


def best_dir(run_dir: Path, trainee: str) -> Path:
    return run_dir / BEST / trainee


def _save_best(trainee: Trainee, run_dir: Path, runtime: Runtime) -> None:
    final = best_dir(run_dir, trainee.name)
    tmp = final.with_name(f"{trainee.name}.tmp")
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainee.save(tmp, runtime)
    if runtime.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    runtime.barrier()


def fit(cfg: RunConfig, plan: TrainingPlan, train: Encoded, tokenizer: Any, run_dir: Path, runtime: Runtime,
        mlm_collator: Any = None, progress_label: str = "train", data_identity: Any = None) -> LoopState:
    """Run the loop to cfg's step budget, resuming from run_dir's checkpoint when cfg.resume is set."""
    if len(train.features) < runtime.world:
        raise ConfigError(f"{len(train.features)} training examples cannot be shared by {runtime.world} processes; "
                          "give more data or launch fewer processes")
    draw_size = plan.draw_size or cfg.batch_size
    total, groups_per_epoch = total_steps_for(cfg, len(train.features), runtime.world, draw_size)
    optimizer = _optimizer(cfg, plan.trainees)
    scheduler = _scheduler(cfg, optimizer, total)
    checkpointer = Checkpointer(run_dir, cfg, runtime, data_identity)
    state = LoopState()
    if cfg.resume and checkpointer.path.exists():
        state = checkpointer.load(plan, optimizer, scheduler)
    eval_every = cfg.eval_every or groups_per_epoch
    lengths = train.lengths()
    pending_samples = 0  # this process's samples since the last count over all processes
    output = Path(cfg.output or run_dir.name)
    trackers = tracked(cfg.report_to, output.name, logging_dir_for(output, cfg.logging_dir), to_record(cfg),
                       runtime.is_main)
    with _progress(progress_label, total, state.step, runtime.is_main) as bar, trackers as track:
        while state.step < total:
            batches = (plan.batches(state.epoch) if plan.batches else
                       global_batches(lengths, cfg, runtime.world, state.epoch, draw_size))
            groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
            for gi in range(state.group_in_epoch, len(groups)):
                started = time.perf_counter()
                micro = _micro_batches(cfg, groups[gi], state.epoch, gi, train, tokenizer, mlm_collator, runtime)
                logs, samples = _optimizer_step(cfg, plan, micro, len(groups[gi]), state.step, total, runtime,
                                                optimizer, scheduler)
                pending_samples += samples
                state.step += 1
                state.group_in_epoch = gi + 1
                state.train_seconds += time.perf_counter() - started
                due_eval = plan.evaluate and (state.step % eval_every == 0 or state.step == total)
                due_save = state.step % cfg.save_every == 0 and state.step < total
                if state.step % LOG_EVERY == 0 or state.step == total or due_eval or due_save:
                    state.samples_seen += int(runtime.total(pending_samples))
                    pending_samples = 0
                if due_eval:
                    _evaluate(plan, state, run_dir, runtime)
                    track(state.step, {f"eval/{k}": v for k, v in state.history[-1].items() if k not in ("step", "epoch")})
                if cfg.report_to and (state.step % LOG_EVERY == 0 or state.step == total):
                    track(state.step, {**{f"train/{k}": float(v) for k, v in logs.items()},
                                       "train/lr": scheduler.get_last_lr()[0]})
                bar(state, logs)  # after the evaluation, so the line of an evaluation's step shows it
                if due_save:
                    checkpointer.save(plan, optimizer, scheduler, state)
                if state.step >= total:
                    break
            else:
                state.epoch += 1
                state.group_in_epoch = 0
    return state


def _micro_batches(cfg: RunConfig, group: list[list[int]], epoch: int, gi: int, train: Encoded, tokenizer: Any,
                   mlm_collator: Any, runtime: Runtime) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """This process's share of each global micro-batch of a step, collated on its device."""
    for bi, global_batch in enumerate(group):
        indices = runtime.shard_of(global_batch)
        # masking seeded per batch and process: it does not depend on history, so a resume repeats it
        mask_seed = (hash((cfg.seed, epoch, gi, bi)) + runtime.rank) & 0x7FFFFFFF
        batch = collate(tokenizer, train, indices, mlm_collator, mask_seed)
        yield indices, {k: v.to(runtime.device) for k, v in batch.items()}


def _optimizer_step(cfg: RunConfig, plan: TrainingPlan, micro_batches: Iterator, count: int, step: int,
                    total: int, runtime: Runtime, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], int]:
    """One optimizer step over `count` micro-batches; gradients are all-reduced on the last one only. Returns the
    last micro-batch's logs and this process's trained samples."""
    modules = [t.module for t in plan.trainees]
    for m in modules:
        m.train()
    logs: dict[str, Any] = {}
    samples = 0
    for bi, (indices, tensors) in enumerate(micro_batches):
        with runtime.no_sync(modules, skip=bi < count - 1):
            with runtime.autocast():
                result = plan.step(StepInput(tensors, indices, step, step / total))
            runtime.backward(result.loss / count)
        logs, samples = result.logs, samples + result.samples
    for m in modules:
        torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logs, samples


def _evaluate(plan: TrainingPlan, state: LoopState, run_dir: Path, runtime: Runtime) -> None:
    """Every process evaluates (a sharded model needs them all); rank 0's metrics decide for all, so every process
    keeps the same best step."""
    metrics = runtime.from_main(plan.evaluate())
    state.history.append({"step": state.step, "epoch": state.epoch, **metrics})
    for trainee in plan.trainees:
        if not trainee.metric:
            continue
        value = metrics[trainee.metric]
        best = state.best.get(trainee.name)
        if _is_better(value, best and best["metric"], trainee.higher_is_better):
            state.best[trainee.name] = {"metric": value, "step": state.step}
            _save_best(trainee, run_dir, runtime)


@contextlib.contextmanager
def _progress(label: str, total: int, start: int, shown: bool):
    """Progress with loss and throughput (rank 0 only); yields update(state, logs). In a terminal a rich bar; in a
    log or CI (stdout not a terminal) plain lines, every PLAIN_EVERY_SECONDS, after each evaluation and at the end,
    since a bar is drawn there only once, at the end, cut to the log's width."""
    if not shown:
        yield lambda state, logs: None
    elif sys.stdout.isatty():
        with _rich_bar(label, total, start) as update:
            yield update
    else:
        yield _plain_lines(label, total, start)


@contextlib.contextmanager
def _rich_bar(label: str, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(label, total=total, completed=start, info="")

        def update(state: LoopState, logs: dict[str, Any]) -> None:
            if state.step % LOG_EVERY and state.step != total:
                progress.update(task, completed=state.step)  # formatting the losses would sync the GPU
                return
            progress.update(task, completed=state.step, info=_progress_info(state, logs))

        yield update


def _plain_lines(label: str, total: int, start: int) -> Callable[[LoopState, dict[str, Any]], None]:
    began = time.monotonic()
    last = {"printed": began, "evaluations": 0}

    def update(state: LoopState, logs: dict[str, Any]) -> None:
        evaluated = len(state.history) > last["evaluations"]
        if not (evaluated or state.step == total or time.monotonic() - last["printed"] >= PLAIN_EVERY_SECONDS):
            return
        last.update(printed=time.monotonic(), evaluations=len(state.history))
        remaining = (total - state.step) * (time.monotonic() - began) / max(1, state.step - start)
        print(f"{label} step {state.step}/{total} ({state.step / total:.0%}, ~{remaining:.0f} s left) "
              f"{_progress_info(state, logs)}", flush=True)

    return update


def _progress_info(state: LoopState, logs: dict[str, Any]) -> str:
    rate = state.samples_seen / state.train_seconds if state.train_seconds else 0.0
    info = " ".join(f"{k}={float(v):.4f}" for k, v in logs.items()) + f" {rate:.0f} samples/s"
    if state.history:
        last = state.history[-1]
        info += " | eval " + " ".join(f"{k}={v:.4f}" for k, v in last.items() if k not in ("step", "epoch"))
    return info
