"""Data-parallel training (torchrun, Accelerate) without letting the ranks' child networks drift apart.

DDP keeps replicas equal only if every rank applies the same update. Its all-reduce makes the
gradients equal; the child network must then be equal too, or each rank masks a different subset and
the replicas diverge silently. The strategies are built for that: Child-Tuning_F draws its mask from
(seed, step) alone, Child-Tuning_D all-reduces Fisher sums before its top-p cut (`fisher.py`), and
ID3 ranks gradients DDP has already averaged. What this module adds is the plumbing around them: who
am I (`DistInfo`), a process group (`init`), the DDP wrapper (`wrap`), a data order that is a
function of (seed, epoch) shared by all ranks and resumable mid-epoch (`ShardedSampler`), agreement
checks (`any_rank`, `in_sync`) and rank-0-only writes (`main_only`). `launch.py` re-runs the CLI under
`torch.distributed.run` so `childtune train --nproc 2` works.

Sharded training (FSDP, DeepSpeed ZeRO) is refused, not half-supported: see `refuse_fsdp`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

T = TypeVar("T")

_EPOCHS = 100_003  # seed * _EPOCHS + epoch seeds an epoch's order: one process gets the loop's historic order
_DOCS = "docs/distributed.md"


class DistributedError(ValueError):
    """A distributed setup childtune cannot train correctly, explained with what to do instead."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; a plain single-process run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise DistributedError(
                f"inconsistent rank {self.rank} / world size {self.world_size} / local rank {self.local_rank}"
            )

    @property
    def is_main(self) -> bool:
        """The one process that writes files and prints results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
        """Read torchrun's (and Accelerate's, which uses torchrun) RANK, WORLD_SIZE and LOCAL_RANK."""
        env = os.environ if env is None else env
        values = {}
        for key, field_name, default in (("RANK", "rank", 0), ("WORLD_SIZE", "world_size", 1),
                                         ("LOCAL_RANK", "local_rank", None)):
            raw = env.get(key)
            if raw is None or raw == "":
                values[field_name] = default
                continue
            try:
                values[field_name] = int(raw)
            except ValueError:
                raise DistributedError(f"environment variable {key}={raw!r} is not an integer") from None
        if values["local_rank"] is None:
            values["local_rank"] = values["rank"]
        return cls(**values)


def info() -> DistInfo:
    """This process's place: from the process group when one is up, else from the environment."""
    if dist.is_available() and dist.is_initialized():
        env = DistInfo.from_env()
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
    return DistInfo.from_env()


