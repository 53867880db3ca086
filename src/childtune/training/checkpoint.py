"""Resumable runs: one checkpoint per run directory, replaced atomically, verified when read.

A resumed run must end where the uninterrupted one would have, bit for bit, so a checkpoint holds
everything the next step depends on: the weights (safetensors), the optimizer state (which, for a
`ChildOptimizer`, carries the step count and the strategy's state: ID3's and Child-Tuning_D's chosen
masks), the LR scheduler, the position in the data (epoch and batch; the order itself is a function of
(seed, epoch), see `distributed.ShardedSampler`) and every rank's RNG states (dropout). Child-Tuning_F
needs no generator state: its mask is a function of (seed, step).

Layout of `<run_dir>/checkpoint/`: `model.safetensors` (the `model` entry), `state.pt` (every other
non-scalar entry, read back with `torch.load(weights_only=True)` so a crafted file cannot run code) and
`meta.json` (format version, the scalar entries such as step/epoch/batch, and each file's sha256).

A crash must never cost the last good checkpoint. The new one is written into a temporary folder
beside it and fsynced; only then is the old one renamed to `checkpoint.old` and the new one renamed
into place. At every instant either `checkpoint/` is complete, or it is absent and `checkpoint.old/`
is complete, and `load_checkpoint` reads whichever that is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from childtune.fileio import atomic_write, sha256_file
from childtune.models import quantized
from childtune.training import distributed
from childtune.training.config import NOT_SETTINGS, TrainConfig

FORMAT_VERSION = 2
"""2: the scalars (step, epoch, batch, ...) are covered by a sha256 too (1 had only the files')."""
CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint.old"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_TEMP_PREFIX = ".checkpoint-"
_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt, named with what is wrong and where."""


# ---------------------------------------------------------------------------------------------- writing


def save_checkpoint(run_dir: str | Path, state: Mapping[str, Any]) -> Path:
    """Replace `<run_dir>/checkpoint` with `state`, atomically; returns the checkpoint folder.

    `state["model"]`, if present, is a name -> tensor mapping (a `state_dict`, or a delta's tensors);
    scalar entries (step, epoch, batch, ...) are kept readable in meta.json; everything else (optimizer,
    scheduler, RNG states) goes through `torch.save`. Call it on one rank (`distributed.main_only`).
    """
    run_dir = Path(run_dir)
    files, scalars = _serialise(state)  # fails on bad input before anything on disk changes
    meta = {
        "format": FORMAT_VERSION,
        "scalars": scalars,
        "scalars_sha256": _digest(scalars),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    files[META_FILE] = json.dumps(meta, indent=2, sort_keys=True).encode()
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(_TEMP_PREFIX + "*"):  # left by a write that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=run_dir))
    final, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    try:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        _fsync_dir(tmp)
        if final.exists():
            # checkpoint/ is complete, so an old copy beside it is stale: replace it with the current one
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(final, previous)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return final


def _serialise(state: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a mapping, got {type(state).__name__}")
    files: dict[str, bytes] = {}
    scalars = {k: v for k, v in state.items() if k != "model" and isinstance(v, _SCALARS)}
    rest = {k: v for k, v in state.items() if k != "model" and k not in scalars}
    if "model" in state:
        files[MODEL_FILE] = _model_bytes(state["model"])
    if rest:
        buffer = io.BytesIO()
        torch.save(rest, buffer)
        files[STATE_FILE] = buffer.getvalue()
    json.dumps(scalars, allow_nan=True)  # a non-string key fails here, not half-way through the write
    return files, scalars


def _digest(scalars: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(scalars, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _model_bytes(model: Any) -> bytes:
    if not isinstance(model, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise TypeError("state['model'] must map parameter names to tensors (a state_dict)")
    tensors, seen = {}, set()
    for name, tensor in model.items():
        t = tensor.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        # safetensors refuses tensors sharing memory (tied weights): store each copy on its own
        tensors[name] = t.clone() if key in seen else t
        seen.add(key)
    return safetensors.torch.save(tensors)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry, not only the file, must reach the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows) have nothing to fsync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- reading


def checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The folder `load_checkpoint` would read: `checkpoint/`, else a complete `checkpoint.old/`."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, PREVIOUS):
        if (run_dir / name / META_FILE).is_file():
            return run_dir / name
    return None


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state given to the last completed `save_checkpoint`, after checking every file's sha256."""
    run_dir = Path(run_dir)
    folder = checkpoint_dir(run_dir)
    if folder is None:
        if (run_dir / CHECKPOINT).exists():
            raise CheckpointError(f"{run_dir / CHECKPOINT} has no {META_FILE}: it is incomplete and cannot be used")
        raise CheckpointError(f"no checkpoint in {run_dir}: nothing to resume from")
    meta = _meta(folder)
    for name, digest in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} is corrupt: its sha256 does not match {META_FILE}")
    state: dict[str, Any] = dict(meta["scalars"])
    try:
        if STATE_FILE in meta["files"]:
            state.update(torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True))
        if MODEL_FILE in meta["files"]:
            state["model"] = safetensors.torch.load_file(folder / MODEL_FILE, device=str(map_location))
    except Exception as err:  # hashes matched, so the writer itself stored something unreadable
        raise CheckpointError(f"{folder} cannot be read: {type(err).__name__}: {str(err)[:200]}") from err
    return state


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this childtune reads {FORMAT_VERSION}")
    files, scalars = meta.get("files"), meta.get("scalars")
    if (not isinstance(files, dict) or not isinstance(scalars, dict)
            or not set(files) <= {MODEL_FILE, STATE_FILE}
            or not all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{path} does not describe a childtune checkpoint")
    if meta.get("scalars_sha256") != _digest(scalars):
        raise CheckpointError(f"{path} is corrupt: its counters (step, epoch, ...) do not match their sha256")
    return meta


# ----------------------------------------------------------------------------------------- RNG states


def capture_rng() -> list[dict[str, Any]]:
    """Every rank's RNG states (torch, CUDA, Python, NumPy), in rank order. Collective: call on all ranks.

    Each rank draws its own dropout masks, so a resume must restore each rank's own stream, while
    only rank 0 writes the checkpoint.
    """
    mine: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state_all()
    return distributed.gather(mine)


def restore_rng(states: list[dict[str, Any]]) -> None:
    """Put back this rank's RNG states from `capture_rng()`'s list."""
    me = distributed.info()
    if len(states) != me.world_size:
        raise CheckpointError(
            f"the checkpoint holds RNG states of {len(states)} rank(s) but this job has {me.world_size}: "
            f"resume with the same number of processes"
        )
    mine = states[me.rank]
    torch.set_rng_state(mine["torch"])
    random.setstate(_tuples(mine["python"]))
    saved = mine["numpy"]
    key = saved["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**saved, "state": {**saved["state"], "key": key}})
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])


