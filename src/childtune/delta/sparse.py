"""Sparse deltas: save only what a fixed-mask run changed, and put it back exactly.

A Child-Tuning run with a fixed child network changes a known fraction `p` of the base weights, plus a
freshly initialised task head. Storing the whole model per task wastes `1/p` times the space; storing
the changed elements as a *delta against the base* costs about `p` of it and can be applied to, reverted
from and merged on the one shared base model, like peft's adapter files but sparse.

Files (a directory, like peft's adapter layout):

* `delta.safetensors`: per changed tensor its flat element indices in whichever encoding is smallest
  (`bitmap/<name>`, `indices/<name>` as int32 or int64, `elias_fano/<name>`, or nothing at all when every
  element changed), `values/<name>` (tuned minus base, in the parameter dtype), the exactness
  exceptions below (`exc_base/`, `exc_tuned/` and their positions among the changed elements, encoded
  the same way as `exc_bitmap/` etc.); and the dense head, stored absolute (`dense/<name>`).
* `delta_config.json`: a `DeltaConfig` (method, hyper-parameters, base model name, fingerprint and files,
  format version, counts, per-tensor shape and encodings, sha256 of the tensor file).

Size. Values cost what the child network costs (`p` of the model). Indices come on top, each tensor's in
the smallest of the encodings in `childtune.indexcodec` (within ~15% of the entropy of a random mask).

Exactness. Float addition does not undo itself: with `d = fl(t - b)`, `fl(b + d)` can miss the tuned
value `t` and `fl(t - d)` can miss the base `b` when an update flips a sign, changes the magnitude a lot or
ends on a signed zero (Sterbenz's lemma only covers `t` within a factor two of `b`). Rather than widen
every value (which would double the file), extraction *checks* both round trips for every changed element
in the parameter dtype and lists the few elements where either fails as exceptions carrying their exact
base and tuned values. Applying computes `w + d` and sets exceptions to `tuned`; reverting computes `w - d`
and sets exceptions to `base`. For every other element the check proved the arithmetic exact, so
apply(base) equals the tuned model and revert(apply(base)) equals the base, bit for bit. Exceptions are
weights near zero that an update dwarfs (about 1% of changed elements for 1e-3 steps on BERT-like
weights); their value slot is not stored (it is `tuned - base`), so each costs ~5 bytes more than a
plain element.
Both operations refuse to start on the wrong model (apply checks the base fingerprint; revert checks the
result and rolls back if it is not the base), so they never leave a half-changed model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from childtune.delta.entry import FLOATS, SparseEntry, difference, extract, flat_view, numel, step
from childtune.delta.errors import DeltaError
from childtune.delta.format import (
    CONFIG_FILE,
    DEFAULT_DENSE,
    TENSORS_FILE,
    DeltaConfig,
    TensorLayout,
    fingerprint,
    state_of,
)
from childtune.delta.indexcodec import ENCODINGS, choose_encoding, decode_indices, encode_indices
from childtune.fileio import atomic_write, write_json
from childtune.layers import matches
from childtune.masks import Masks

_KINDS = {"values", "exc_base", "exc_tuned", "dense", *ENCODINGS[1:], *(f"exc_{e}" for e in ENCODINGS[1:])}




def _label(model: Any) -> str:
    """A model's name for error messages: its hub name when it has one, else its class."""
    name = getattr(model, "name_or_path", "") if isinstance(model, torch.nn.Module) else ""
    return repr(name) if name else f"the given {type(model).__name__}"


# ----------------------------------------------------------------------------------------- the delta


