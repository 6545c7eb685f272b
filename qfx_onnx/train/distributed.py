"""Process-group plumbing for finetuning on several devices (``torchrun --nproc-per-node N``).

:func:`setup` reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), initialises the default process group when it is not already
initialised (gloo on CPU, NCCL on CUDA) and picks the device of this rank. Everything else is a
small collective the training loop needs, written so that a single process (world size 1) never
touches ``torch.distributed`` at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qfx_onnx.errors import QfxError


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world`` processes, training on ``device``.

    ``owns_group`` is True when :func:`setup` created the process group (and :func:`teardown`
    destroys it).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:<i>`` as a device that exists here; QfxError otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise QfxError(f"--device {name}: not a device name (use cpu, cuda or cuda:<index>)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QfxError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QfxError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise QfxError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def setup(device: str = "cpu") -> DistContext:
    """The DistContext of this process, initialising the process group when launched by torchrun.

    With ``WORLD_SIZE`` unset or 1 and no initialised group this is a single process on
    ``device``. Under torchrun each rank uses ``cuda:<LOCAL_RANK>`` when ``device`` is CUDA
    (an explicit index is then refused) and the CPU otherwise.
    """
    base = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        world, rank, owns = dist.get_world_size(), dist.get_rank(), False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        owns = world > 1
    if world == 1:
        return DistContext(0, 1, base, False)
    if base.type == "cuda":
        if base.index is not None:
            raise QfxError(f"--device {device}: under torchrun each rank uses cuda:<LOCAL_RANK>; pass --device cuda")
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise QfxError(f"rank {rank} wants cuda:{local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        base = torch.device("cuda", local)
        torch.cuda.set_device(base)
    if owns:
        if not dist.is_available():
            raise QfxError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
    return DistContext(rank, world, base, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks, in float64 (identity for one process)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    if not ctx.active:
        return flag
    return all_sum(ctx, [1.0 if flag else 0.0])[0] > 0


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def broadcast_error(ctx: DistContext, message: str | None) -> str | None:
    """Rank 0's error message (or None) on every rank, so that all ranks stop together."""
    if not ctx.active:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, device=_comm_device(ctx))
    return box[0]


def _comm_device(ctx: DistContext) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
