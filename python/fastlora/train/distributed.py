"""Multi-process training on `torch.distributed`, launched by `torchrun`.

* DDP: every rank holds the whole 4-bit model; `DistributedDataParallel` registers gradient
  hooks only on parameters that require grad, so only the LoRA gradients are all-reduced
  (the frozen packed bytes, biases, embeddings and norms never are). Buffers (the
  quantization statistics) are constant and are not re-broadcast every step.
* FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer, then the root, is sharded
  on dim 0 across the ranks: the frozen uint8 packed-weight parameter included (FSDP2
  all-gathers a group whose dtypes differ as bytes, so the packed nibbles travel unchanged),
  as are the LoRA weights, biases, norms and embeddings. The quantization statistics are
  buffers: FSDP2 leaves buffers whole on every rank, so sharding never splits a block from
  its scale. Each rank thus keeps 1/N of the packed bytes plus all the (small, 1/32 to 1/16
  of the packed size) statistics.

Gradients are averaged over ranks by both (each rank's loss is scaled to make the average the
token mean of the global batch).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainError

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    mode: str  # "none", "ddp" or "fsdp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module initialized the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainError(f"environment variable {name}={value!r} is not an integer") from None


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TrainError(f"--device: not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def setup(mode: str, device: str = "auto") -> DistInfo:
    """Reads torchrun's environment and joins (or reuses) the process group.
    `auto`: DDP when WORLD_SIZE > 1, else a single process."""
    if mode not in MODES:
        raise TrainError(f"--distributed: expected one of {', '.join(MODES)}, got {mode!r}")
    world = _env_int("WORLD_SIZE", 1)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        if world > 1:
            raise TrainError(f"--distributed none, but WORLD_SIZE={world}: every process would train alone "
                             "(use --distributed ddp or fsdp)")
        return DistInfo("none", device=pick_device(device, 0))
    if not launched and not dist.is_initialized():
        raise TrainError(f"--distributed {mode} needs torchrun's environment: run "
                         f"`torchrun --nproc-per-node N -m fastlora train --distributed {mode} ...`")
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = pick_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        owns = True
    return DistInfo(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    """Sums a few floats over ranks (float64, so token counts stay exact)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(info: DistInfo, value: float) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: Hugging Face's `_no_split_modules` classes,
    else the children of the longest `nn.ModuleList`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    if info.mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # The quantization statistics are constant buffers: synced once at construction, never per step.
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=False, **no_sync,
        )
    if info.mode == "fsdp":
        if info.device.type == "cpu":
            _check_cpu_storages_resizable()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def _check_cpu_storages_resizable() -> None:
    """FSDP2 frees each unsharded parameter after use by resizing its storage to 0. A CPU kernel
    that hands torch storage to numpy through `Tensor.numpy()` marks it non-resizable, and the
    reshard then fails deep inside FSDP; say so up front instead."""
    from ..backends import cpu

    probe = torch.empty(4, dtype=torch.uint8)
    cpu.as_numpy(probe)
    try:
        probe.untyped_storage().resize_(0)
    except RuntimeError:
        raise TrainError("--distributed fsdp on CPU: fastlora's CPU kernels pin the storages they read "
                         "(fastlora.backends.cpu.as_numpy uses Tensor.numpy()), which FSDP2 cannot free when it "
                         "reshards; use --distributed ddp") from None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "require_backward_grad_sync") and hasattr(model, "module") else model


def sync_context(model: nn.Module, info: DistInfo, sync: bool):
    """Gradient synchronization only on the last micro-batch of an accumulation."""
    if info.mode == "ddp" and not sync:
        return model.no_sync()
    if info.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; collective under FSDP."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

