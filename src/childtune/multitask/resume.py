"""A multi-task run's checkpoint: everything its next step depends on, saved every `checkpoint_every` steps
into the run's partial folder in `training.checkpoint`'s format (written atomically, every file's sha256
checked when read), and put back by `train --resume`, so an interrupted run ends as the uninterrupted one.

What it holds: the backbone as the shared change leaves it (each task's own values swapped out), each task's
head, each task's own values (`model.TaskParts`), the shared optimizer's and each task's state, the shared
and per-task child networks (so a resume needs no Fisher pass), the step, each task's steps (its position
in its own batches) and the RNG states (dropout). The order of tasks is a function of the seed (`mixture`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from childtune.masks import Indices
from childtune.multitask.model import TaskParts
from childtune.training.checkpoint import (
    CheckpointError,
    capture_rng,
    check_settings,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from childtune.training.config import TrainConfig

_HEAD = "head:"


@dataclass
class Saved:
    """A checkpoint read back: its child networks (used instead of a Fisher pass) and the rest of its state."""

    shared: Indices
    own: dict[str, Indices]
    state: dict[str, Any]


def save(workdir: Path, config: TrainConfig, models: Mapping[str, torch.nn.Module], backbone: list[str],
         parts: TaskParts, optimizers: Mapping[str, Any], networks: tuple[Indices, dict[str, Indices]],
         step: int, steps: Mapping[str, int]) -> None:
    """Checkpoint the run after `step` updates (module docstring). `optimizers`: "shared" and each task's."""
    parts.activate(None)  # the backbone as the shared change leaves it; each task's values in `parts`
    first = next(iter(models.values()))
    model = {n: t for n, t in first.state_dict().items() if n in backbone}
    for task, m in models.items():
        model |= {f"{_HEAD}{task}:{n}": t for n, t in m.state_dict().items() if n not in backbone}
    save_checkpoint(workdir, {
        "model": model, "parts": parts.values, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "shared": networks[0], "own": networks[1], "step": step, "steps": dict(steps),
        "config": config.to_dict(), "rng": capture_rng(),
    })


def load(workdir: Path, config: TrainConfig) -> Saved:
    """The last checkpoint in `workdir`, refused if it was taken with other settings than `config`'s."""
    state = load_checkpoint(workdir)
    check_settings(config, state)
    if not {"model", "parts", "optimizers", "shared", "own", "step", "steps", "rng"} <= state.keys():
        raise CheckpointError("the checkpoint lacks state a multi-task resume needs (is it a single-task run's?)")
    return Saved(state["shared"], state["own"], state)


def restore(saved: Saved, models: Mapping[str, torch.nn.Module], parts: TaskParts,
            optimizers: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """Put the checkpoint back into the freshly built run; return (step, each task's steps)."""
    state = saved.state
    parts.activate(None)
    try:
        shared = {n: t for n, t in state["model"].items() if not n.startswith(_HEAD)}
        for task, model in models.items():
            own = {n[len(f"{_HEAD}{task}:"):]: t for n, t in state["model"].items() if n.startswith(f"{_HEAD}{task}:")}
            model.load_state_dict({**shared, **own})
        for task, values in state["parts"].items():
            parts.values[task] = {n: v.clone() for n, v in values.items()}
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint does not fit this run: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}") from None
    restore_rng(state["rng"])
    return int(state["step"]), {t: int(n) for t, n in state["steps"].items()}
