"""One model per task over one backbone, and each task's own child elements swapped in for its batches.

Every task gets the sequence classifier a single-task run of it would build (`training.models.load_model`:
its own head, labels and loss), and all of them then share the first one's backbone module (the
`base_model_prefix` attribute, e.g. `bert`), so the backbone's parameters are one set of tensors with the
names a single-task model gives them, and a task's delta applies to the base as a single-task delta does.

A task's own child network lives in the same backbone tensors as the shared one, at other elements.
`TaskParts` keeps each task's learned values there aside while another task runs (SpIEL-style per-task
values, without a second copy of any weight): `activate(task)` writes the previous task's elements back
to their pre-trained values and this task's learned values in. The shared elements are never touched, so
the backbone always holds base + shared change + (at most) the active task's own change.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from childtune.masks import Indices


def _prefix(model: nn.Module) -> str:
    """The attribute holding a transformers model's backbone (`base_model_prefix`, e.g. `bert`)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not isinstance(prefix, str) or not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        raise ValueError(f"{type(model).__name__} names no backbone module (base_model_prefix): one transformers "
                         "classifier per task is needed to share it")
    return prefix


def share_backbone(models: Mapping[str, nn.Module]) -> None:
    """Make every model use the first one's backbone module."""
    first = next(iter(models.values()))
    prefix = _prefix(first)
    backbone = getattr(first, prefix)
    for model in models.values():
        if _prefix(model) != prefix:
            raise ValueError("the task models differ in architecture: one base model serves every task")
        setattr(model, prefix, backbone)


def backbone_names(model: nn.Module) -> list[str]:
    """The names (in `model`'s state dict) of its backbone's tensors: those under `base_model_prefix`."""
    prefix = _prefix(model) + "."
    return [n for n in model.state_dict() if n.startswith(prefix)]


class TaskParts:
    """Each task's own child elements of the backbone's `params`, swapped in and out (module docstring)."""

    def __init__(self, params: Mapping[str, torch.Tensor], networks: Mapping[str, Indices]) -> None:
        self.params = dict(params)
        self.index = {t: {n: i.long() for n, i in net.items() if len(i)} for t, net in networks.items()}
        with torch.no_grad():
            self.base = {t: {n: self._flat(n)[i].clone() for n, i in net.items()} for t, net in self.index.items()}
        self.values = {t: {n: v.clone() for n, v in base.items()} for t, base in self.base.items()}
        self.active: str | None = None

    def _flat(self, name: str) -> torch.Tensor:
        return self.params[name].data.view(-1)

    @torch.no_grad()
    def activate(self, task: str | None) -> None:
        """The backbone as `task` sees it (None: the shared change alone)."""
        if task == self.active:
            return
        if self.active is not None:
            for name, index in self.index[self.active].items():
                flat = self._flat(name)
                self.values[self.active][name] = flat[index].clone()
                flat[index] = self.base[self.active][name]
        if task is not None:
            for name, index in self.index[task].items():
                self._flat(name)[index] = self.values[task][name]
        self.active = task
