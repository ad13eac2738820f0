"""Process layout: torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU), the device of
each rank, and DeepSpeed's sequence-parallel groups (consecutive ranks form one Ulysses group).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from powerattn.training.config import ConfigError


class _Ranks:
    """What follows from rank, world_size and sp_size (shared by Layout and Dist)."""

    rank: int
    world_size: int
    sp_size: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Dist(_Ranks):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp_size: int = 1
    sp_rank: int = 0
    sp_group: Any = None       # the Ulysses process group (None without sequence parallelism)
    mpu: Any = None            # DeepSpeed's parallel_state_sp module, handed to deepspeed.initialize

    def barrier(self) -> None:
        if torch_dist.is_initialized() and self.world_size > 1:
            torch_dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, *values: float) -> tuple[float, ...]:
        """Host floats, each summed over all ranks, in one all-reduce."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return tuple(t.tolist())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small picklable objects: file lists, verdicts)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Layout(_Ranks):
    """The process layout a launcher announces (torchrun's WORLD_SIZE / RANK), known before any process
    group exists; Dist has the same fields once it does."""

    rank: int
    world_size: int
    sp_size: int = 1



def process_layout(sp_size: int = 1) -> Layout:
    """The layout from the environment (plain `python`: one process); ConfigError if sp does not divide it."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if sp_size < 1 or world % sp_size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ConfigError(
            f"parallel.sequence_parallel_size={sp_size} does not divide the {world} process(es) launched; "
            f"launch a multiple of {sp_size} (torchrun --nproc_per_node {sp_size} ...) or set "
            f"parallel.sequence_parallel_size to one of {divisors}")
    return Layout(rank, world, sp_size)


def init_distributed(sp_size: int = 1) -> Dist:
    """Join (or, run as plain `python`, create) the process group and build the Ulysses groups."""
    process_layout(sp_size)
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"

    import deepspeed

    # DeepSpeed calls these deprecated torch collectives on every ZeRO step; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    deepspeed.init_distributed(dist_backend=backend)
    out = Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device, sp_size=sp_size)
    if sp_size > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        mpu.initialize_sequence_parallel(sp_size)
        out.mpu, out.sp_group = mpu, mpu.get_sequence_parallel_group()
        out.sp_rank = mpu.get_sequence_parallel_rank()
    return out
