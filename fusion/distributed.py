"""Scale-out helpers: FSDP units of a tower, sharding with FSDP2, and torchrun rank/world.

**FSDP.** :func:`fsdp_units` lists the modules to shard, innermost first: every
transformer block of every encoder, then each encoder (its remaining parameters:
patch embedding, position embedding, final norms, SAM's neck), then the projector.
:func:`shard_tower` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2) to each and
then to the tower, so one block's full weights exist only while that block runs. The
merge (a LayerNorm per encoder, optional adapters) is small and stays with the tower's
own unit: its methods call one another (``sequence`` calls ``forward``), and a unit of
its own would be resharded between them; with ``combine: sva`` each aggregation layer
(tens of MB at Cambrian's width) is a unit of its own (gathered once per fused grid:
once, or once more per batch of ROI crops). Frozen encoders stay frozen: FSDP2 keeps
``requires_grad`` per parameter, and the tower still runs them without autograd. It
works on CPU with gloo (tested with two processes) and on GPUs with NCCL; pass
``mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` for bf16 compute.

Blocks are found without naming any library: in each encoder, the ``nn.ModuleList`` /
``nn.Sequential`` whose children all have one class and which holds the most
parameters (open_clip's ``transformer.resblocks``, timm's ``blocks``, SAM's ``blocks``).

**torchrun.** :func:`dist_env` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, which
``torchrun`` sets on every node, so ranks are global across nodes.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
from torch import nn

# Tower methods other than forward that use the tower unit's own parameters (the merge): FSDP2
# must gather them for these too. Not ``encode``: forward calls it, and a registered method
# reshards on return, in the middle of forward; it needs no tower-unit parameter anyway
# (the encoders are units of their own).
_TOWER_METHODS = ("merge_and_project",)


def encoder_blocks(encoder: nn.Module) -> List[nn.Module]:
    """The repeated transformer blocks of ``encoder`` (an empty list if it has none)."""
    best, best_params = None, 0
    for module in encoder.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = module, params
    return list(best) if best is not None else []


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def fsdp_units(tower) -> List[nn.Module]:
    """Modules to shard, innermost first: each encoder's blocks, each encoder, the SVA's layers
    (``combine: sva``), the projector (if it has parameters). Shard the tower itself last: it
    holds the rest (the merge)."""
    units: List[nn.Module] = []
    for enc in tower.encoders.values():
        units.extend(encoder_blocks(enc))
        units.append(enc)
    if tower.merge.sva is not None:  # combine: sva: each aggregation layer is a unit (tens of MB at dim 1024)
        units.extend(tower.merge.sva.blocks())
    if _has_params(tower.projector):
        units.append(tower.projector)
    return units


def shard_tower(tower, mesh: Any = None, reshard_after_forward: bool = True, **fsdp_kwargs):
    """Shard ``tower`` in place with FSDP2 (``fully_shard``), one unit per :func:`fsdp_units`
    entry, then the tower; returns it. ``mesh``: a 1-D ``DeviceMesh`` (default: all ranks
    of the default process group, on the current device type); other keyword arguments
    go to ``fully_shard`` (``mp_policy``, ``offload_policy``).

    ``tower.encode`` and ``tower.merge_and_project`` work on the sharded tower as
    ``tower(...)`` does (``merge_and_project`` is registered as an FSDP forward method).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        if not torch.distributed.is_initialized():
            raise RuntimeError("shard_tower: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first (torchrun sets the environment)")
        device_type = tower.device.type
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    for unit in fsdp_units(tower):
        fully_shard(unit, **kwargs)
    fully_shard(tower, **kwargs)
    for name in _TOWER_METHODS:
        register_fsdp_forward_method(tower, name)
    return tower


# ----------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: global ``rank`` of ``world_size``; ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Rank and world from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
    a single process without them."""
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(key)
        if text is None:
            values[key] = default
            continue
        try:
            values[key] = int(text)
        except ValueError:
            raise ValueError(f"{key}: expected an integer in the environment (torchrun sets it), got {text!r}") \
                from None
    env = DistEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK/WORLD_SIZE: rank {env.rank} is not in [0, {env.world_size})")
    return env


def init_coordination(env: DistEnv, timeout: datetime.timedelta) -> bool:
    """Join a gloo process group (if ``env`` is distributed and none exists yet) for barriers
    only: no tensors are exchanged, so gloo serves CPU and GPU runs alike. Returns whether
    this call created it (the caller then destroys it)."""
    if not env.distributed or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timeout)
    return True


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


__all__ = ["DistEnv", "barrier", "dist_env", "encoder_blocks", "fsdp_units", "init_coordination", "shard_tower"]
