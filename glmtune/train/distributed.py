"""Data-parallel training under torchrun / accelerate launch, through torch's own DDP.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables; we read them, start the process group (gloo on CPU, nccl on CUDA)
and wrap the model in ``DistributedDataParallel``. Everything else in the
recipe stays the same, with three rules:

- every rank takes its own slice of each global micro-batch
  (``batch_size × world_size`` rows), so an N-process run sees exactly the
  rows of a one-process run with an N times larger micro-batch;
- the loss is normalised by the trained tokens of the whole step, summed over
  ranks, so the gradient equals that one-process run's;
- only rank 0 writes logs, metrics, checkpoints and the adapter; any rank's
  stop request (signal, memory guard) stops all ranks at the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.sum(float(flag))[0]) if self.enabled else flag

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def local_processes() -> int:
    """Processes sharing this machine's memory and cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def init(device_type: str) -> Dist:
    """Join the process group the launcher prepared (no-op for a single process)."""
    info = from_environment()
    if not info.enabled:
        return info
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def wrap(model, info: Dist, device):
    """DDP around the PEFT model; only its trainable (LoRA) parameters are synchronised."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [device.index] if device.type == "cuda" else None
    # No buffer sync in forward: rotary caches are identical on every rank, and a
    # collective inside forward would deadlock a forward that runs on one rank only.
    # (torch >= 2.13 renamed the option.)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{option: False})


def shutdown(info: Dist) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
