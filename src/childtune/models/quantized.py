"""A 4- or 8-bit frozen base with a sparse fp32 child on top (`train --base-bits 4|8`).

The base is loaded by transformers' bitsandbytes integration (`BitsAndBytesConfig`: NF4 with 64-element
blocks for 4 bits, LLM.int8's row-wise int8 for 8), so quantization happens as the weights are read
(the full-precision model never exists in memory) and QLoRA (peft's LoRA over these `Linear4bit`
modules) runs on the very same base. For a child network, each quantized Linear then becomes a
`QuantizedLinear`: its weight an `childtune.overlay.OverlayWeight`, the dequantised base plus the
child's fp32 values, its product taken through `optim.child_grad.overlay_linear` (dense in forward
and backward one layer at a time; the weight's gradient at the child elements only where child-only
gradients are installed, dense for a Fisher pass or a growth step).

Why bitsandbytes (measured here, 2026-12-04/05, CPU): its NF4 round trip has a relative error of 0.091
and int8 0.011; it dequantises a 1536 x 576 weight in 2 ms, runs on CPU and CUDA, and is what QLoRA
(peft), SpIEL and transformers' own loading use. optimum-quanto 0.2.7 and hqq 0.2.8 failed to run as
installed, and torchao 0.18 needs a compiled extension (`mslk`) that is not on PyPI for this platform.
Its one catch: on a CPU with AVX512-BF16, importing it asks the Hugging Face hub for a kernel
(`kernels-community/quantization-bitsandbytes`). childtune downloads nothing at run time, so the
import runs with HF_HUB_OFFLINE=1 (the kernel then is not found and bitsandbytes' own CPU code runs).

A run's delta is against the *unquantized* base (read from the model folder's safetensors, one tensor
at a time), as a QLoRA adapter is: `apply` onto the full-precision base gives the merged model, and
`generate` puts the same values over the quantized base (`apply_delta`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from childtune.optim.child_grad import overlay_linear
from childtune.overlay import OverlayWeight

BITS = (4, 8)


class QuantizedError(ValueError):
    """A quantized base cannot do what was asked: the message says why in one line."""


@contextlib.contextmanager
def offline_bitsandbytes() -> Iterator[None]:
    """Import (or first use) bitsandbytes without the hub: HF_HUB_OFFLINE=1 for the duration, and its
    'could not load the hub kernel' warning hidden (its own CPU code is what runs here)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]  # kernels: "offline, skipping"
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def quantization_config(bits: int, dtype: torch.dtype, skip: list[str]) -> Any:
    """transformers' `BitsAndBytesConfig` for a `bits`-bit base computing in `dtype`, leaving the modules
    named in `skip` (task heads, which train whole) in full precision."""
    if bits not in BITS:
        raise QuantizedError(f"--base-bits takes {' or '.join(map(str, BITS))}, got {bits}")
    with offline_bitsandbytes():
        try:
            import bitsandbytes  # noqa: F401  (transformers checks for it; say what to install first)
        except ImportError:
            raise QuantizedError("a quantized base needs bitsandbytes: pip install 'childtune[quant]'") from None
        from transformers import BitsAndBytesConfig
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


class QuantizedLinear(nn.Module):
    """A Linear layer over a frozen bitsandbytes weight: `weight` is an `OverlayWeight` of the layer's
    shape (the dequantised base plus its child elements), `bias` the layer's own, in full precision."""

    def __init__(self, layer: Any, dtype: torch.dtype) -> None:  # a bitsandbytes Linear4bit or Linear8bitLt
        super().__init__()
        self.in_features: int = layer.in_features
        self.out_features: int = layer.out_features
        packed = layer.weight
        self.bits = 4 if type(packed).__name__ == "Params4bit" else 8
        # plain tensors and the quantization state, not Parameters: the module holds no trainable copy of them
        self.packed: torch.Tensor = packed.data
        self.state = getattr(packed, "quant_state", None)
        self.scales: torch.Tensor | None = getattr(packed, "SCB", None)
        self.weight = OverlayWeight((self.out_features, self.in_features), dtype, self.dequantized,
                                    device=self.packed.device)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype))

    def dequantized(self) -> torch.Tensor:
        """The frozen base as a dense tensor (bitsandbytes' dequantisation; int8: code x row scale / 127)."""
        if self.bits == 4:
            dense: torch.Tensor = _functional().dequantize_4bit(self.packed, self.state)
            return dense
        assert self.scales is not None  # an Int8Params always carries its row scales (SCB)
        return self.packed.float() * (self.scales.float() / 127).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return overlay_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


@functools.cache
def _functional() -> Any:
    """bitsandbytes.functional, imported once (offline): a layer dequantises through it in every pass."""
    with offline_bitsandbytes():
        import bitsandbytes.functional as bnbf
    return bnbf


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The bitsandbytes Linear modules transformers put in place of `model`'s Linear layers."""
    with offline_bitsandbytes():
        import bitsandbytes as bnb
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            yield name, module


