"""Sharded workers in the strategies (``shards_per_worker=S`` of the Trainer's and Fabric's): the
check that the model sharded itself, and the checkpoint's full tensors.

A checkpoint's main file holds what it holds for whole workers: the global model and worker 0's
optimizer state, as full tensors (gathered inside each worker by
``torch.distributed.checkpoint.state_dict``), so that it loads on any (K, S) and into an unsharded
model. Each process's own shards (its worker's model and optimizer state) go to its rank file,
which a resume on the same (K, S) continues from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
