"""The types every part of the data path shares.

A task is a `TaskSpec` (what it is: kind, labels, metric) and a `TaskData` (its train, dev and test
examples). The built-in tasks (`tasks`), the user's own files (`userfiles`), batching (`batching`) and
scoring (`metrics`) all speak these types, so they live here, with nothing else to import; those
modules import this one, never the other way round. An example's input is a text, a sentence pair, or
an `Image` (`TaskSpec.inputs` says which a task holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Kind = Literal["classification", "regression", "generation"]
KINDS: tuple[Kind, ...] = get_args(Kind)
Label = int | float | str
"""A class id, a regression target, or (generation) the target text the prompt should be answered with."""
Text = str | tuple[str, str]
"""A single text, or a sentence pair (premise, hypothesis) that the tokenizer joins with its separator."""
Inputs = Literal["text", "image"]


@dataclass(frozen=True, eq=False)
class Image:
    """One image as 8-bit pixels, `height` x `width` x `channels` (1: grayscale, 3: RGB) in row order.

    Plain bytes rather than a tensor or a Pillow image: a task of 70,000 images is 55 MB of them, they pickle
    into DataLoader workers as they are, and nothing below the model needs an imaging library. What a model
    makes of them (size, colour, polarity) is its processor's business (`models.crnn.CRNNImageProcessor`).
    """

    pixels: bytes
    height: int
    width: int
    channels: int = 1

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or self.height < 1 or self.width < 1:
            raise DataError(f"an image is height x width x 1 or 3 channels, got {self.height} x {self.width} x "
                            f"{self.channels}")
        if len(self.pixels) != self.height * self.width * self.channels:
            raise DataError(f"an image of {self.height} x {self.width} x {self.channels} holds "
                            f"{self.height * self.width * self.channels} bytes, got {len(self.pixels)}")


Example = tuple[Text | Image, Label]

SPLIT_SEED = 20240501

_METRICS: dict[str, frozenset[str]] = {
    "classification": frozenset({"accuracy", "macro_f1", "f1", "mcc"}),
    "regression": frozenset({"pearson", "spearman"}),
    "generation": frozenset({"exact_match"}),
}


class DataError(ValueError):
    """Input data that cannot be used, explained in one line that names the file and the problem."""


def as_kind(value: str) -> Kind:
    """`value` as a task kind, or a DataError naming the kinds there are."""
    for kind in KINDS:
        if value == kind:
            return kind
    raise DataError(f"a task's kind is one of {', '.join(KINDS)}, got {value!r}")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, independent of its data: enough to build a head and score predictions."""

    name: str
    kind: Kind
    num_labels: int
    label_names: tuple[str, ...]
    metric: str
    inputs: Inputs = "text"

    def __post_init__(self) -> None:
        if self.inputs == "image" and self.kind not in ("classification", "generation"):
            raise ValueError(f"an image task is classification, or generation answered in words, got {self.kind!r}")
        if self.kind not in _METRICS:
            raise ValueError(f"kind must be 'classification', 'regression' or 'generation', got {self.kind!r}")
        if self.metric not in _METRICS[self.kind]:
            raise ValueError(
                f"metric {self.metric!r} is not one of {sorted(_METRICS[self.kind])} for {self.kind}"
            )
        if self.kind == "regression" and (self.num_labels != 1 or self.label_names):
            raise ValueError("a regression task has num_labels=1 and no label_names")
        if self.kind == "generation" and (self.num_labels != 0 or (self.label_names and self.inputs == "text")):
            raise ValueError("a generation task has num_labels=0 and no label_names: its labels are texts (an "
                             "image task answered in words may list its answers)")
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
    """A task's spec and its three splits of (text or text pair, label); `test` is empty when none was given."""

    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example] = field(default_factory=list)
