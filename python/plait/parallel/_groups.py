"""Group resolution shared by every piece of ``plait.parallel``.

A layer, mapping, pipeline or balancer takes ``group``, which may be:

- ``None``: the default (world) process group;
- a ``torch.distributed.ProcessGroup``;
- a one-dimensional ``DeviceMesh`` (its only dimension's group);
- a pair ``(mesh, "dim_name")`` or ``(mesh, dim_index)``: that dimension of a multi-dimensional ``DeviceMesh``.

``resolve_group`` turns any of these into a process group; ``group_rank`` / ``group_size`` are the rank and size
in it. ``global_rank(group, r)`` maps a group rank to the global rank point-to-point calls need.
"""

from __future__ import annotations

import torch.distributed as dist


def resolve_group(group):
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("plait.parallel: torch.distributed is not initialised (call init_process_group first)")
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without device_mesh
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"plait.parallel: a {group.ndim}-D DeviceMesh was given as a group; pass (mesh, 'dim_name') "
                f"to pick one of its dimensions {group.mesh_dim_names}")
        return group.get_group()
    if isinstance(group, tuple) and len(group) == 2 and DeviceMesh and isinstance(group[0], DeviceMesh):
        mesh, dim = group
        return mesh.get_group(dim)
    raise TypeError(
        f"plait.parallel: group must be None, a ProcessGroup, a 1-D DeviceMesh or (DeviceMesh, dim); got {type(group).__name__}")


def group_size(group) -> int:
    return dist.get_world_size(resolve_group(group))


def group_rank(group) -> int:
    return dist.get_rank(resolve_group(group))


def global_rank(group, group_rank_: int) -> int:
    pg = resolve_group(group)
    if pg is dist.group.WORLD:
        return group_rank_
    return dist.get_global_rank(pg, group_rank_)