class SparseDelta:
    """A task's change to a base model: sparse entries, a dense head and the config that describes them."""

    def __init__(self, config: DeltaConfig, entries: dict[str, SparseEntry], dense: dict[str, torch.Tensor]):
        self.config = config
        self.entries = entries
        self.dense = dense
        self._head_backups: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = (
            weakref.WeakKeyDictionary())

    # -- making one

    @classmethod
    def from_training(
        cls,
        base_state: Mapping[str, torch.Tensor],
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        method: str,
        hparams: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        dense: Iterable[str] = DEFAULT_DENSE,
        base_files: Mapping[str, str] | None = None,
    ) -> SparseDelta:
        """Delta between `base_state` (pretrained values) and the tuned `model`.

        Parameters matching `dense` are stored whole; every other tensor must exist in the base with the
        same shape and dtype, and non-float tensors must be unchanged. Tied weights are stored once.
        `base_files` (file name -> sha256) records what else defines the base (`DeltaConfig.base_files`).
        """
        dense = tuple(dense)
        hparams = dict(hparams or {})
        try:
            json.dumps(hparams)
        except (TypeError, ValueError) as err:
            raise DeltaError(f"hparams must be plain JSON values: {err}") from None
        tuned = state_of(model)
        names = {n for n in tuned if not matches(n, dense)}
        base_names = {n for n in base_state if not matches(n, dense)}
        if names != base_names:
            raise DeltaError(f"base and tuned model differ in tensors: {sorted(names ^ base_names)[:5]}")
        entries, heads, seen = {}, {}, set()
        for name, t in tuned.items():
            if matches(name, dense):
                heads[name] = t.detach().cpu().clone()
                continue
            storage = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
            if storage in seen and t.numel():
                continue  # a tied alias of a tensor already compared
            seen.add(storage)
            b = base_state[name]
            if b.shape != t.shape or b.dtype != t.dtype:
                raise DeltaError(f"{name}: base is {b.dtype}{tuple(b.shape)}, tuned is {t.dtype}{tuple(t.shape)}")
            if t.dtype not in FLOATS:
                if not torch.equal(b.cpu(), t.detach().cpu()):
                    raise DeltaError(f"{name}: non-float tensor {t.dtype} changed; only float weights can")
                continue
            entry = extract(name, b, t)
            if entry is not None:
                entries[name] = entry
        config = describe(
            entries,
            heads,
            method=method,
            hparams=hparams,
            base_model=base_model if base_model is not None else getattr(model, "name_or_path", "") or "",
            base_fingerprint=fingerprint(base_state, dense),
            base_files=dict(base_files or {}),
            dense_patterns=dense,
            num_elements=sum(base_state[n].numel() for n in base_names if base_state[n].dtype in FLOATS),
        )
        return cls(config, entries, heads)

    # -- using one

    def apply(self, model: torch.nn.Module | Mapping[str, torch.Tensor], *, check_base: bool = True) -> None:
        """Add the delta to `model` in place and load the dense head; exact on the base (module docstring).

        `check_base=False` skips the fingerprint check to stack this delta on a model that already carries
        another one (see `merge`); the base check is what guarantees the exact result.
        """
        state = state_of(model)
        self._check_target(state, model)
        if check_base:
            found = fingerprint(state, self.config.dense_patterns)
            if found != self.config.base_fingerprint:
                raise DeltaError(
                    f"wrong base model: this delta was made on {self.config.base_model or 'an unnamed model'!r} "
                    f"(fingerprint {self.config.base_fingerprint[:12]}), but {_label(model)} has fingerprint "
                    f"{found[:12]}; apply it to the exact weights it was trained from"
                )
        with torch.no_grad():
            updates = [(flat_view(state[n]), e, step(e, flat_view(state[n]), True)) for n, e in self.entries.items()]
            if isinstance(model, torch.nn.Module):
                self._head_backups[model] = {n: state[n].detach().clone() for n in self.dense}
            for flat, entry, new in updates:
                flat[entry.indices.to(flat.device)] = new
            for name, value in self.dense.items():
                state[name].copy_(value)

    def revert(self, model: torch.nn.Module | Mapping[str, torch.Tensor], *, check_base: bool = True) -> None:
        """Subtract the delta from `model` in place, restoring the base bit for bit.

        With `check_base` the result is fingerprinted and, if it is not the base (the model was not base +
        this delta), the change is rolled back and DeltaError raised. The head returns to what `apply`
        replaced when this object applied it to this model; otherwise it is left as is.
        """
        state = state_of(model)
        self._check_target(state, model)
        with torch.no_grad():
            updates = [(flat_view(state[n]), e, step(e, flat_view(state[n]), False)) for n, e in self.entries.items()]
            saved = []
            for flat, entry, new in updates:
                idx = entry.indices.to(flat.device)
                saved.append((flat, idx, flat[idx]))
                flat[idx] = new
            if check_base:
                found = fingerprint(state, self.config.dense_patterns)
                if found != self.config.base_fingerprint:
                    for flat, idx, old in saved:
                        flat[idx] = old
                    raise DeltaError(
                        f"revert would not give back base {self.config.base_model or 'an unnamed model'!r} "
                        f"(got fingerprint {found[:12]}, expected {self.config.base_fingerprint[:12]}): "
                        f"{_label(model)} is not that base plus this delta; nothing was changed"
                    )
            backup = self._head_backups.pop(model, None) if isinstance(model, torch.nn.Module) else None
            for name, value in (backup or {}).items():
                state[name].copy_(value)

    def _check_target(self, state: Mapping[str, torch.Tensor], model: Any) -> None:
        """Every target tensor exists with the right shape and dtype, and no storage is written twice."""
        seen = set()
        for name, entry in self.entries.items():
            target = state.get(name)
            if target is None:
                raise DeltaError(f"{_label(model)} has no tensor {name!r} that the delta changes")
            if tuple(target.shape) != entry.shape:
                raise DeltaError(f"{name}: delta is for shape {entry.shape}, model has {tuple(target.shape)}")
            if target.dtype not in FLOATS or (entry.exc_pos.numel() and entry.exc_base.dtype != target.dtype):
                raise DeltaError(f"{name}: delta exceptions are {entry.exc_base.dtype}, model has {target.dtype}")
            storage = (target.untyped_storage().data_ptr(), target.storage_offset())
            if storage in seen:
                raise DeltaError(f"{name}: shares storage with another changed tensor (tied weights)")
            seen.add(storage)
        for name, value in self.dense.items():
            target = state.get(name)
            if target is None or target.shape != value.shape:
                got = None if target is None else tuple(target.shape)
                raise DeltaError(f"dense head {name!r}: delta has shape {tuple(value.shape)}, model has {got}")

    def masks(self, include_dense: bool = False) -> Masks:
        """The child network as masks (name -> bool tensor): True where the run changed an element.

        The dense head is trained whole, so it is all True when `include_dense`, absent otherwise.
        """
        out: Masks = {}
        for name, entry in self.entries.items():
            mask = torch.zeros(numel(entry.shape), dtype=torch.bool)
            mask[entry.indices] = True
            out[name] = mask.view(entry.shape)
        if include_dense:
            out.update({name: torch.ones_like(value, dtype=torch.bool) for name, value in self.dense.items()})
        return out

    def astype(self, dtype: torch.dtype) -> SparseDelta:
        """A copy with the delta values cast to `dtype`; indices and exact exceptions are untouched.

        Narrowing loses the exactness of non-exception elements: apply then gives base + the rounded
        delta, and `revert` refuses (rolling back) wherever that cannot be undone exactly. Values that
        overflow `dtype` are refused rather than stored as infinities.
        """
        if dtype not in FLOATS:
            raise DeltaError(f"delta values must be a float dtype, got {dtype}")
        entries = {n: replace(e, values=e.values.to(dtype)) for n, e in self.entries.items()}
        for name, entry in entries.items():
            if not torch.isfinite(entry.values).all():
                raise DeltaError(f"{name}: delta values overflow {dtype}")
        return SparseDelta(replace(self.config, tensors_sha256=""), entries, dict(self.dense))

    # -- files

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `delta.safetensors` then `delta_config.json`, each atomically (temp file + os.replace).

        A crash leaves each file either old or new, never partial; a crash between the two leaves a new
        tensor file beside an old config, which `load` refuses by checksum rather than misreading.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in self.entries.items():
            layout = self.config.tensors[name]
            stored: dict[str, np.ndarray | torch.Tensor | None] = {
                layout.encoding: encode_indices(layout.encoding, entry.indices.numpy(), numel(entry.shape))}
            keep = torch.ones(entry.indices.numel(), dtype=torch.bool)
            keep[entry.exc_pos] = False  # an exception's value is tuned - base: not stored twice
            if layout.exceptions is not None:
                pos = encode_indices(layout.exceptions, entry.exc_pos.numpy(), entry.indices.numel())
                stored.update({f"exc_{layout.exceptions}": pos, "exc_base": entry.exc_base,
                               "exc_tuned": entry.exc_tuned})
            stored["values"] = entry.values[keep]
            for kind, array in stored.items():
                if array is not None:
                    tensors[f"{kind}/{name}"] = torch.as_tensor(array).contiguous()
        for name, value in self.dense.items():
            tensors[f"dense/{name}"] = value.contiguous()
        data = safetensors.torch.save(tensors, metadata={"format": "childtune-delta"})
        self.config = replace(self.config, tensors_sha256=hashlib.sha256(data).hexdigest())
        atomic_write(directory / TENSORS_FILE, data)
        write_json(directory / CONFIG_FILE, self.config.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SparseDelta:
        """Read and fully validate a delta directory; any problem is a DeltaError naming it."""
        directory = Path(directory)
        for file in (CONFIG_FILE, TENSORS_FILE):
            if not (directory / file).is_file():
                raise DeltaError(f"missing {file} in {directory}")
        try:
            raw = json.loads((directory / CONFIG_FILE).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise DeltaError(f"{CONFIG_FILE} is not valid JSON: {err}") from None
        config = DeltaConfig.from_dict(raw)
        data = (directory / TENSORS_FILE).read_bytes()
        if hashlib.sha256(data).hexdigest() != config.tensors_sha256:
            raise DeltaError(f"{TENSORS_FILE} does not match the checksum in {CONFIG_FILE} (truncated or corrupted)")
        try:
            tensors = safetensors.torch.load(data)
        except Exception as err:  # the parser's own error types vary by version: report them all as ours
            raise DeltaError(f"{TENSORS_FILE} is not a readable safetensors file: {err}") from None
        entries, dense = _parse(config, tensors)
        return cls(config, entries, dense)


def _parse(config: DeltaConfig, tensors: dict[str, torch.Tensor]
           ) -> tuple[dict[str, SparseEntry], dict[str, torch.Tensor]]:
    """Check tensors against the config (names, kinds, dtypes, counts, finiteness) and decode indices."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in _KINDS or not name:
            raise DeltaError(f"unexpected tensor {key!r} in {TENSORS_FILE}")
        grouped.setdefault(name, {})[kind] = tensor
    dense: dict[str, torch.Tensor] = {}
    for name, shape in config.dense.items():
        group = grouped.pop(name, {})
        value = group.get("dense")
        if set(group) != {"dense"} or value is None or tuple(value.shape) != shape or value.dtype not in FLOATS:
            raise DeltaError(f"dense head {name!r} is missing or not a float tensor of shape {shape}")
        if not torch.isfinite(value).all():
            raise DeltaError(f"dense head {name!r} has non-finite values")
        dense[name] = value
    entries: dict[str, SparseEntry] = {}
    for name, layout in config.tensors.items():
        entries[name] = _parse_entry(name, layout, grouped.pop(name, {}))
    if grouped:
        raise DeltaError(f"{TENSORS_FILE} holds tensors the config does not list: {sorted(grouped)[:5]}")
    counts = (
        sum(e.indices.numel() for e in entries.values()),
        sum(e.exc_pos.numel() for e in entries.values()),
        sum(v.numel() for v in dense.values()),
    )
    if counts != (config.num_changed, config.num_exceptions, config.num_dense) or counts[0] > config.num_elements:
        raise DeltaError(f"counts in {CONFIG_FILE} do not match {TENSORS_FILE}")
    return entries, dense


def _layout(name: str, entry: SparseEntry) -> TensorLayout:
    k, m = entry.indices.numel(), entry.exc_pos.numel()
    exceptions = choose_encoding(name, k, m) if m else None
    return TensorLayout(entry.shape, choose_encoding(name, numel(entry.shape), k), exceptions)


def _parse_entry(name: str, layout: TensorLayout, arrays: dict[str, torch.Tensor]) -> SparseEntry:
    """One tensor's arrays, checked (kinds, dtypes, counts, finiteness) and decoded."""
    expected = {"values"} | ({layout.encoding} - {"all"})
    if layout.exceptions is not None:
        expected |= {"exc_base", "exc_tuned"} | ({f"exc_{layout.exceptions}"} - {"exc_all"})
    if set(arrays) != expected:
        raise DeltaError(f"{name}: stored arrays {sorted(arrays)} do not fit its layout {layout}")
    if any(a.dim() != 1 for a in arrays.values()):
        raise DeltaError(f"{name}: stored arrays must be one-dimensional")
    stored = arrays["values"]
    base = arrays.get("exc_base", torch.zeros(0, dtype=stored.dtype))
    tuned = arrays.get("exc_tuned", base)
    if stored.dtype not in FLOATS or base.dtype not in FLOATS or tuned.dtype != base.dtype:
        raise DeltaError(f"{name}: values and exceptions must be floats (exceptions of one dtype)")
    if base.numel() != tuned.numel() or (layout.exceptions is not None and not base.numel()):
        raise DeltaError(f"{name}: exception base and tuned values differ in count or are missing")
    m = base.numel()
    k = stored.numel() + m
    if k == 0:
        raise DeltaError(f"{name}: listed as changed but has no values")
    n = numel(layout.shape)
    indices = decode_indices(name, layout.encoding, _numpy(arrays.get(layout.encoding)), n, k)
    pos = torch.zeros(0, dtype=torch.int64)
    if layout.exceptions is not None:
        exc_array = _numpy(arrays.get(f"exc_{layout.exceptions}"))
        pos = torch.from_numpy(decode_indices(f"{name} exceptions", layout.exceptions, exc_array, k, m))
    values = torch.empty(k, dtype=stored.dtype)
    keep = torch.ones(k, dtype=torch.bool)
    keep[pos] = False
    values[keep] = stored
    values[pos] = difference(tuned, base).to(stored.dtype)
    if not (torch.isfinite(values).all() and torch.isfinite(base).all() and torch.isfinite(tuned).all()):
        raise DeltaError(f"{name}: values must be finite")
    return SparseEntry(layout.shape, torch.from_numpy(indices), values, pos, base, tuned)


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    """A stored integer array as numpy (safetensors gives torch tensors; the codec works in numpy)."""
    return None if tensor is None or tensor.dtype not in (torch.uint8, torch.int32, torch.int64) else tensor.numpy()


def describe(entries: Mapping[str, SparseEntry], dense: Mapping[str, torch.Tensor], **meta: Any) -> DeltaConfig:
    """Config whose layout and counts follow from the entries, so the two can never disagree."""
    return DeltaConfig(
        tensors={n: _layout(n, e) for n, e in entries.items()},
        dense={n: tuple(v.shape) for n, v in dense.items()},
        num_changed=sum(e.indices.numel() for e in entries.values()),
        num_exceptions=sum(e.exc_pos.numel() for e in entries.values()),
        num_dense=sum(v.numel() for v in dense.values()),
        **meta,
    )
