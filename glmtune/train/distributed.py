"""Data-parallel training under torchrun / accelerate launch: DDP, FSDP2, DeepSpeed ZeRO.

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

Big models shard instead of replicating, through the engines that exist for it:
PyTorch FSDP2 (``fully_shard`` per decoder layer) or DeepSpeed ZeRO-2 / ZeRO-3
(``deepspeed.initialize`` with a config built from glmtune's own batch,
accumulation and clipping options). Both average gradients over ranks as DDP
does, so the loss normalisation above holds unchanged; sharded tensors are
gathered to rank 0 to save the adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from glmtune.config import strategy_problems


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
        return bool(self.sum(float(flag))[0])

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


def init(device_type: str, sharded: bool = False) -> Dist:
    """Join the process group the launcher prepared.

    A single process needs none, unless it shards (FSDP and DeepSpeed always
    want one): then it makes a group of one on a free local port.
    """
    info = from_environment()
    if not info.enabled and not sharded:
        return info
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        if not info.enabled:
            # A group of one through the launchers' variables, which DeepSpeed reads too;
            # shutdown puts back what was there, so child processes never inherit them.
            _ENV_BEFORE.update({var: os.environ.get(var) for var in _LAUNCH_VARS})
            for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                               ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(var, value)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CROSS_RANK", "CROSS_SIZE")
_ENV_BEFORE: dict[str, str | None] = {}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wrap(model, info: Dist, device):
    """DDP around the PEFT model; only its trainable (LoRA) parameters are synchronised."""
    if not info.enabled:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # No buffer sync in forward: rotary caches are identical on every rank, and a
    # collective inside forward would deadlock a forward that runs on one rank only.
    # (torch >= 2.13 renamed the option.)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{option: False})


def shutdown(info: Dist) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if info.enabled:
            dist.barrier()
        dist.destroy_process_group()
    for var, value in _ENV_BEFORE.items():  # what a group of one found (see init)
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    _ENV_BEFORE.clear()


# ---------------------------------------------------------------------- sharding
SHARDED = ("fsdp", "zero2", "zero3")


def start(requested: str, quant: str, device_type: str) -> tuple[str, Dist]:
    """The strategy this launch runs (checked before joining anything) and its process group."""
    from glmtune.errors import GlmtuneError

    strategy = resolve_strategy(requested)
    problems = strategy_problems(strategy, quant)
    if problems:
        raise GlmtuneError("; ".join(problems))
    return strategy, init(device_type, sharded=strategy in SHARDED)


def resolve_strategy(requested: str) -> str:
    """``auto``: what `accelerate launch --config_file X.yaml` asked for, else DDP."""
    if requested != "auto":
        return requested
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "zero3" if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "zero2"
    return "ddp"


class Engine:
    """How one optimizer step runs across processes, whatever the strategy.

    The recipe calls ``wrap`` once, then per micro-batch ``accumulating`` and
    ``backward``, per step ``step``, and ``gather_trainable`` / ``save_state`` /
    ``load_state`` around checkpoints; the strategy differences live here.
    """

    def __init__(self, strategy: str, info: Dist, device):
        self.strategy, self.info, self.device = strategy, info, device
        self.deepspeed = None  # DeepSpeed's engine, when it runs the steps

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    def wrap(self, model, make_optimizer, cfg):
        """(module to train through, optimizer): FSDP shards before the optimizer exists
        (it replaces the parameters), DeepSpeed wraps model and optimizer after."""
        if self.strategy == "ddp":
            return wrap(model, self.info, self.device), make_optimizer()
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            layer_classes = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
            for module in model.modules():  # one FSDP unit per decoder layer, then the rest
                if type(module).__name__ in layer_classes:
                    fully_shard(module)
            fully_shard(model)
            return model, make_optimizer()
        import deepspeed

        optimizer = make_optimizer()
        config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * self.info.world,
            "gradient_clipping": cfg.max_grad_norm,  # 0 = off, as in glmtune
            "zero_optimization": {"stage": 3 if self.strategy == "zero3" else 2},
            "steps_per_print": 2**31 - 1,  # glmtune logs
        }
        self.deepspeed, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return self.deepspeed, optimizer

    def accumulating(self, train_model, last: bool):
        """Around one micro-batch: gradients stay local unless it is the step's last.
        (DeepSpeed counts micro-batches itself.)"""
        import contextlib

        if last or not self.info.enabled or self.deepspeed:
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            return _FsdpNoSync(train_model)
        return train_model.no_sync()

    def backward(self, loss) -> None:
        if self.deepspeed:  # reduces, clips and steps at the accumulation boundary
            self.deepspeed.backward(loss, scale_wrt_gas=False)
            self.deepspeed.step()
        else:
            loss.backward()

    def step(self, optimizer, params, max_grad_norm: float) -> float | None:
        """Clip, step, zero; returns the gradient norm before clipping (None if not computed)."""
        if self.deepspeed:
            return None
        import torch

        norm = None
        if max_grad_norm:
            total = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            # FSDP2 returns the norm as a DTensor
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def gather_trainable(self, model) -> dict | None:
        """The full trainable tensors on rank 0 (a collective: every rank calls it).

        None where each rank already holds them whole (DDP, ZeRO-2).
        """
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if self.strategy == "zero3":
            import deepspeed

            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().to("cpu", copy=True) for n, p in named}
        return None

    def save_state(self, path, model, optimizer) -> None:
        """Sharded optimizer (and trainable weight) state, each rank its own part (a collective)."""
        if self.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp

            dcp.save(_fsdp_state(model, optimizer), checkpoint_id=str(path))
        else:
            self.deepspeed.save_checkpoint(str(path), tag="engine", save_latest=False,
                                           exclude_frozen_parameters=True)

    def load_state(self, path, model, optimizer) -> None:
        if self.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            state = _fsdp_state(model, optimizer)  # the layout dcp.load fills in place
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
            set_optimizer_state_dict(model, optimizer, state["optim"],
                                     options=StateDictOptions(ignore_frozen_params=True))
        else:
            self.deepspeed.load_checkpoint(str(path), tag="engine", load_module_strict=False,
                                           load_optimizer_states=True,
                                           load_lr_scheduler_states=False)


def _fsdp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options)}


class _FsdpNoSync:
    """FSDP2's ``no_sync``: skip the gradient reduce-scatter for this micro-batch."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
