"""Data parallelism over ``torch.distributed``: the few collectives gnlm needs, and no-ops in a single process.

``gnlm train`` runs unchanged under ``torchrun``. :func:`init` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts the process group: NCCL when the run
uses CUDA, gloo otherwise; on CUDA each process is pinned to ``cuda:LOCAL_RANK``. Without torchrun (or with one
process) nothing is initialised and every helper below is the identity, so single-process code paths stay
exactly as they are.

Every rank holds the same model and sees a disjoint shard of every global batch (``BatchStream(rank,
world_size)``); the helpers average what the trainers compute on their shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init", "is_initialized", "rank", "local_rank", "world_size", "is_main", "all_reduce_mean",
           "all_reduce_sum", "mean_of_floats", "barrier", "broadcast_object", "destroy"]


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto") -> tuple[int, int]:
    """Start the process group when launched by torchrun with more than one process; returns (rank, world_size).

    ``device`` is the run's ``train.device``: ``cpu`` forces gloo; ``auto``/``cuda`` use NCCL when CUDA is
    available. Calling it again is harmless.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if _env_world_size() <= 1 or "RANK" not in os.environ:
        return 0, 1
    use_cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _flat_reduce(tensors: list[torch.Tensor], scale: float | None) -> None:
    """All-reduce (sum) ``tensors`` in place through one flat buffer per dtype/device; then multiply by scale."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if scale is not None:
            flat.mul_(scale)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def all_reduce_mean(x: torch.Tensor | Sequence[torch.Tensor]) -> Any:
    """Average a tensor (or a list of tensors) over all ranks, in place; returns its argument.

    Shards of equal size make the mean of the per-rank means the mean over the global batch.
    """
    if not is_initialized() or world_size() == 1:
        return x
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    with torch.no_grad():
        _flat_reduce(tensors, 1.0 / world_size())
    return x


def all_reduce_sum(x: torch.Tensor | Sequence[torch.Tensor]) -> Any:
    """Sum a tensor (or a list of tensors) over all ranks, in place; returns its argument."""
    if not is_initialized() or world_size() == 1:
        return x
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    with torch.no_grad():
        _flat_reduce(tensors, None)
    return x


def mean_of_floats(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Average Python floats over ranks (one collective for the whole list); identity in one process."""
    if not is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(device))
    all_reduce_mean(t)
    return t.tolist()


def _comm_device(device: torch.device | str) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; identity in one process)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
