"""The method table: every method's name, its defaults under each preset, and how its strategy is built.

This is the one place a method is registered. Adding one is a strategy module under
`childtune.strategies` and one `Method(...)` line here; the CLI, `compare`, the study, the training
loop's optimizer choice and the saved config all read it (docs/architecture.md walks through it).

Two presets. `childtune` is ours, chosen on evidence (comments below say which). `authors` reproduces
each method's reference code as read (commits cited in the strategy modules): Child-Tuning's run script
(alibaba/AliceMind `ChildTuning/run.sh`: lr 4e-5, p 0.3, weight decay 0.01, their AdamW, non-strict),
the ID3 toolkit's example (torch AdamW over every weight, default weight decay 0.01, lr 1e-4, exp 0,
eps 1e-3), the same toolkit's PaFi and BitFit (lr 1e-4, weight decay forced to 0) and the random-masking
repository (q/v projection weights, Bernoulli, share of the whole model, weight decay 0, lr 1e-2). A method
without reference code (full, gradual, lora) is the same under both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from childtune.layers import HEAD, blocks, matches
from childtune.strategies import (
    ID3,
    BitFit,
    ChildTuningD,
    ChildTuningF,
    DropRegrow,
    FullFineTuning,
    GradualUnfreezing,
    NetworkKind,
    PaFi,
    RandomMasking,
    Strategy,
)
from childtune.strategies.random_mask import QV

PRESETS = ("childtune", "authors")

BASE: dict[str, Any] = {
    "strict": False, "rest": "freeze", "weight_decay": 0.01, "optimizer": "torch", "fisher_train_mode": False,
    "fisher_clip": 0.0, "id3_eps": 1e-3, "id3_exp": 1.0, "id3_head": "outside", "id3_schedule": "ramp",
    "bias_correction": "element", "random_targets": "all", "random_sampling": "exact", "random_budget": "scored",
}
"""What every method resolves to unless its preset says otherwise (`TrainConfig` fields left at None)."""

PRESET_FIELDS = ("lr", "reserve_p", *BASE)
"""The `TrainConfig` fields a preset decides when they are not given."""

CAUSAL_LM: dict[str, Any] = {"dtype": "bf16", "optimizer_in_backward": True, "child_only_grads": True}
"""How a causal LM (a generation task) trained with a strict child network resolves these fields when
they are not given (a method's `causal_lm` may take one back, as child-d does bf16 and the step in
backward): the cheapest setting that keeps the method's answers. bf16 weights with fp32 masters of the child elements
only (the sparse optimizer's), each parameter stepped inside backward so the model's gradients never
coexist, and the gradient of a fixed child network's Linear weights computed at its elements only (no
dense dW; for ID3 only where it grows every K > 1 steps, `id3_every`: dense on its growth steps). The
trained child elements see the same fp32 arithmetic as on fp32 weights; what changes is that the frozen
weights (and the tuned ones once written back) are rounded to bf16, and that the step in backward has no
global-norm clipping. Any other run, encoders included, resolves them to `DENSE_RUN`."""

DENSE_RUN: dict[str, Any] = {"dtype": "fp32", "optimizer_in_backward": False, "child_only_grads": False}
"""The same fields for every other run: fp32 weights, a step after backward, dense weight gradients."""


class Settings(Protocol):
    """The settings a method's strategy is built from: the fields of a resolved `TrainConfig` that the
    builders below read. Named here so that the method table needs nothing from `config.py`, which
    imports it (one direction: config -> methods); mypy checks that `TrainConfig` has every one."""

    seed: int
    reserve_p: float | None
    rest: str | None
    fisher_samples: int | None
    fisher_per_example: bool
    fisher_train_mode: bool | None
    fisher_clip: float | None
    fisher_passes: int | None
    child_budget: str
    id3_budget: float
    id3_eps: float | None
    id3_exp: float | None
    id3_head: str | None
    id3_schedule: str | None
    id3_every: int
    random_targets: str | None
    random_sampling: str | None
    random_budget: str | None
    gradual_every: int | None
    dyn_start: str
    dyn_every: int
    dyn_drop: float
    dyn_schedule: str
    dyn_importance: str
    dyn_window: int


T = TypeVar("T")


def _resolved(value: T | None, name: str) -> T:
    """Setting `name`, which `TrainConfig.resolved()` fills from the method table: a clear error for a
    config that was not resolved."""
    if value is None:
        raise ValueError(f"{name} is unset: strategies are built from a resolved config (TrainConfig.resolved())")
    return value


Builder = Callable[[Settings, int, list[str]], Strategy]
"""(resolved settings, optimizer steps, trainable parameter names) -> the method's strategy."""


