"""What a Fisher pass differentiates: log p(y|x) of each example, and the slicing of a batch into examples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def split(batch: Mapping[str, Any], device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """Model inputs (moved to the model's device) and labels; Fisher needs the labels' log-likelihood."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must yield dicts of model inputs, got {type(batch).__name__}")
    if batch.get("labels") is None:
        raise ValueError("the data loader yields no labels; Fisher information needs them")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    del inputs["labels"]
    labels = torch.as_tensor(batch["labels"], device=device)
    if labels.dim() == 0:
        raise ValueError("labels must hold one entry per example, got a scalar")
    return inputs, labels


def batched(inputs: Mapping[str, Any], n: int) -> list[str]:
    """Keys whose tensors carry one row per example (everything else is shared by the batch)."""
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n]


def rows(inputs: Mapping[str, Any], n: int, start: int, stop: int) -> dict[str, Any]:
    """Examples start..stop-1 with their own padding and attention mask, so their logits match the batch's."""
    keys = batched(inputs, n)
    return {k: v[start:stop] if k in keys else v for k, v in inputs.items()}


def log_likelihood(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """log p(y|x) per example, from the logits rather than the model's loss (whose scale varies by model).

    One output means regression: a unit-variance Gaussian, -(y - f)^2 / 2 up to a constant, which is
    what HF's `num_labels=1` models fit. Otherwise the log-softmax at the label. For a causal LM (logits
    per position, labels per position) it is the sum of the target tokens' log-probabilities, each
    predicted from the positions before it; prompt and padding positions (-100) add nothing.
    """
    # a model's output: a ModelOutput with logits, the logits themselves, or a tuple that starts with them
    logits: torch.Tensor | None = getattr(output, "logits", None)
    if logits is None:
        logits = output if isinstance(output, torch.Tensor) else output[0]
    if logits.dim() == 3 and labels.dim() == 2:  # a causal LM: labels are the inputs' ids, -100 where ignored
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != -100)).sum(1)  # log p(target | prompt): the target tokens only
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits of shape (batch, outputs) for {labels.shape[0]} labels, got "
                         f"{tuple(logits.shape)}: Fisher scoring covers one prediction per example")
    logits = logits.float()
    if logits.shape[1] == 1:
        return -0.5 * (labels.reshape(-1).float() - logits[:, 0]) ** 2
    if labels.is_floating_point():
        raise ValueError("float labels with several outputs (multi-label or soft targets) are not supported")
    return torch.log_softmax(logits, dim=-1).gather(1, labels.reshape(-1, 1).long())[:, 0]
