"""Shared fixtures: tiny randomly initialised models, so unit tests never touch the real model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

torch.set_num_threads(1)


def tiny_bert_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def twin_mlps(dtype: torch.dtype = torch.float32):
    """A small MLP and an identical copy: one trained the ordinary way, one with the step in backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
    return model, copy.deepcopy(model)


def mlp_names(model) -> dict:
    """The MLP's parameters under names strategies reason about (blocks `layer.N`, a `classifier` head)."""
    return {"layer.0.w": model[0].weight, "layer.0.b": model[0].bias, "layer.1.w": model[2].weight,
            "classifier.b": model[2].bias}


def step_side_by_side(model, twin, ordinary, hooked, steps: int, after=lambda: None) -> None:
    """Train `model` with `ordinary` and `twin` with `hooked` (stepping in backward) on the same batches,
    checking that the hooks freed every gradient; `after()` runs after every step."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        ordinary.step()
        ordinary.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        assert all(p.grad is None for p in twin.parameters())  # freed inside backward
        hooked.step()
        after()
