"""One model in training, whichever command trains it: a student of `kdship distill` (one of several, in a
multi-student run) or the model of `kdship train`. It holds the transformers model that ships, the heads trained
beside it that do not ship (projections of its hidden states: saved beside the weights for the next stage of a
pipeline, never loaded by export or serve), and its bookkeeping."""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdship.errors import ModelError
from kdship.models import attention_dropout_off, captured_qkv
from kdship.runtime import Runtime, full_state_dict, is_sharded

HIDDEN = "hidden_states"
ATTENTIONS = "attentions"
QKV = "qkv"  # the last layer's query, key and value projections (relation distillation)
PROJECTIONS = "projections"  # a student's head mapping its hidden states to the teacher's width
PROJECTIONS_FILE = "feature_projections.safetensors"
LOSS_WINDOW = 5  # steps averaged for the first and the last loss in kdship.json


class HiddenProjection(nn.Module):
    """Learned linear maps of chosen hidden states to another width (identity-initialised when the widths are
    equal): how hidden states of models of different widths are compared."""

    def __init__(self, layers: list[int], width_in: int, width_out: int):
        super().__init__()
        self.layers = list(layers)
        self.maps = nn.ModuleList(nn.Linear(width_in, width_out) for _ in self.layers)
        if width_in == width_out:
            for m in self.maps:
                nn.init.eye_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, out: Any) -> list[Tensor]:
        return [m(out.hidden_states[i].float()) for m, i in zip(self.maps, self.layers)]

    def load_carried(self, source: str) -> str | None:
        """Start from the projections a previous stage trained for this student (TinyBERT keeps its W from general
        to task distillation: a fresh one makes the next stage's feature loss start worse than predicting the
        teacher's mean state). Returns the file used, or None when `source` has none for these layers and widths."""
        from safetensors import safe_open

        path = Path(source) / PROJECTIONS_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                layers = json.loads((f.metadata() or {}).get("layers", "null"))
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors' own error type, or bad JSON in the metadata
            raise ModelError(f"{path} could not be read ({e}); delete it and the feature projections start fresh") \
                from None
        expected = {k: v.shape for k, v in self.state_dict().items()}
        if layers != self.layers or {k: v.shape for k, v in state.items()} != expected:
            return None
        self.load_state_dict(state)
        return str(path)

    @staticmethod
    def save(state: dict[str, Tensor], layers: list[int], folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(folder) / PROJECTIONS_FILE),
                  metadata={"layers": json.dumps(layers)})


class TrainedModule(nn.Module):
    """The model and its heads as one module, so that DDP and FSDP see every parameter that gets a gradient in
    the same forward call."""

    def __init__(self, model: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)

    def forward(self, inputs: dict[str, Tensor], outputs: frozenset[str] = frozenset()) -> tuple[Any, dict[str, Any]]:
        """The model's output with the extra outputs asked for (hidden states, attentions, head names)."""
        heads = [name for name in self.heads if name in outputs]
        with contextlib.ExitStack() as stack:
            qkv = stack.enter_context(captured_qkv(self.model, -1)) if QKV in outputs else []
            if ATTENTIONS in outputs:  # maps read by a loss: the real probabilities, not their dropped-out copy
                stack.enter_context(attention_dropout_off(self.model))
            out = self.model(**inputs, output_hidden_states=HIDDEN in outputs or bool(heads),
                             output_attentions=ATTENTIONS in outputs)
        return out, {name: self.heads[name](out) for name in heads} | ({QKV: qkv} if QKV in outputs else {})


class RegionTimer:
    """Seconds spent in a region, summed over steps. On CUDA the kernels run after the host moves on, so CUDA events
    time them, and their elapsed times are read (one sync) every FOLD regions, not every step."""

    FOLD = 100

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.regions = 0  # how many regions the seconds cover: what a resumed run's record is checked by
        self.pending: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def region(self):
        self.regions += 1
        if not self.cuda:
            started = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.pending.append((start, end))
        if len(self.pending) >= self.FOLD:
            self.total()

    def total(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.pending) / 1000
            self.pending.clear()
        return self.seconds


