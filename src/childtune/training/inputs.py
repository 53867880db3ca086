"""What the loop feeds on: the task's examples from a config, and DataLoaders over them whose order is
a pure function of (seed, epoch) and whose generator is their own (see `loader`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from childtune.data.batching import TextDataset
from childtune.data.images import as_answers
from childtune.data.tasks import load_task
from childtune.data.types import SPLIT_SEED, DataError, Example, TaskData, as_kind
from childtune.data.userfiles import load_files
from childtune.models.folders import is_vision_language
from childtune.training import distributed
from childtune.training.config import ConfigError, TrainConfig


def load_data(config: TrainConfig) -> TaskData:
    """The task's splits: a built-in task (subsampled by seed), or the user's own files; dev and test
    capped at `eval_size` examples by a sample that is the same for every run (it ignores the seed)."""
    task = _load(config)
    if is_vision_language(config.model):  # it answers in words
        task = as_answers(task)
    if config.eval_size is not None:
        task.dev, task.test = (_sample(split, config.eval_size) for split in (task.dev, task.test))
    return task


def _sample(examples: list[Example], n: int) -> list[Example]:
    """At most `n` of `examples`, drawn with the split seed (not the run's), kept in their order."""
    if len(examples) <= n:
        return examples
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return [examples[i] for i in sorted(order[:n].tolist())]


def _load(config: TrainConfig) -> TaskData:
    if config.train_file is not None:
        if config.dev_file is None:
            raise ConfigError("your own data needs both --train and --dev files")
        kind = None if config.kind is None else as_kind(config.kind)
        task = load_files(config.train_file, config.dev_file, config.test_file,
                          text_col=config.text_col, label_col=config.label_col, kind=kind,
                          text_pair_col=config.text_pair_col, prompt_col=config.prompt_col,
                          target_col=config.target_col)
        if config.train_size is not None:
            if config.train_size > len(task.train):
                raise DataError(f"train_size={config.train_size} but {config.train_file} has "
                                f"{len(task.train)} examples")
            order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(config.seed))
            task.train = [task.train[i] for i in sorted(order[: config.train_size].tolist())]
        return task
    if not config.task:
        raise ConfigError("give a --task, or --train and --dev files")
    return load_task(config.task, seed=config.seed, train_size=config.train_size)


def batches(examples, collate, config: TrainConfig, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the epoch's batches from batch `start` on (earlier ones were done before a resume).

    The order is a function of (seed, epoch), and per-rank batch k of all ranks together is batch k of a
    single process: `batch_size` is the global batch whatever the number of processes.
    """
    per_rank = config.batch_size // distributed.info().world_size
    sampler = distributed.ShardedSampler(len(examples), seed=config.seed)
    sampler.set_epoch(epoch, start * per_rank)
    yield from loader(examples, batch_size=per_rank, sampler=sampler, collate_fn=collate)


def loader(examples: Sequence[Example], **kwargs: Any) -> DataLoader[Example]:
    """A DataLoader with its own generator: iterating one draws a seed, which must not come from the
    global RNG (dropout's), or a resumed run that opens a fresh loader mid-epoch would drift by a draw."""
    return DataLoader(TextDataset(examples), generator=torch.Generator(), **kwargs)
