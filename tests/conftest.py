"""Shared fixtures: tiny randomly initialised models, so unit tests never touch the real model."""

from __future__ import annotations

import copy
import os
import warnings
import zlib

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI sets it: bitsandbytes (imported by peft) asks no hub


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


@pytest.fixture(params=["layers", "vmap"])
def way(request, monkeypatch):
    """Per-example Fisher scoring by each vectorised way (childtune.fisher.per_example), which must be the
    one taken: falling back to a slower way is an error inside the test."""
    from childtune.fisher import PerExampleFallbackWarning, per_example

    monkeypatch.setattr(per_example, "ORDER", per_example.ORDER[per_example.ORDER.index(request.param):])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerExampleFallbackWarning)
        yield request.param


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


M32, M64 = 2**32 - 1, 2**64 - 1


def py_splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def py_step_base(seed: int, step: int) -> int:
    return py_splitmix64(py_splitmix64(seed) ^ step)


def py_keep_bits(position: int, base: int, name: str) -> int:
    """Child-Tuning_F's documented draw (childtune/kernels.py docstring) in plain Python integers."""
    z = py_splitmix64(base ^ zlib.crc32(name.encode()))
    k1, k2 = z & M32, z >> 32
    x = position ^ k1
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= k2
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


@pytest.fixture(params=["compiled", "eager"])
def backend(request, monkeypatch):
    """Run a test with the compiled kernels (which must build here) and with the eager torch code."""
    from childtune import kernels

    if request.param == "eager":
        monkeypatch.setenv("CHILDTUNE_KERNELS", "eager")
    else:
        monkeypatch.delenv("CHILDTUNE_KERNELS", raising=False)
        assert kernels.extension() is not None, "the compiled kernels did not build (see the warning)"
    return request.param
