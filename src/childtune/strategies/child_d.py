"""Child-Tuning_D (Xu et al., 2021): the child network is the top-p parameters by Fisher information.

Chosen once, before training, from the task's own data: the parameters whose small changes most move
log p(y|x) are the ones worth updating. Scoring defaults to the transformer blocks only, as the authors
did on BERT; `per_layer` ranks within each block instead of globally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from childtune.fisher import fisher_information
from childtune.masks import check_probability, top_fraction
from childtune.strategies.chosen import ChosenStrategy


@dataclass
class ChildTuningD(ChosenStrategy):
    p: float
    scope: str = field(default="layers", kw_only=True)
    per_layer: bool = False
    per_example: bool = False
    num_samples: int | None = None

    needs_data: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.p = check_probability("reserve_p", self.p)

    def prepare(self, model: torch.nn.Module | None = None, batches: Iterable | None = None) -> None:
        if model is None or batches is None:
            raise ValueError("Child-Tuning_D needs the model and training batches to estimate Fisher scores")
        scores = fisher_information(
            model, batches, scored=list(self.scored()), num_samples=self.num_samples,
            per_example=self.per_example,
        )
        self.chosen = self.complete(top_fraction(scores, self.p, self.per_layer))
