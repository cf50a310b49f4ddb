"""Sharded workers in the strategies (``shards_per_worker=S`` of the Trainer's and Fabric's): the
check that the model sharded itself, and their checkpoints.

A sharded run's checkpoint is a folder that ``torch.distributed.checkpoint`` (DCP) writes, as
Lightning's ``ModelParallelStrategy`` writes one, in which every process writes its own shards:

- the global model (the same on every worker: DCP writes each shard once), under the key the
  front end gives it (``"state_dict"`` for the Trainer);
- ``worker<k>``: worker k's own model and optimizer states (its S processes write a shard each);
- ``rank<r>``: process r's own part of the sync state (error-feedback residuals, its part of the
  outer optimizer's state, a round in flight, RNG streams);
- ``meta.pt``: everything else (loop progress, callbacks, the sync schedule), by rank 0.

A resume on the same (K, S) continues bitwise. On another layout DCP reshards what has a global
meaning (the global model, and worker 0's optimizer state for every worker) and every worker
restarts a round from them. Full tensors (gathered by ``torch.distributed.checkpoint.state_dict``)
load a checkpoint of whole workers into sharded ones.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from localsgd.core.buckets import sharded


def check_sharded(module: nn.Module, shards_per_worker: int) -> None:
    """A ValueError if ``module`` did not shard itself (no DTensor parameter after configure_model)."""
    if not sharded(list(module.parameters())):
        raise ValueError(
            f"shards_per_worker ({shards_per_worker}) > 1 needs a model that is sharded: no parameter is "
            "an FSDP2 shard. HINT: in LightningModule.configure_model() (or Fabric's parallelize_fn), "
            "fully_shard(block, mesh=device_mesh['shard']) for each block, then the same for the root"
        )


def _options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full tensors: gathered inside each worker on saving, on the CPU and kept on global rank 0
    # only; on loading, every rank reads them and takes its shards
    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def full_model_state(module: nn.Module) -> dict[str, Any]:
    """``module``'s state as full tensors on global rank 0 (collective over each worker's processes)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_full_model_state(module: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Full tensors (a checkpoint's, read on every rank) into ``module``'s shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, dict(state), options=_options(strict))


def full_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer``'s state as full tensors on global rank 0 (collective over each worker's processes)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_full_optimizer_state(module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Full tensors (a checkpoint's, read on every rank) into ``optimizer``'s state of the shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options())


# ---------------------------------------------------------------------- DCP checkpoints
META = "meta.pt"
"""The non-tensor part of a sharded checkpoint, written by rank 0 (Lightning's name for it)."""


def is_dcp_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a folder that ``torch.distributed.checkpoint`` completed."""
    folder = Path(path)
    return folder.is_dir() and (folder / ".metadata").is_file()


def sharded_model_state(module: nn.Module) -> dict[str, Any]:
    """``module``'s state as this process's shards (DTensors), copied: saving may come after the
    module's values have changed back (the average swapped out)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module)
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def sharded_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer``'s state as this process's shards, keyed by parameter name (DCP's layout)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def save_dcp(
    path: Any, state: dict[str, Any], meta: dict[str, Any], rank: int, barrier: Callable[[], None]
) -> None:
    """Every process writes its part of ``state`` to the folder ``path`` (collective); rank 0 adds
    ``meta``. Written to ``<path>.partial`` and renamed into place when complete: a crash while
    writing leaves the previous checkpoint under ``path``, never a mix of two."""
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    if rank == 0 and partial.exists():
        shutil.rmtree(partial)  # left by a crash
    barrier()
    dcp.save(state, checkpoint_id=partial)  # returns once every process has written its part
    if rank == 0:
        torch.save(meta, partial / META)
        old = final.with_name(final.name + ".old")
        if final.exists() or final.is_symlink():
            os.replace(final, old)
        os.replace(partial, final)
        _remove(old)
    barrier()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_meta(path: Any) -> dict[str, Any]:
    meta = torch.load(Path(path) / META, map_location="cpu", weights_only=False)
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path}: its {META} holds a {type(meta).__name__}, not a dict")
    return meta


def load_dcp(path: Any, template: dict[str, Any]) -> None:
    """Load ``template``'s keys from the folder ``path`` into its tensors, in place (collective);
    DCP reshards DTensors saved on another layout."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, checkpoint_id=Path(path))


def load_global_model(path: Any, module: nn.Module, key: str) -> None:
    """The global model saved under ``key`` in the folder ``path``, into ``module``'s shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    load_dcp(path, {key: get_model_state_dict(module)})  # the parameters themselves: in place


def packed(state: Any) -> io.BytesIO:
    """``state`` as one value of a DCP checkpoint, written as it is by the process that holds it:
    for a process's own state (nested, keyed by anything), which has no global layout to reshard."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def load_packed(path: Any, key: str) -> Any:
    """What :func:`packed` saved under ``key`` in the folder ``path`` (collective)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    value = _load_state_dict_from_keys({key}, checkpoint_id=Path(path))[key]
    if isinstance(value, io.BytesIO):  # the bytes as written (torch versions differ in this)
        value.seek(0)
        value = torch.load(value, map_location="cpu", weights_only=False)
    return value


def load_worker_state(
    path: Any, module: nn.Module, optimizers: Mapping[str, Optimizer], worker: int, model_key: str | None
) -> dict[str, Any] | None:
    """Worker ``worker``'s optimizer states from the folder ``path`` into ``optimizers`` (in place,
    resharded where the layout changed), and its own model (saved under ``model_key``), returned;
    ``model_key=None``: not read."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    key = f"worker{worker}"
    part: dict[str, Any] = {name: sharded_optimizer_state(module, o) for name, o in optimizers.items()}
    if model_key is not None:
        part[model_key] = sharded_model_state(module)
    load_dcp(path, {key: part})
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(module, optimizer, part[name])
    return part[model_key] if model_key is not None else None