@dataclass(frozen=True)
class Method:
    """How to build a method's strategy, and its defaults under each preset.

    `childtune` holds our values (learning rate, p, strictness, ...) over `BASE`; `authors` those of the
    method's reference code over `BASE`, or None when there is none (then both presets agree).
    Learning rates of the `childtune` preset are for the ~22M-parameter MiniLM on 3 epochs of 1,000
    examples (mr): full fine-tuning 0.793 test accuracy at 1e-4 and 0.765 at 2e-4; Child-Tuning_F keeps
    full fine-tuning's rate (its gradients are rescaled by 1/p); Child-Tuning_D, with embeddings frozen and
    30% of the blocks trained, 0.766 at 1e-4 and 0.784 at 2e-4. Random masking and ID3 update far fewer
    weights, so, as their papers do, they take a much larger step. `strict` is on where the child network
    is fixed, so the run changes exactly that network and can be saved as a sparse delta. Against the
    `authors` preset on mr and subj (5 seeds each, mean dev accuracy over seeds and both tasks) ours is
    ahead for child-d, id3 and random (docs/RESULTS.md, "Choosing the `childtune` preset").

    `network` is how the strategy's child network changes (`Strategy.kind`: a test checks they agree),
    known before any strategy is built: a fixed one can have child-only gradients, and ID3's growing one
    when it grows every K > 1 steps (`child_only`). `causal_lm` overrides, for a causal LM, the
    `childtune` preset's fields and the lean run settings of `CAUSAL_LM` that cost the method its answers.
    `image` overrides the `childtune` preset's fields for an image classifier (the CRNN), where measured
    (`IMAGE_LR`).
    """

    build: Builder
    childtune: Mapping[str, Any]
    authors: Mapping[str, Any] | None = None
    adapter: str | None = None
    network: NetworkKind = "fixed"
    causal_lm: Mapping[str, Any] = field(default_factory=dict)
    image: Mapping[str, Any] = field(default_factory=dict)
    defaults_by_preset: dict[str, dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ours = {**BASE, "reserve_p": None, **self.childtune}
        theirs = ours if self.authors is None else {**BASE, "reserve_p": None, **self.authors}
        object.__setattr__(self, "defaults_by_preset", {"childtune": ours, "authors": theirs})

    def defaults(self, preset: str) -> dict[str, Any]:
        """Every preset-decided field's value for this method under `preset`."""
        return self.defaults_by_preset[preset]

    @property
    def lr(self) -> float:
        return self.childtune["lr"]

    def child_only(self, c: Settings) -> bool:
        """Whether child-only gradients can apply to this method's child network under `c`: it is fixed, or
        dynamic (dense gradients on its window steps only), or it is ID3's growing every `id3_every` > 1 steps
        (dense gradients on those steps only; at 1 every step ranks dense gradients, so there is nothing to
        save)."""
        return self.network in ("fixed", "dynamic") or (self.build is _id3 and c.id3_every > 1)


def _gradual(config: Settings, total_steps: int, names: list[str]) -> Strategy:
    every = config.gradual_every or max(1, math.ceil(total_steps / (2 * max(1, len(blocks(names)) - 1))))
    return GradualUnfreezing(every)


def _child_d(random_within: bool) -> Builder:
    def build(c: Settings, total_steps: int, names: list[str]) -> Strategy:
        return ChildTuningD(_resolved(c.reserve_p, "reserve_p"), rest=_resolved(c.rest, "rest"),
                            num_samples=c.fisher_samples, per_example=c.fisher_per_example,
                            train_mode=_resolved(c.fisher_train_mode, "fisher_train_mode"),
                            clip=c.fisher_clip or None, passes=c.fisher_passes or 1,
                            random_within=random_within, seed=c.seed,
                            parts=_parts(c, names) if c.child_budget == "per-part" else ())
    return build


def _parts(c: Settings, names: list[str]) -> tuple[str, ...]:
    """child-d's per-part budget: a part per first name component among the trained parameters (those
    `--child-scope` left trainable), the connector and heads aside (they train whole)."""
    return tuple(sorted({f"{n.split('.')[0]}." for n in names if not matches(n, HEAD)}))


def _random(c: Settings, total_steps: int, names: list[str]) -> Strategy:
    return RandomMasking(_resolved(c.reserve_p, "reserve_p"), seed=c.seed,
                         targets=QV if c.random_targets == "qv" else (),
                         sampling=_resolved(c.random_sampling, "random_sampling"),
                         budget=_resolved(c.random_budget, "random_budget"))


def _drop_regrow(c: Settings, total_steps: int, names: list[str]) -> Strategy:
    return DropRegrow(_resolved(c.reserve_p, "reserve_p"), total_steps, start=c.dyn_start, every=c.dyn_every,
                      drop=c.dyn_drop, schedule=c.dyn_schedule, importance=c.dyn_importance, window=c.dyn_window,
                      seed=c.seed)


def _id3(c: Settings, total_steps: int, names: list[str]) -> Strategy:
    return ID3(c.id3_budget, total_steps, eps=_resolved(c.id3_eps, "id3_eps"), exp=_resolved(c.id3_exp, "id3_exp"),
               head=_resolved(c.id3_head, "id3_head"), schedule=_resolved(c.id3_schedule, "id3_schedule"),
               every=c.id3_every)


# Child-Tuning's run script, shared by D and F: lr 4e-5, p 0.3, wd 0.01, their AdamW (eps 1e-8), non-strict;
# D's Fisher in train mode, each tensor's gradient clipped to 1.0, embeddings/pooler/head trained in full.
_CHILD_TUNING = {"lr": 4e-5, "reserve_p": 0.3, "strict": False, "optimizer": "authors"}
_CHILD_D = {**_CHILD_TUNING, "rest": "train", "fisher_train_mode": True, "fisher_clip": 1.0}

# Child-Tuning_D on a causal LM: fp32 weights, the step after backward (with its global-norm clipping),
# child-only gradients, p 0.05, chosen on evidence: SmolLM2-135M on math (96 questions, 12 updates, 3 seeds,
# 40 dev questions; docs/RESULTS.md, "Child-Tuning_D on a causal LM"), mean dev exact match:
#   p 0.3:  fp32, after backward 0.258 (the committed cells) | bf16, after 0.200 | fp32, in backward 0.225 |
#           bf16, in backward 0.083
#   p 0.05: fp32, after 0.208 | bf16, after 0.133 | fp32, in backward 0.108 | bf16, in backward 0.092
# bf16 weights cost child-d about 0.06 dev at either p, the step in backward (no clipping) more, and the two
# together lose most of what it learns at every p (0.05, 0.1, 0.3) and lr (2e-4, 1e-3, 3e-3) tried; random
# masking and ID3 lose nothing at the lean settings. Within noise of the committed cells (paired over seeds,
# dev and test) are fp32 after backward at p 0.05 and bf16 after backward at p 0.3; the first is the cheaper:
# fp32 weights and 12 bytes of state per child element (moments, index) is 4.6 bytes per weight, against
# 2 + 16 x 0.3 = 6.8 for bf16 weights with fp32 masters at p 0.3.
_CAUSAL_CHILD_D = {"reserve_p": 0.05, "dtype": "fp32", "optimizer_in_backward": False}

# The ID3 toolkit's PaFi and BitFit (`base_optimizer.py`, `examples/vit_trainer.py`): torch AdamW on masked
# gradients, lr 1e-4, weight decay forced to 0.
_TOOLKIT = {"lr": 1e-4, "strict": True, "weight_decay": 0.0}

IMAGE_LR = {"lr": 1e-3}
"""The CRNN on Fashion-MNIST (1,000 images, 2 epochs; mean dev accuracy over the `vision` study's 5 seeds):
full, child-f and child-d all best at 1e-3 of {3e-4, 1e-3, 3e-3}, ten times their MiniLM rates (child-d
0.809 / 0.807 at 1e-3 against 0.771 / 0.760 at 3e-4 on seeds 1-2). Random masking at 1% rises to the top of
{1e-3 .. 3e-2} (0.759 at 1e-2, 0.793 at 3e-2): 3e-2. LoRA levels off (0.760 at 3e-3, 0.762 at 1e-2, whose
test scores spread three times as much): 3e-3. The methods the study did not run keep their text rates."""

METHODS: dict[str, Method] = {
    "full": Method(lambda c, t, n: FullFineTuning(), {"lr": 1e-4}, image=IMAGE_LR),
    "child-f": Method(lambda c, t, n: ChildTuningF(_resolved(c.reserve_p, "reserve_p"), seed=c.seed),
                      {"lr": 1e-4, "reserve_p": 0.3}, _CHILD_TUNING, network="per_step", image=IMAGE_LR),
    "child-d": Method(_child_d(False), {"lr": 2e-4, "reserve_p": 0.3, "strict": True}, _CHILD_D,
                      causal_lm=_CAUSAL_CHILD_D, image=IMAGE_LR),
    # The Child-Tuning paper's ablation: child-d's per-tensor sizes, lr and strictness, elements at random.
    "child-d-random": Method(_child_d(True), {"lr": 2e-4, "reserve_p": 0.3, "strict": True}, _CHILD_D,
                             causal_lm=_CAUSAL_CHILD_D, image=IMAGE_LR),
    # 1% of the weights need a 10x larger step (Xu & Zhang, 2024); measured on mr (1,000 examples, dev
    # accuracy, seeds 1 and 2): 0.797 / 0.776 at lr 1e-2 against 0.590 / 0.600 at 1e-3.
    "random": Method(_random, {"lr": 1e-2, "reserve_p": 0.01, "strict": True},
                     {"lr": 1e-2, "reserve_p": 0.01, "strict": True, "weight_decay": 0.0, "random_targets": "qv",
                      "random_sampling": "bernoulli", "random_budget": "model"}, image={"lr": 3e-2}),
    # mr dev accuracy, seeds 1 and 2, budget 0.5%: 0.758 / 0.754 at lr 5e-3 against 0.750 / 0.746 at 1e-3.
    "id3": Method(_id3, {"lr": 5e-3, "strict": True},
                  {"lr": 1e-4, "strict": False, "bias_correction": "tensor", "id3_exp": 0.0, "id3_eps": 1e-3,
                   "id3_head": "inside", "id3_schedule": "authors"}, network="growing"),
    # Drop and regrow at random masking's size (it starts as random masking, unless dyn_start='fisher'). Not at
    # its lr: the regrown elements are where the gradient is largest, and at 1e-2 they diverge (mr, 1,000
    # examples, dev accuracy seed 1: 0.589, every answer the majority class, against 0.753 at 1e-3 and 0.769 at
    # 3e-3; seed 2 at 3e-3: 0.752). Against fixed child networks of its size: issue 30's `moving` study.
    "child-dyn": Method(_drop_regrow, {"lr": 3e-3, "reserve_p": 0.01, "strict": True}, network="dynamic"),
    "gradual": Method(_gradual, {"lr": 1e-4, "strict": True}, network="growing"),
    "lora": Method(lambda c, t, n: FullFineTuning(), {"lr": 1e-3}, adapter="lora", image={"lr": 3e-3}),
    # ID3's dynamic sparsification of LoRA (Agarwal et al., 2024): the budget is a share of the adapter
    # parameters, which are all the optimizer sees once peft has frozen the base; lr as LoRA's.
    "id3-lora": Method(_id3, {"lr": 1e-3, "strict": True}, adapter="lora", network="growing"),
    # PaFi's smallest |w| at id3's budget, 0.5% (the toolkit's is a count, 100,000 in its example); lr as id3's
    # at that size (not measured for PaFi; id3's exp=1 score favours small |w| too). Authors: the toolkit's lr
    # and decay; strict is their masked AdamW exactly (zero gradients, no decay: no other weight moves).
    "pafi": Method(lambda c, t, n: PaFi(_resolved(c.reserve_p, "reserve_p")), {"lr": 5e-3, "reserve_p": 0.005,
                   "strict": True}, {**_TOOLKIT, "reserve_p": 0.005}),
    # BitFit, every bias: no evidence of ours yet, so the toolkit's settings under both presets.
    "bitfit": Method(lambda c, t, n: BitFit(), _TOOLKIT, _TOOLKIT),
}
