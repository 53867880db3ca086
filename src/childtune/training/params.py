"""Which parameters train and how: AdamW groups with one no-decay rule, the LR schedule, the optimizer
that costs what the child network costs, and the gradients a fixed child network never needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from childtune.layers import HEAD, matches
from childtune.optim import ChildOptimizer, ChildTuningAdamW, SparseChildAdamW
from childtune.strategies import Strategy
from childtune.training.config import ConfigError, TrainConfig


def no_decay(name: str) -> bool:
    """The one rule for parameters that get no weight decay: biases and normalisation weights.

    Covers BERT's `LayerNorm.weight`, T5/Llama-style `layer_norm.weight` / `input_layernorm.weight` /
    `norm.weight`, and GPT-2's `ln_1.weight` / `ln_f.weight`.
    """
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    return parts[-1] == "bias" or "norm" in name.lower() or owner.startswith("ln_")


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay_rule: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """Trainable (name, parameter) pairs grouped for AdamW: decay on weights, none on biases and norms.

    Groups are contiguous runs in the model's own order, not "all decayed, then the rest": strategies
    such as gradual unfreezing read a parameter's place in the network from the order they see names
    in, and two big groups would put the embeddings' LayerNorm after the last block.
    """
    rule = no_decay_rule or no_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": list(run), "weight_decay": 0.0 if skip else weight_decay}
        for skip, run in itertools.groupby(named, key=lambda item: rule(item[0]))
    ]


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The share of the peak LR at `step`: linear warmup to 1, then linear decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak LR, then linear decay to zero at `total_steps` (`linear_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(linear_factor, warmup_steps=warmup_steps,
                                                                total_steps=total_steps))


def freeze_unchosen(strategy: Strategy, params: dict[str, torch.Tensor]) -> list[str]:
    """Stop computing gradients for parameters a fixed child network leaves out entirely (strict runs).

    Child-Tuning_D with frozen embeddings would otherwise backpropagate into a 30k x 384 embedding
    matrix and run AdamW over it every step, only for the mask to throw the result away: a third of
    each step on MiniLM. Strict masking would zero those gradients and restore those weights anyway;
    the one difference is that gradient clipping no longer counts gradients that were never applied.
    """
    names = [n for n in strategy.untouched() if n in params]
    for name in names:
        params[name].requires_grad_(False)
    return names


def restrict_to_parts(model: torch.nn.Module, scope: str) -> list[str]:
    """`--child-scope`: only the named parts of a model of parts (`child_parts`, e.g. the vision-language
    model's vision, connector, language) may hold the child network; the others' parameters stop training.
    A connector or head trains whole wherever it is (`layers.HEAD`). Returns the names frozen."""
    known = getattr(model, "child_parts", None)
    if not known:
        raise ConfigError(f"--child-scope chooses among a model's named parts; {type(model).__name__} has none "
                          "(the vision-language model crnn-smollm2 has vision, connector, language)")
    wanted = scope.split(",")
    if unknown := [w for w in wanted if w not in known]:
        raise ConfigError(f"--child-scope: {type(model).__name__} has no part {unknown[0]!r} (its parts: "
                          f"{', '.join(known)})")
    frozen = [n for n, p in model.named_parameters() if n.split(".")[0] not in wanted and not matches(n, HEAD)]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def make_optimizer(groups: list[dict[str, Any]], strategy: Strategy, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW that costs what the child network costs.

    A strict child network that is fixed or only grows (child-d, random, id3, gradual) gets
    `SparseChildAdamW`: moments and work for child elements only, and nothing else moves. Masks that
    change every step (child-f) or non-strict runs wrap torch's AdamW, fused (one pass per weight for
    the whole update; benchmarks/RESULTS.md measures it at a quarter of the foreach step on CPU).
    """
    lr, strict, bias_correction = config.lr, config.strict, config.bias_correction
    if lr is None or strict is None or bias_correction is None:
        raise ConfigError("make_optimizer needs a resolved config (TrainConfig.resolved() fills the method's "
                          f"lr, strict and bias_correction), got lr={lr}, strict={strict}, "
                          f"bias_correction={bias_correction}")
    sparse = strict and strategy.kind != "per_step"
    low = [n for g in groups for n, p in g["params"] if p.dtype in (torch.bfloat16, torch.float16)]
    if config.dtype == "bf16" and not sparse and low:  # LoRA adapters: peft keeps them fp32 over a bf16 base
        raise ConfigError(f"--dtype bf16 keeps fp32 masters for child elements in the sparse optimizer, which "
                          f"needs a strict fixed or growing child network; {config.method} here is not one, and "
                          f"torch's AdamW would step {low[0]!r} in bf16, losing updates below its precision "
                          "(use --bf16 autocast with fp32 weights instead)")
    if config.optimizer_in_backward:
        if not sparse:  # Child-Tuning_F, non-strict runs: torch's AdamW stepped parameter by parameter
            if config.optimizer == "authors" or strict:
                raise ConfigError(f"--optimizer-in-backward steps torch's AdamW per parameter; {config.method} "
                                  "here needs the authors' AdamW or a strict restore around the whole step")
            return ChildOptimizer(groups, strategy, torch.optim.AdamW, lr=lr, fused=True, in_backward=True)
        if config.grad_accum > 1 and (strategy.needs_gradients or strategy.kind == "dynamic"):
            raise ConfigError(f"{config.method} reads the whole update's gradient, unknown before the last "
                              "micro-batch: --optimizer-in-backward cannot accumulate gradients for it (grad_accum 1)")
        return SparseChildAdamW(groups, strategy, lr=lr, bias_correction=bias_correction, in_backward=True)
    if sparse:
        return SparseChildAdamW(groups, strategy, lr=lr, bias_correction=bias_correction)
    if config.optimizer == "authors":  # Child-Tuning's AdamW arithmetic, eps as their run passed it (HF's 1e-8)
        return ChildOptimizer(groups, strategy, ChildTuningAdamW, strict=strict, lr=lr, eps=1e-8)
    return ChildOptimizer(groups, strategy, torch.optim.AdamW, strict=strict, lr=lr, fused=True)
