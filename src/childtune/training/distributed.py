"""Data-parallel training (torchrun, Accelerate) without letting the ranks' child networks drift apart.

DDP keeps replicas equal only if every rank applies the same update. Its all-reduce makes the
gradients equal; the child network must then be equal too, or each rank masks a different subset and
the replicas diverge silently. The strategies are built for that: Child-Tuning_F draws its mask from
(seed, step) alone, Child-Tuning_D all-reduces Fisher sums before its top-p cut (`fisher/estimate.py`), and
ID3 ranks gradients DDP has already averaged. What this module adds is the plumbing around them: who
am I (`DistInfo`), a process group (`init`), the DDP wrapper (`wrap`), a data order that is a
function of (seed, epoch) shared by all ranks and resumable mid-epoch (`ShardedSampler`), agreement
checks (`any_rank`, `in_sync`) and rank-0-only writes (`main_only`). `launch.py` re-runs the CLI under
`torch.distributed.run` so `childtune train --nproc 2` works.

Sharded training is FSDP2's (`shard`: `fully_shard` on every transformer block, then the root): each rank
holds rows of every parameter, and childtune's masks, scores and sparse optimizer state are those rows
(`childtune.shards`), with every global cut taken across ranks. FSDP 1 (flat parameters) and DeepSpeed
ZeRO, which shard a flattened buffer rather than parameters, are refused: see `refuse_flat_sharding`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

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
        values: dict[str, int] = {}
        for key, field_name, default in (("RANK", "rank", 0), ("WORLD_SIZE", "world_size", 1),
                                         ("LOCAL_RANK", "local_rank", None)):
            raw = env.get(key)
            if raw is None or raw == "":
                if default is not None:
                    values[field_name] = default
                continue
            try:
                values[field_name] = int(raw)
            except ValueError:
                raise DistributedError(f"environment variable {key}={raw!r} is not an integer") from None
        values.setdefault("local_rank", values["rank"])  # LOCAL_RANK unset: a single node's rank
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
    refuse_flat_sharding(model)
    me = info()
    if not me.distributed or is_fsdp2(model):  # FSDP2 synchronises in its own hooks: no DDP on top
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


def refuse_flat_sharding(model: nn.Module) -> None:
    """Refuse a model sharded as one flat buffer (FSDP 1's `FlatParameter`), naming the alternatives.

    A child network is chosen element by element and applied by name; FSDP2 keeps every parameter a
    DTensor of whole rows, which childtune masks row by row (`childtune.shards`). FSDP 1 flattens many
    parameters into one buffer and gives each rank an arbitrary slice of it, across parameter borders:
    no rank holds a piece of a parameter it can name. Rather than train a silently different child
    network, childtune stops there. DTensor layouts other than FSDP2's are refused by the strategies.
    """
    from torch.distributed.fsdp import FlatParameter, FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise DistributedError(_sharded(f"module {name or type(module).__name__!r} is wrapped by FSDP 1"))
    for name, param in model.named_parameters():
        if isinstance(param, FlatParameter):
            raise DistributedError(_sharded(f"parameter {name!r} is a flat FSDP 1 parameter"))


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `model` was sharded with `fully_shard` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module) -> nn.Module:
    """`model` sharded in place with FSDP2 over all ranks: each transformer block (every module in a
    `ModuleList`, such as `bert.encoder.layer.3` or `model.layers.3`) is one unit, gathered for its own
    forward and backward, and the rest (embeddings, head, tied weights) is the root's unit.

    Build the optimizer after this, from `model.named_parameters()`: the names are unchanged, the
    parameters are now DTensors holding this rank's rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise DistributedError("call childtune.distributed.init() before shard(): no process group is up")
    mesh = init_device_mesh(device(info()).type, (dist.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """An FSDP2 model's whole state dict on rank 0, on the CPU (None on the other ranks): collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a module's state dict holds its parameters and buffers, each gathered whole into a plain tensor here
    return cast(dict[str, torch.Tensor], state) if info().is_main else None


def check_accelerator(accelerator: Any) -> None:
    """Refuse Accelerate setups that shard parameters, or that silently run each rank alone.

    On a CPU-only machine `accelerate launch --multi_gpu` starts N processes, but an `Accelerator`
    without `cpu=True` then sees no GPU and trains N independent copies; catch that before it wastes
    a run.
    """
    kind = str(getattr(getattr(accelerator, "state", accelerator), "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):  # Accelerate's FSDP plugin also wraps FSDP 1
        raise DistributedError(_sharded(f"Accelerate is configured for {kind}"))
    launched = DistInfo.from_env().world_size
    if launched > 1 and getattr(accelerator, "num_processes", 1) != launched:
        raise DistributedError(
            f"the launcher started {launched} processes but Accelerate runs {accelerator.num_processes}: on a "
            "CPU-only machine create Accelerator(cpu=True) (or set ACCELERATE_USE_CPU=1); see " + _DOCS
        )


def _sharded(what: str) -> str:
    return (f"{what}, but childtune chooses a child network among named parameters, not slices of a flat "
            f"buffer. Shard with FSDP2 instead (`childtune train ... --nproc N --fsdp`, or "
            f"`torch.distributed.fsdp.fully_shard` / `childtune.training.distributed.shard` in your own loop), or "
            f"use data parallelism (DDP): `childtune train ... --nproc N`, or `accelerate launch` without an "
            f"FSDP/DeepSpeed config (see {_DOCS}).")


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