def init(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the job torchrun started (gloo on CPU, nccl on CUDA); a no-op for a single process.

    Idempotent, so library code and the CLI may both call it.
    """
    me = DistInfo.from_env()
    if not me.distributed or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run with a single process")
    if "MASTER_ADDR" not in os.environ:
        raise DistributedError(f"WORLD_SIZE={me.world_size} but MASTER_ADDR is unset: start the job with "
                               f"`torchrun` or `childtune ... --nproc N` (see {_DOCS})")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(me.local_rank)
    dist.init_process_group(backend, rank=me.rank, world_size=me.world_size, timeout=timedelta(seconds=timeout_s))
    return me


def shutdown() -> None:
    """Leave the process group, so the job exits without the 'process group not destroyed' warning."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device(me: DistInfo | None = None) -> torch.device:
    """This rank's device: its own GPU under nccl, else the CPU."""
    me = me or info()
    if torch.cuda.is_available() and (not me.distributed or _backend() == "nccl"):
        return torch.device("cuda", me.local_rank)
    return torch.device("cpu")


def _backend() -> str | None:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def wrap(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """`model` in DistributedDataParallel when the job has several ranks, else `model` itself.

    DDP broadcasts rank 0's parameters and buffers when it wraps, so a task head initialised
    differently on each rank still starts identical everywhere. Build the optimizer from
    `unwrap(model).named_parameters()`: strategies reason about names without DDP's `module.` prefix.
    """
    refuse_fsdp(model)
    me = info()
    if not me.distributed:
        return model
    if not dist.is_initialized():
        raise DistributedError("call childtune.distributed.init() before wrap(): no process group is up")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if _backend() == "nccl":
        ddp_kwargs.setdefault("device_ids", [me.local_rank])
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel (or Accelerate's wrappers, which keep it in `.module`)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def refuse_fsdp(model: nn.Module) -> None:
    """Refuse a model whose parameters are sharded (FSDP 1 or 2, DTensor), naming the alternative.

    A child network is a boolean mask shaped like each *whole* parameter, chosen by ranking whole
    tensors (Fisher, ID3's |g|/|w|) and applied by name. FSDP flattens parameters into one buffer and
    keeps a slice of it per rank, so a rank can neither see the whole tensor a mask is shaped for nor
    rank elements globally without gathering every parameter, which is what FSDP exists to avoid.
    Rather than train a silently different child network per shard, childtune stops here.
    """
    from torch.distributed.fsdp import FlatParameter, FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel | FSDPModule):
            raise DistributedError(_sharded(f"module {name or type(module).__name__!r} is wrapped by FSDP"))
    for name, param in model.named_parameters():
        if isinstance(param, FlatParameter | DTensor):
            raise DistributedError(_sharded(f"parameter {name!r} is a sharded {type(param).__name__}"))


def check_accelerator(accelerator: Any) -> None:
    """Refuse Accelerate setups that shard parameters, or that silently run each rank alone.

    On a CPU-only machine `accelerate launch --multi_gpu` starts N processes, but an `Accelerator`
    without `cpu=True` then sees no GPU and trains N independent copies; catch that before it wastes
    a run.
    """
    kind = str(getattr(getattr(accelerator, "state", accelerator), "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise DistributedError(_sharded(f"Accelerate is configured for {kind}"))
    launched = DistInfo.from_env().world_size
    if launched > 1 and getattr(accelerator, "num_processes", 1) != launched:
        raise DistributedError(
            f"the launcher started {launched} processes but Accelerate runs {accelerator.num_processes}: on a "
            "CPU-only machine create Accelerator(cpu=True) (or set ACCELERATE_USE_CPU=1); see " + _DOCS
        )


def _sharded(what: str) -> str:
    return (f"{what}, but childtune masks whole parameters and cannot choose a child network over shards. "
            f"Use data parallelism (DDP) instead: `childtune train ... --nproc N`, `torchrun --nproc-per-node N "
            f"-m childtune.cli train ...`, or `accelerate launch` without an FSDP/DeepSpeed config (see {_DOCS}).")


class ShardedSampler(Sampler[int]):
    """This rank's share of a data order that depends only on (seed, epoch), resumable mid-epoch.

    All ranks compute the same permutation and take every `world_size`-th index starting at their
    rank, so per-rank batch k of every rank together is exactly batch k of a single process whose
    batch is `world_size` times larger: DDP's averaged gradient is that process's gradient. The order
    padded (by wrapping around) or cut (`drop_last`) to a multiple of `world_size` keeps every rank
    at the same number of steps, which DDP requires. `set_epoch(epoch, start)` skips the first
    `start` indices of this rank's share: the batches a resumed run already trained on.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        me = info()
        self.size, self.seed, self.shuffle, self.drop_last = size, seed, shuffle, drop_last
        self.rank = me.rank if rank is None else rank
        self.world_size = me.world_size if world_size is None else world_size
        DistInfo(self.rank, self.world_size)  # validates the pair
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}], got {start}")
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        """Indices each rank gets in a whole epoch."""
        if self.drop_last:
            return self.size // self.world_size
        return math.ceil(self.size / self.world_size)

    def order(self) -> list[int]:
        """The whole epoch's order, before sharding: identical on every rank."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * _EPOCHS + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            order = (order * math.ceil(total / len(order)))[:total]
        shard = order[self.rank : total : self.world_size]
        return iter(shard[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """`fn` that runs on rank 0 and returns None elsewhere: for writing files and printing results.

    It does not wait: call `barrier()` after it when other ranks go on to read what rank 0 wrote.
    Anything collective (gathering RNG states, `in_sync`) must happen on all ranks before it.
    """

    @functools.wraps(fn)
    def on_main(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if info().is_main else None

    return on_main


def barrier() -> None:
    if info().distributed and dist.is_initialized():
        dist.barrier()


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: ranks must take the same branch (skip a step, stop)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(obj: T) -> list[T]:
    """`obj` from every rank, in rank order, on every rank (`[obj]` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def in_sync(model: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters: the invariant a diverging child network breaks."""
    from childtune.delta import fingerprint

    prints = gather(fingerprint(dict(unwrap(model).named_parameters()), exclude=()))
    return len(set(prints)) == 1
