"""Training checkpoints: `<output-dir>/checkpoint-<step>/` holding

* `adapter/`: the LoRA weights in PEFT's format (`fastlora.save_adapter`),
* `optimizer.safetensors` + `optimizer.json`: AdamW's state tensors keyed by parameter name
  (so a checkpoint resumes under DDP, FSDP or one process alike) and its param groups,
* `scheduler.json`: the learning-rate scheduler's state,
* `rng_state_<rank>.safetensors` + `rng_state_<rank>.json`: each rank's torch (CPU and CUDA)
  and Python random states,
* `trainer_state.json`: the step, the samples seen, the early-stopping count and best score,
  and the settings the run used,
* `best/`: with early stopping, the best adapter so far (`fastlora.train.early_stopping`).

Tensors are written with safetensors and everything else as JSON: loading a checkpoint never
unpickles anything. A checkpoint is written into a temporary directory that is renamed into
place once complete, so a crash mid-write never leaves a partial `checkpoint-<step>`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import DistInfo, barrier
from .errors import TrainError

PREFIX = "checkpoint-"
ADAPTER_DIR = "adapter"
STATE_NAME = "trainer_state.json"
OPTIM_TENSORS, OPTIM_META = "optimizer.safetensors", "optimizer.json"
SCHEDULER_NAME = "scheduler.json"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) in step order."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP.match(child.name)
        if match and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _to_json(value):
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError("a tensor with more than one value does not belong in JSON")
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's JSON")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(_to_json(value), indent=2) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: missing from the checkpoint") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainError(f"{path}: not valid JSON ({exc})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise TrainError(f"{path}: missing from the checkpoint") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable safetensors file ({exc})") from None


def _write_optimizer(directory: Path, state: dict) -> None:
    tensors = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, str(directory / OPTIM_TENSORS), metadata={"format": "pt"})
    _write_json(directory / OPTIM_META, {"param_groups": state["param_groups"]})


def read_optimizer(directory: Path) -> dict:
    tensors = _read_tensors(directory / OPTIM_TENSORS)
    groups = _read_json(directory / OPTIM_META)["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": groups}


def load_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = read_optimizer(directory)
    expected = {name for group in state["param_groups"] for name in group["params"]}
    try:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise TrainError(f"{directory / OPTIM_TENSORS}: does not fit this model's LoRA parameters "
                         f"({len(expected)} saved; {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def restore_rng(directory: Path, rank: int, device: torch.device) -> bool:
    """Restores this rank's random states; False when the checkpoint has none for this rank
    (it was written by fewer processes)."""
    path = directory / f"rng_state_{rank}.safetensors"
    if not path.exists():
        return False
    tensors = _read_tensors(path)
    meta = _read_json(directory / f"rng_state_{rank}.json")
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    return True


def save(
    output_dir: Path,
    step: int,
    info: DistInfo,
    write_adapter: Callable[[Path], None],
    optim_state: dict,
    scheduler_state: dict,
    trainer_state: dict,
    save_total_limit: int,
    best_dir: Path | None = None,
) -> Path:
    """Writes `checkpoint-<step>` (every rank calls this; rank 0 writes all but the RNG
    states, and a copy of `best_dir` when given) and keeps the newest `save_total_limit`
    checkpoints (all when 0)."""
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    tensors, meta = rng_state(info.device)
    save_file(tensors, str(tmp / f"rng_state_{info.rank}.safetensors"))
    _write_json(tmp / f"rng_state_{info.rank}.json", meta)
    if info.is_main:
        write_adapter(tmp / ADAPTER_DIR)
        _write_optimizer(tmp, optim_state)
        _write_json(tmp / SCHEDULER_NAME, scheduler_state)
        _write_json(tmp / STATE_NAME, trainer_state)
        if best_dir is not None and best_dir.is_dir():
            shutil.copytree(best_dir, tmp / best_dir.name)
    barrier(info)
    if info.is_main:
        replace_dir(tmp, final)
        if save_total_limit > 0:
            for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(path, ignore_errors=True)
    barrier(info)
    return final


def replace_dir(src: Path, dst: Path) -> None:
    """Renames directory `src` to `dst`, replacing what was there (never a half-written `dst`)."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_state(directory: Path) -> dict:
    state = _read_json(directory / STATE_NAME)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TrainError(f"{directory / STATE_NAME}: not a trainer state (no step)")
    return state