@dataclass
class LossTrace:
    """Detached per-micro-batch losses; only the first and last few are kept, and read once, at the end (reading
    them every step would wait for the GPU)."""

    first: list[Tensor] = field(default_factory=list)
    last: deque = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))

    def add(self, loss: Tensor) -> None:
        if len(self.first) < LOSS_WINDOW:
            self.first.append(loss)
        self.last.append(loss)

    def summary(self, runtime: Runtime) -> dict[str, float]:
        """Mean loss over the first and the last few steps, averaged over processes: did this model learn?"""
        mean = lambda losses: sum(float(x) for x in losses) / len(losses)  # noqa: E731
        mine = {"loss_first": mean(self.first), "loss_last": mean(self.last)} if self.first else {}
        every = [s for s in runtime.gather_objects(mine) if s]
        return {k: sum(s[k] for s in every) / len(every) for k in every[0]} if every else {}


@dataclass
class Forward:
    """One forward call of a trained model: the model's output (logits, hidden states, ...) and the outputs of the
    heads that were asked for (projections, the last layer's q/k/v)."""

    output: Any
    heads: dict[str, Any]


@dataclass
class Trainee:
    """One trained model. `module` is what the processes train (the model and its heads, wrapped for DDP or
    sharded by the runtime); `model` is what ships."""

    name: str
    model: nn.Module
    heads: dict[str, nn.Module] = field(default_factory=dict)  # trained with the model, not shipped
    metric: str = ""  # key of the evaluation that decides "best"; "" keeps the last weights
    higher_is_better: bool = True
    prefix: str = ""  # "" for one trained model, "name/" for several (log and metric keys)
    details: dict[str, Any] = field(default_factory=dict)  # what its record says of where it came from
    lr: float | None = None  # its peak learning rate; None: the run's
    module: nn.Module | None = None
    timer: RegionTimer | None = None
    trace: LossTrace = field(default_factory=LossTrace)

    def distribute(self, runtime: Runtime, sharding: str, all_used: bool = False) -> None:
        """Place the model and its heads on this process's device, as DDP replicas or FSDP shards. `all_used`:
        every parameter gets a gradient in every step (the loss reads the model's own head, no head is idle)."""
        self.module = runtime.train_module(TrainedModule(self.model, self.heads), sharding, parts=[self.model],
                                           all_used=all_used)
        self.timer = RegionTimer(runtime.device)

    def __call__(self, inputs: dict[str, Tensor], outputs: frozenset[str] = frozenset()) -> Forward:
        return Forward(*self.module(inputs, outputs))  # a plain tuple through DDP, named here

    def progress_state(self) -> dict[str, Any]:
        """What a resumed run needs to report on the whole run, not its resumed part: the first losses and the
        forward time so far."""
        return {"first_losses": [float(x) for x in self.trace.first], "forward_seconds": self.timer.total(),
                "forward_calls": self.timer.regions}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.trace.first = [torch.tensor(x) for x in state["first_losses"]]
        self.timer.seconds = state["forward_seconds"]
        self.timer.regions = state.get("forward_calls", 0)  # absent from checkpoints written before it was kept

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save(self, folder: Path, runtime: Runtime) -> None:
        """The shipped model, save_pretrained-style, written by rank 0 (a sharded one is gathered first: every
        process must call this)."""
        full = full_state_dict(self.module) if is_sharded(self.module) else None
        if not runtime.is_main:
            return
        if full is None:
            self.model.save_pretrained(folder)
        else:
            self.model.save_pretrained(folder, state_dict=_under(full, "model."))
        projection = self.heads.get(PROJECTIONS)
        if projection is not None:
            state = projection.state_dict() if full is None else _under(full, f"heads.{PROJECTIONS}.")
            HiddenProjection.save(state, projection.layers, folder)


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a whole module's state dict that belong to one of its parts, named as the part names them."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
