"""Where a run executes: one process, or several started by `torchrun` / `accelerate launch`, on one or many
machines. Hugging Face Accelerate starts the process group (NCCL on CUDA, gloo on CPU), places models on each
process's device, wraps trained models in DistributedDataParallel, and provides autocast, backward and no_sync.
FSDP (torch's `fully_shard`) shards a model whose weights do not fit one device: the frozen teacher
(`teacher_sharding: fsdp`) or a trained model (`sharding: fsdp`).

Every process runs the same code on its share of each global batch. What only one process must do (print, write
files) is asked of `runtime.is_main`; what all must do together (gather, save a sharded model) is a method here."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from kdship.errors import ConfigError


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate launch, mpirun) started several processes."""
    return any(int(os.environ.get(name, "1")) > 1 for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


def is_main_process() -> bool:
    """Rank 0 (or no launcher). Read from the environment, so it works before a runtime exists."""
    return os.environ.get("RANK", "0") == "0"


def pick_device(requested: str) -> torch.device:
    """The device of a single-process command (eval, bench): CUDA when asked for or, with auto, when present."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA (auto or bf16); plain fp32 on CPU (auto) unless bf16 is asked for."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if not uses_bf16(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """The processes of one training run and what they do together."""

    accelerator: Any  # accelerate.Accelerator
    precision: str

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def shard_of(self, batch: Sequence[int]) -> list[int]:
        """This process's contiguous share of a global batch (shares differ by at most one example)."""
        base, extra = divmod(len(batch), self.world)
        start = self.rank * base + min(self.rank, extra)
        return list(batch[start:start + base + (self.rank < extra)])

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order (on every process)."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every process (e.g. its evaluation, so every process keeps the same best step)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def total(self, value: float) -> float:
        """The sum of `value` over processes."""
        if self.world == 1:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)  # exact counts past 2^24
        return float(self.accelerator.reduce(total, "sum").item())

    def train_module(self, module: nn.Module, sharding: str, parts: Sequence[nn.Module] = (),
                     all_used: bool = False) -> nn.Module:
        """A trained module as the processes share it: wrapped in DDP by Accelerate (a no-op with one process),
        or sharded with FSDP, `parts` (models called on their own, e.g. by evaluation) each a unit of their own.
        Unless every parameter gets a gradient in every step (`all_used`), DDP looks for the ones that do not (a
        pooler no loss reads, a technique's head after its warm-up): an extra pass over the graph per step."""
        if sharding == "fsdp" and self.world > 1:
            module.to(self.device)
            for part in parts:
                shard_layers(part)
            return shard_layers(module)
        self.accelerator.ddp_handler.find_unused_parameters = not all_used
        return self.accelerator.prepare_model(module)

    def frozen_module(self, module: nn.Module, sharding: str) -> nn.Module:
        """A frozen model (the teacher): a full copy on every device, or sharded with FSDP across them."""
        module = module.to(self.device).eval()
        module.requires_grad_(False)
        return shard_layers(module) if sharding == "fsdp" and self.world > 1 else module

    @contextlib.contextmanager
    def no_sync(self, modules: Sequence[nn.Module], skip: bool) -> Iterator[None]:
        """With skip, gradients are accumulated locally (no all-reduce) for this micro-batch: every micro-batch
        of an accumulation group but the last."""
        if not skip or self.world == 1:
            yield
            return
        with contextlib.ExitStack() as stack:
            for module in modules:
                if is_sharded(module):
                    module.set_requires_gradient_sync(False)
                    stack.callback(module.set_requires_gradient_sync, True)
                else:
                    stack.enter_context(self.accelerator.no_sync(module))
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)


def start_runtime(device: str, precision: str) -> Runtime:
    """The runtime of a training command: joins the launcher's process group when there is one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    cpu = device == "cpu" or not torch.cuda.is_available()
    # Accelerate keeps one state per process; a Python user (or the test suite) runs several commands in one
    # process, each with its own precision. The process group itself (launched runs) is kept.
    AcceleratorState._reset_state(reset_partial_state=not launched_distributed())
    mixed = "bf16" if uses_bf16(torch.device("cpu" if cpu else "cuda"), precision) else "no"
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=[DistributedDataParallelKwargs()])
    if launched_distributed() and not _CLOSE_AT_EXIT:
        _CLOSE_AT_EXIT.append(atexit.register(_close_process_group))
    return Runtime(accelerator, precision)


_CLOSE_AT_EXIT: list = []  # the exit hook, once registered (a pipeline starts a runtime per stage)


def close_process_group(succeeded: bool = True) -> None:
    """Leave the launcher's process group, if this process joined one. After a command that succeeded every process
    first waits for the others, so that none tears down its communication threads while another still uses the
    group; after a failure it leaves at once (the others may never arrive; the launcher stops them)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if succeeded:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _close_process_group() -> None:
    """At exit, before the interpreter tears down: a process group left open aborts the process ("terminate called
    without an active exception") when its communication threads are destroyed with it. Commands close it
    themselves (close_process_group); this covers a Python user's own script."""
    close_process_group(succeeded=False)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (encoder.layer, layers, h, ...): the ModuleLists of same-type modules."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks += list(module)
    return blocks


def shard_layers(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block is its own unit (its weights are gathered just before it runs and freed after),
    then the rest (embeddings, heads) at the root."""
    from torch.distributed.fsdp import fully_shard

    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    for block in transformer_layers(model):
        if not isinstance(block, FSDPModule):
            fully_shard(block)
    fully_shard(model)
    if hasattr(model, "embed"):  # a bi-encoder is also called through embed (evaluation): gather for it too
        register_fsdp_forward_method(model, "embed")
    return model


def unwrapped(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP shards in place: it is its own module)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, on the CPU. A sharded module's shards are gathered: every process must call this,
    and only rank 0 receives the tensors."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in unwrapped(module).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_sharded(module):
        unwrapped(module).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
