"""Child-Tuning inside an existing Hugging Face `Trainer` (or TRL `SFTTrainer`) script, in one changed line.

    trainer = ChildTuningTrainer(strategy=ChildTuningD(0.3), strict=True, model=model, args=args, ...)
    trainer = ChildTuningSFTTrainer(strategy=ChildTuningF(0.3), model=model, train_dataset=..., ...)

`ChildTuningTrainer` only replaces `create_optimizer`: the optimizer becomes a `ChildOptimizer` over
the same parameter groups the Trainer would build (weight decay off for biases and norms, the
Trainer's learning rate, betas and eps), and a strategy that needs data, such as Child-Tuning_D's
Fisher information, is prepared on the Trainer's own training dataloader first. Everything else
(scheduler, Accelerate, DDP, logging, saving) is the Trainer's. Scripts that build their optimizer
themselves can pass `create_optimizer(model, strategy, ...)` in `Trainer(optimizers=(opt, None))`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from childtune.optim.masked import ChildOptimizer
from childtune.strategies import Strategy
from childtune.training import distributed
from childtune.training.params import no_decay as default_no_decay
from childtune.training.params import param_groups


def create_optimizer(
    model: torch.nn.Module,
    strategy: Strategy,
    *,
    lr: float,
    weight_decay: float = 0.0,
    strict: bool = False,
    batches: Iterable[Mapping[str, Any]] | None = None,
    no_decay: Iterable[str] | None = None,
    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> ChildOptimizer:
    """A `ChildOptimizer` for `model`'s trainable parameters, the strategy prepared on `batches` if needed.

    `no_decay` names parameters (exact names) that get no weight decay; by default biases and norm
    weights (`childtune.training.params.no_decay`, the rule the training loop uses too).
    """
    rule = default_no_decay if no_decay is None else set(no_decay).__contains__
    groups = param_groups(model, weight_decay, rule)
    opt = ChildOptimizer(groups, strategy, optimizer, strict=strict, lr=lr, **optimizer_kwargs)
    if strategy.needs_data:
        if batches is None:
            raise ValueError(f"{type(strategy).__name__} chooses its child network from data: pass batches=")
        strategy.prepare(model, batches)
    return opt


# The mixin is only ever combined with a Trainer (`child_tuning`): checked as one, a plain class at runtime.
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class ChildTuningMixin(_TrainerBase):
    """What makes a Trainer child-tune: its optimizer updates only the child network `strategy` chooses.

    `strict=True` keeps every element outside the child network exactly at its pretrained value
    (weight decay included), so the run can be saved as a sparse delta. `fisher_batches` overrides
    the data Child-Tuning_D scores (default: the Trainer's training dataloader; for a causal LM its
    labels are the token ids with -100 where ignored, and Fisher scores their log-likelihood).
    """

    def __init__(self, *args: Any, strategy: Strategy, strict: bool = False,
                 fisher_batches: Iterable[Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strategy = strategy
        self.strict = strict
        self.fisher_batches = fisher_batches

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            if model is None:
                raise ValueError("create_optimizer needs a model: none was given and the Trainer has none yet")
            distributed.refuse_flat_sharding(model)  # FSDP 1 shards a flat buffer, not named parameters
            distributed.check_accelerator(self.accelerator)
            decay = set(self.get_decay_parameter_names(model))
            no_decay = [n for n, p in model.named_parameters() if p.requires_grad and n not in decay]
            batches = None
            if self.strategy.needs_data:
                batches = self.fisher_batches if self.fisher_batches is not None else self.get_train_dataloader()
            self.optimizer = create_optimizer(
                model, self.strategy, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                strict=self.strict, batches=batches, no_decay=no_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            )
        return self.optimizer


def child_tuning(trainer_class: type) -> type:
    """`trainer_class` (the HF `Trainer`, TRL's `SFTTrainer`, or any subclass of either) made to child-tune:
    the same constructor plus `strategy=`, `strict=`, `fisher_batches=`."""
    return type(f"ChildTuning{trainer_class.__name__}", (ChildTuningMixin, trainer_class),
                {"__doc__": f"`{trainer_class.__name__}` whose optimizer updates only the child network "
                            "(see `ChildTuningMixin`)."})


ChildTuningTrainer = child_tuning(Trainer)


def __getattr__(name: str) -> Any:
    """`ChildTuningSFTTrainer`, built on first use so that TRL (the optional `childtune[trl]`) is only
    imported by those who ask for it."""
    if name == "ChildTuningSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError as err:
            raise ImportError("ChildTuningSFTTrainer needs TRL: pip install 'childtune[trl]'") from err
        globals()[name] = trainer = child_tuning(SFTTrainer)
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