def _numpy_state() -> dict[str, Any]:
    """NumPy's legacy global generator state, with its array as a tensor so `weights_only` loads it."""
    state = np.random.get_state(legacy=False)
    return {**state, "state": {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}}


def _tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples getstate gave; a round trip may hand back lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


# ------------------------------------------------------------------------------ the training loop's hook
# A resume under other settings (anything but `config.NOT_SETTINGS`) would not be the same run.


def snapshot(state: Any) -> dict[str, Any]:
    """What `train.TrainState` holds that the next step depends on. Collective (RNG): call on all ranks."""
    return {
        "model": quantized.checkpoint_state(distributed.unwrap(state.model)),  # (a quantized base's child only)
        "optimizer": state.optimizer.state_dict(),  # includes the step count and the strategy's state
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch": state.batch,
        "skipped": state.skipped,
        "log_mark": state.log.mark() if state.log is not None else None,
        "config": state.config.to_dict(),
        "rng": capture_rng(),
    }


def check_settings(config: TrainConfig, saved: Mapping[str, Any]) -> None:
    """Refuse a checkpoint taken under other settings than `config`'s (any field outside `NOT_SETTINGS`),
    naming the first that differs."""
    now, then = config.to_dict(), saved.get("config", {})
    changed = sorted(k for k in now.keys() | then.keys() if k not in NOT_SETTINGS and now.get(k) != then.get(k))
    if changed:
        key = changed[0]
        raise CheckpointError(f"the checkpoint was taken with {key}={then.get(key)!r}, this run has "
                              f"{key}={now.get(key)!r}: a resumed run must use the interrupted run's settings")


def restore(state: Any, saved: Mapping[str, Any]) -> None:
    """Put a snapshot back into `state`, refusing one taken under different settings."""
    check_settings(state.config, saved)
    for key in ("step", "epoch", "batch", "skipped"):
        value = saved.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"the checkpoint's {key} must be a non-negative integer, got {value!r}")
    mark = saved.get("log_mark")
    if mark is not None and (isinstance(mark, bool) or not isinstance(mark, int) or mark < 0):
        raise CheckpointError(f"the checkpoint's log_mark must be a non-negative integer or null, got {mark!r}")
    if not isinstance(saved.get("model"), Mapping) or "optimizer" not in saved or "rng" not in saved:
        raise CheckpointError("the checkpoint lacks the model, optimizer or RNG state a resume needs")
    try:
        quantized.load_checkpoint_state(distributed.unwrap(state.model), saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"the checkpoint does not fit this run: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}") from None
    state.step, state.epoch, state.batch = saved["step"], saved["epoch"], saved["batch"]
    state.skipped = saved.get("skipped", 0)
    if state.log is not None:
        state.log.rewind(saved.get("log_mark"))
    restore_rng(saved["rng"])
    state.resumed = True


class Checkpointer:
    """A `train` callback: save the run every `every` updates; with `resume`, first restore the last save.

    Checkpoints go to `directory` (default: the run's working folder). Rank 0 writes, every rank
    restores. The checkpoint is deleted when the run completes (`keep=False`): the finished run's
    weights are saved by the run itself, and a model plus AdamW's moments is three models' worth.
    """

    def __init__(self, every: int, *, resume: bool = False, directory: str | Path | None = None,
                 keep: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint interval must be a positive number of steps, got {every!r}")
        self.every, self.resume, self.keep = every, resume, keep
        self.directory = Path(directory) if directory is not None else None
        self._saved_at: int | None = None

    def _dir(self, state: Any) -> Path:
        folder = self.directory or state.workdir
        if folder is None:
            raise CheckpointError("checkpointing needs a folder: give the run an output folder or a directory")
        return Path(folder)

    def on_start(self, state: Any) -> None:
        folder = self._dir(state)
        if self.resume:
            restore(state, load_checkpoint(folder))
            self._saved_at = state.step

    def on_step(self, state: Any) -> None:
        if not state.step or state.step % self.every or state.step == self._saved_at:  # skipped: no new step
            return
        saved = snapshot(state)
        distributed.main_only(save_checkpoint)(self._dir(state), saved)
        self._saved_at = state.step

    def on_end(self, state: Any, metrics: Mapping[str, Any]) -> None:
        if not self.keep:
            folder = self._dir(state)
            distributed.main_only(remove_checkpoint)(folder)


def remove_checkpoint(run_dir: Path) -> None:
    """Delete a run folder's checkpoint (and the copy a crash mid-save may have left): a finished run needs none."""
    for name in (CHECKPOINT, PREVIOUS):
        shutil.rmtree(run_dir / name, ignore_errors=True)
