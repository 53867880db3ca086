"""The types every part of the data path shares, and the batching that feeds examples to a model.

A task is a `TaskSpec` (what it is: kind, labels, metric) and a `TaskData` (its train, dev and test
examples). The built-in tasks (`childtune.tasks`), the user's own files (`childtune.userfiles`) and the
scoring (`childtune.metrics`) all speak these types, so they live here, with nothing else to import;
those modules import this one, never the other way round.

Batching is here too: `TextDataset` and `make_collate` turn (text, label) examples into tokenised
batches whatever the examples came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

Kind = Literal["classification", "regression"]
Label = int | float
Example = tuple[str, Label]

SPLIT_SEED = 20240501

_METRICS: dict[str, frozenset[str]] = {
    "classification": frozenset({"accuracy", "macro_f1", "f1", "mcc"}),
    "regression": frozenset({"pearson", "spearman"}),
}


class DataError(ValueError):
    """Input data that cannot be used, explained in one line that names the file and the problem."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, independent of its data: enough to build a head and score predictions."""

    name: str
    kind: Kind
    num_labels: int
    label_names: tuple[str, ...]
    metric: str

    def __post_init__(self) -> None:
        if self.kind not in _METRICS:
            raise ValueError(f"kind must be 'classification' or 'regression', got {self.kind!r}")
        if self.metric not in _METRICS[self.kind]:
            raise ValueError(
                f"metric {self.metric!r} is not one of {sorted(_METRICS[self.kind])} for {self.kind}"
            )
        if self.kind == "regression" and (self.num_labels != 1 or self.label_names):
            raise ValueError("a regression task has num_labels=1 and no label_names")
        if self.kind == "classification" and (
            self.num_labels < 2 or len(self.label_names) != self.num_labels
        ):
            raise ValueError(
                f"need >= 2 classes with one name each, got {self.num_labels} / {self.label_names}"
            )
        if self.metric == "f1" and self.num_labels != 2:
            raise ValueError("metric 'f1' (of class 1) needs a binary task; use 'macro_f1'")


@dataclass
class TaskData:
    """A task's spec and its three splits of (text, label); `test` is empty when none was given."""

    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example] = field(default_factory=list)


# --------------------------------------------------------------------------- batching


class TextDataset(Dataset):
    """(text, label) examples as a torch Dataset; tokenisation happens per batch in the collate."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def make_collate(
    tokenizer: Any, max_length: int = 128, kind: Kind | None = None
) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """A collate function that tokenises a batch, padded to its longest text (dynamic padding).

    Padding each batch only to its own longest text, not to `max_length`, is what makes training on
    short sentences affordable on a CPU. Texts are cut at `max_length`, and never beyond what the
    tokenizer says the model accepts. `labels` are long for classification, float for regression;
    `kind=None` decides per batch from the label types (floats mean regression).
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # tokenizers without a limit report ~1e30
        max_length = min(max_length, limit)
    if max_length < 2:
        raise ValueError(f"max_length must leave room for special tokens, got {max_length}")

    def collate(batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = [text for text, _label in batch]
        labels = [label for _text, label in batch]
        regression = kind == "regression" or (kind is None and any(isinstance(v, float) for v in labels))
        encoded = tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = dict(encoded)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return out

    return collate
