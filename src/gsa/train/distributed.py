"""Running on several processes: set-up from torchrun's environment, and parallelism applied *to* a model.

`apply_fsdp` shards every decoder block and then the rest (embeddings, final norm, head) with FSDP2's
`fully_shard`; `apply_ddp` replicates. Either way the model's code does not change, and one process (no torchrun)
runs the same loop with neither. Checkpoints hold full, gathered state dicts (see `gather_state` /
`scatter_state`), so a run saved on N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Processes:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def launched_world_size() -> int:
    """How many processes torchrun started (WORLD_SIZE in the environment; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_processes(device: str, group_of_one: bool = False) -> Processes:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...); a lone process
    joins nothing, or with `group_of_one` a group of its own (for FSDP2 on one device: its mixed precision keeps
    float32 master weights and computes with bf16 copies). NCCL between GPUs, gloo between CPU processes."""
    world_size = launched_world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if (world_size > 1 or group_of_one) and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        device_id = target if target.type == "cuda" else None
        if world_size > 1:
            # first-time tokenisation of a big corpus happens on rank 0 while the others wait at a barrier
            dist.init_process_group(backend, timeout=timedelta(minutes=60), device_id=device_id)
        else:  # no torchrun rendezvous to read: an in-process store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    return Processes(rank, local_rank, world_size, target)


def stop_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], processes: Processes) -> list[float]:
    """Element-wise sum over processes (float64, so token counts stay exact)."""
    if not processes.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(value, processes: Processes) -> list:
    """Every process's `value`, by rank (for small state such as generator states)."""
    if not processes.distributed:
        return [value]
    gathered = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    """FSDP2: each decoder block is its own unit (gathered just before it runs, freed after), the remaining
    parameters form the root unit. param_dtype bf16 computes in bf16 and reduces gradients in fp32. The mesh is
    the training device's type (FSDP2's default is the machine's accelerator, even for a CPU run over gloo)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The GSAForCausalLM inside a DDP wrapper (FSDP2 wraps nothing: it changes the module in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """A context in which backward does (enabled) or does not (an early micro-batch of gradient accumulation)
    reduce gradients across processes."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages the model (its parameters are DTensors, even on a group of one)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(model: nn.Module, processes: Processes, for_loading: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not processes.distributed and not is_sharded(model):
        # one process: the state dicts are already whole, keyed by parameter name
        return StateDictOptions()
    if for_loading:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, processes: Processes) -> tuple[dict, dict]:
    """Full model and optimizer state dicts keyed by parameter name, on CPU on rank 0 (empty on the others).
    Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    options = _options(model, processes, for_loading=False)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if processes.is_main:
        model_state = {k: v.detach().cpu() for k, v in model_state.items()}
    return model_state, optimizer_state


def scatter_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                  optimizer_state: dict | None, processes: Processes) -> None:
    """Load full state dicts (needed on rank 0 only when distributed) into a model that may be sharded, and its
    optimizer; each process keeps its own shard. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(model, processes, for_loading=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
