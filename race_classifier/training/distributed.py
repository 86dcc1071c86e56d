"""Data-parallel training under torchrun: the process group from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), and the few collectives the trainer needs. Without torchrun (WORLD_SIZE unset
or 1) every helper is a no-op, so a single process runs exactly as it always has."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from race_classifier.device import resolve_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (in float64: counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device("cuda", torch.cuda.current_device())
                                   if dist.get_backend() == "nccl" else None)
        return box[0]


def init_from_env(device_spec: str) -> tuple[World, torch.device | None]:
    """Join torchrun's process group when WORLD_SIZE > 1: NCCL with one GPU per process (cuda:LOCAL_RANK)
    when ``device_spec`` allows CUDA and it is there, else Gloo on the CPU. Returns the world and the
    process's device (None when not distributed: the caller resolves ``device_spec`` as usual)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), None
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_spec.startswith("cuda") and ":" in device_spec:
        raise ValueError(f"--device {device_spec}: under torchrun each process takes cuda:LOCAL_RANK; "
                         "use --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    device = resolve_device(device_spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
