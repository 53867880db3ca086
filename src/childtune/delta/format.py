"""The on-disk description of a sparse delta (`delta_config.json`), checked field by field on load,
and the fingerprint that ties a delta to the one base model it was made from.

Kept apart from the arithmetic (`childtune.delta.sparse`) because it is the part that reads untrusted
input: every key of a config is type- and range-checked here before any tensor is touched.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from childtune.delta.errors import DeltaError
from childtune.delta.indexcodec import ENCODINGS
from childtune.layers import HEAD, matches

FORMAT_VERSION = 2
"""2 added `base_files`; version 1 deltas still load, with no base files recorded (only weights checked)."""
CONFIG_FILE = "delta_config.json"
TENSORS_FILE = "delta.safetensors"
DEFAULT_DENSE: tuple[str, ...] = HEAD
"""Name fragments of the dense task head: freshly initialised per run, so stored whole and absolute."""


def state_of(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Name -> tensor sharing storage with the model, so in-place writes reach its parameters. A mapping
    is used as it is: one that makes its tensors as they are read (a quantized model's full-precision
    view, `models.quantized.LazyState`) then never holds them all."""
    return model.state_dict() if isinstance(model, torch.nn.Module) else model


def fingerprint(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], exclude: Iterable[str] = DEFAULT_DENSE
) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of the base weights.

    The task head (`exclude`, name fragments) is left out: it is re-initialised per run, so two runs from
    one pretrained model must agree on the fingerprint.
    """
    exclude = tuple(exclude)
    digest = hashlib.sha256()
    state = state_of(model_or_state_dict)
    for name in sorted(state):
        if matches(name, exclude):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TensorLayout:
    """Where one changed tensor fits (`shape`), how its indices are stored (`encoding`) and how the
    positions of its exceptions among them are (`exceptions`, None when it has none)."""

    shape: tuple[int, ...]
    encoding: str
    exceptions: str | None = None


@dataclass
class DeltaConfig:
    """Everything needed to check a delta against its base and reproduce how it was made."""

    method: str
    base_fingerprint: str
    base_model: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    dense_patterns: tuple[str, ...] = DEFAULT_DENSE
    tensors: dict[str, TensorLayout] = field(default_factory=dict)
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)
    num_elements: int = 0
    """Elements of the base outside the head: the denominator of the child network's density."""
    num_changed: int = 0
    num_exceptions: int = 0
    num_dense: int = 0
    tensors_sha256: str = ""
    format_version: int = FORMAT_VERSION
    base_files: dict[str, str] = field(default_factory=dict)
    """sha256 of the base's files that change what its weights mean (its tokenizer and architecture settings),
    by file name: recorded and checked by whoever knows the base as a folder (`childtune.training`), since
    the fingerprint sees weights only."""

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["dense_patterns"] = list(self.dense_patterns)
        raw["tensors"] = {n: {**asdict(t), "shape": list(t.shape)} for n, t in self.tensors.items()}
        raw["dense"] = {n: list(s) for n, s in self.dense.items()}
        return raw

    @classmethod
    def from_dict(cls, raw: Any) -> DeltaConfig:
        """Parse a JSON object strictly: unknown, missing or mistyped keys are named in a DeltaError."""
        if not isinstance(raw, dict):
            raise DeltaError(f"{CONFIG_FILE} must hold a JSON object, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        for key in raw:
            if key not in known:
                raise DeltaError(f"unknown config key {key!r}")
        if "format_version" not in raw:
            raise DeltaError("missing config key 'format_version'")
        version = _int(raw, "format_version")
        if version not in (1, FORMAT_VERSION):
            raise DeltaError(f"delta format version {version} is not supported (this childtune reads 1 to "
                             f"{FORMAT_VERSION})")
        for key in known - ({"base_files"} if version == 1 else set()):
            if key not in raw:
                raise DeltaError(f"missing config key {key!r}")
        base_files = _obj(raw, "base_files") if version > 1 else {}
        for name, digest in base_files.items():
            if not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
                raise DeltaError(f"config 'base_files' entry {name!r} must be a sha256 hex digest, got {digest!r}")
        if not isinstance(raw["hparams"], dict):
            raise DeltaError("config key 'hparams' must be an object")
        patterns = raw["dense_patterns"]
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise DeltaError("config key 'dense_patterns' must be a list of non-empty strings")
        tensors = {}
        for name, spec in _obj(raw, "tensors").items():
            if not isinstance(spec, dict) or set(spec) != {"shape", "encoding", "exceptions"}:
                raise DeltaError(f"config 'tensors' entry {name!r} must have exactly 'shape', 'encoding' and "
                                 "'exceptions'")
            for key in ("encoding", "exceptions"):
                if spec[key] not in ENCODINGS and not (key == "exceptions" and spec[key] is None):
                    raise DeltaError(f"config 'tensors' entry {name!r} has unknown {key} {spec[key]!r}")
            tensors[name] = TensorLayout(_shape(f"tensors.{name}", spec["shape"]), spec["encoding"],
                                         spec["exceptions"])
        return cls(
            method=_str(raw, "method"),
            base_fingerprint=_str(raw, "base_fingerprint"),
            base_model=_str(raw, "base_model"),
            hparams=raw["hparams"],
            dense_patterns=tuple(patterns),
            tensors=tensors,
            dense={name: _shape(f"dense.{name}", s) for name, s in _obj(raw, "dense").items()},
            num_elements=_int(raw, "num_elements"),
            num_changed=_int(raw, "num_changed"),
            num_exceptions=_int(raw, "num_exceptions"),
            num_dense=_int(raw, "num_dense"),
            tensors_sha256=_str(raw, "tensors_sha256"),
            format_version=version,
            base_files=base_files,
        )


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeltaError(f"config key {key!r} must be a non-negative integer, got {value!r}")
    return value


def _str(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise DeltaError(f"config key {key!r} must be a string, got {value!r}")
    return value


def _obj(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw[key]
    if not isinstance(value, dict):
        raise DeltaError(f"config key {key!r} must be an object")
    return value


def _shape(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise DeltaError(f"config {where}: shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