def attach_children(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give every quantized Linear of `model` a child on top (`QuantizedLinear`, in place); its weights are
    then overlay weights under their usual names (`...q_proj.weight`)."""
    for name, module in list(quantized_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantizedLinear(module, dtype))
    return model


def overlays(model: nn.Module) -> dict[str, OverlayWeight]:
    """`model`'s overlay weights by parameter name."""
    return {n: p for n, p in model.named_parameters() if isinstance(p, OverlayWeight)}


CHILD_INDEX, CHILD_VALUES = ".child_index", ".child_values"
"""A checkpoint holds an overlay weight as its own elements (`OverlayWeight.changed`) under these suffixes."""


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state for a checkpoint: its state dict, each overlay weight's base left out (the model folder
    holds it) and its own elements (the child's and the leavers') in its place."""
    state = model.state_dict()
    for name, weight in overlays(model).items():
        del state[name]
        state[name + CHILD_INDEX], state[name + CHILD_VALUES] = weight.changed()
    return state


def load_checkpoint_state(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put `checkpoint_state`'s tensors back into `model` (overlay weights through `overlay`; the optimizer's
    first step then holds its restored masters as the child's values)."""
    weights = overlays(model)
    plain = {n: t for n, t in saved.items() if not n.endswith((CHILD_INDEX, CHILD_VALUES))}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    absent = [n for n in weights if n + CHILD_INDEX not in saved or n + CHILD_VALUES not in saved]
    misfits = sorted(set(missing) - set(weights)) + list(unexpected) + absent
    if misfits:
        raise KeyError(f"the checkpoint's tensors do not fit this model: {misfits[:3]}")
    for name, weight in weights.items():
        weight.overlay(saved[name + CHILD_INDEX].long().to(weight.device),
                       saved[name + CHILD_VALUES].float().to(weight.device, copy=True))


class LazyState(Mapping[str, torch.Tensor]):
    """A state dict whose tensors are made when read, one at a time, so a delta against a model's
    full-precision weights never holds them all: `make(name)` builds one."""

    def __init__(self, names: list[str], make: Any) -> None:
        self._names, self._make = dict.fromkeys(names), make  # (ordered, and a set for lookups)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        tensor: torch.Tensor = self._make(name)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


def states(model: nn.Module, folder: Path) -> tuple[LazyState, LazyState]:
    """(base, tuned) for a delta and its counts, both named and shaped as the unquantized model's state:
    the base read from `folder`'s safetensors (in the dtype the model holds each tensor in), tensors that
    are no file's (a new task head) copied now; the tuned state the base with each overlay weight's
    changed elements written over it, and the model's own tensors elsewhere."""
    state = model.state_dict(keep_vars=True)
    names = list(state)
    dtypes = {n: t.dtype for n, t in state.items()}
    files = _FileTensors(folder, getattr(model, "base_model_prefix", ""))
    aliases = _aliases(state)
    copied = {n: t.detach().clone() for n, t in state.items() if files.find(aliases.get(n, n)) is None}

    def base(name: str) -> torch.Tensor:
        if name in copied:
            return copied[name]
        return files.read(aliases.get(name, name)).to(dtypes[name])

    def tuned(name: str) -> torch.Tensor:
        tensor = state[name]
        if not isinstance(tensor, OverlayWeight):
            return tensor.detach()
        index, values = tensor.changed()
        out = base(name)  # (on the CPU, read from the file: the child's values join it there)
        out.view(-1)[index.cpu()] = values.cpu().to(out.dtype)
        return out

    return LazyState(names, base), LazyState(names, tuned)


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied tensors (a causal LM's LM head and embeddings): each later name -> the first name of its storage."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}  # (storage, offset, shape)
    out = {}
    for name, tensor in state.items():
        if isinstance(tensor, OverlayWeight):
            continue
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


class _FileTensors:
    """A model folder's safetensors (one file or an index of shards), read one tensor at a time."""

    def __init__(self, folder: Path, prefix: str) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.where = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            path = folder / "model.safetensors"
            with safe_open(path, "pt") as f:
                self.where = dict.fromkeys(f.keys(), path)
        else:
            raise QuantizedError(f"{folder} has no safetensors weights to take a quantized run's delta against")
        self.prefix = f"{prefix}." if prefix else ""

    def find(self, name: str) -> str | None:
        """The file's name for the model's tensor `name` (with or without the model's base prefix)."""
        for candidate in (name, name.removeprefix(self.prefix), self.prefix + name):
            if candidate in self.where:
                return candidate
        return None

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        found = self.find(name)
        if found is None:
            raise QuantizedError(f"the model folder holds no tensor {name!r}")
        with safe_open(self.where[found], "pt") as f:
            return f.get_tensor(found)


def apply_delta(model: nn.Module, delta: Any, folder: Path) -> None:
    """Put a delta (against the unquantized base in `folder`) on a quantized model: each overlay weight
    holds the tuned values (base + delta, with the delta's exact exceptions) at the delta's elements;
    every other tensor is changed as `SparseDelta.apply` changes it."""
    from childtune.delta.entry import step

    weights = overlays(model)
    files = _FileTensors(folder, getattr(model, "base_model_prefix", ""))
    for name in set(delta.entries) & set(weights):
        weight = weights[name]
        tuned = step(delta.entries[name], files.read(name).to(weight.dtype).reshape(-1), True)
        weight.overlay(delta.entries[name].indices.long().to(weight.device), tuned.float().to(weight.device))
    rest = {n: e for n, e in delta.entries.items() if n not in weights}
    plain = {n: t for n, t in model.state_dict().items() if n not in weights}
    type(delta)(delta.config, rest, delta.dense).apply(plain, check_base=False)
