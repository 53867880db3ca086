"""Using a finished run: its sparse delta against the base (`export_delta`), base + delta as a Hugging
Face model folder (`apply_delta`), and several runs' deltas merged into one change (`merge_runs`)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from childtune.delta import CONFIG_FILE, DeltaError, SparseDelta
from childtune.fileio import write_json
from childtune.models.folders import VLM_TYPE, model_type
from childtune.outputs import check_target
from childtune.training.config import TrainConfig
from childtune.training.models import base_files, model_folder, preprocessor, quiet_transformers, weights_dtype
from childtune.training.runfolder import RunFolder


def export_delta(run: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> SparseDelta:
    """The sparse delta of a finished run against its base model, written to `output`.

    A strict run saved one already (`delta/`); for a run that kept its whole model, the delta is
    extracted here against the base named in its config.json (dense for full fine-tuning, but exact).
    """
    with _exporting(run, output, overwrite, "delta") as (delta, work):
        delta.save(work)
    return delta


def export_shira(run: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False):
    """The run's delta as a peft SHiRA adapter in `output` (`childtune.training.shira` says how); its plan."""
    from childtune.training.shira import write_shira

    with _exporting(run, output, overwrite, "adapter") as (delta, work):
        path = model_folder(delta.config.base_model)
        return write_shira(delta, base_for(delta, path)[1], work, str(path))


@contextlib.contextmanager
def _exporting(run: str | os.PathLike, output: str | os.PathLike, overwrite: bool, kind: str):
    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.json)")
    with RunFolder(output, overwrite, kind=kind, reads=[run]) as work:
        yield _run_delta(run), work


def merge_runs(runs: list[str | os.PathLike], output: str | os.PathLike, *, how: str, density: float = 1.0,
               weights: list[float] | None = None, seed: int = 0, overwrite: bool = False) -> dict[str, SparseDelta]:
    """The deltas of finished runs on one base, each trained on its own task, merged by `how`
    (`delta.task_merge`): `output/<task>/` is the merged change plus that task's own head, a delta that
    `apply` turns into the task's model; `output/merge.json` says how it was made. Returns them by task."""
    from childtune.delta.sparse import describe
    from childtune.delta.task_merge import merge_tasks

    folders = [Path(r) for r in runs]
    for run in folders:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run} is not a run folder (no config.json)")
    names = [_task_name(run) for run in folders]
    if len(set(names)) < len(names):  # two runs of one task: named by their folders instead
        names = [run.resolve().name for run in folders]
    if len(set(names)) < len(names):
        raise DeltaError(f"the runs' tasks and folder names both repeat ({', '.join(names)}): rename a folder")
    with RunFolder(output, overwrite, kind="merged delta", reads=folders) as work:
        deltas = [_run_delta(run) for run in folders]
        entries = merge_tasks(deltas, how, density=density, weights=weights, seed=seed)
        merged = {}
        for name, delta in zip(names, deltas, strict=True):
            c = delta.config
            merged[name] = SparseDelta(describe(
                entries, delta.dense, method=f"{how}({','.join(d.config.method for d in deltas)})",
                hparams=c.hparams, base_model=c.base_model, base_fingerprint=c.base_fingerprint,
                base_files=c.base_files, dense_patterns=c.dense_patterns, num_elements=c.num_elements),
                entries, delta.dense)
            merged[name].save(work / name)
        write_json(work / "merge.json", {"how": how, "density": density, "weights": weights, "seed": seed,
                                         "tasks": {n: str(r.resolve()) for n, r in zip(names, folders, strict=True)}})
    return merged


def _task_name(run: Path) -> str:
    config = TrainConfig.load_json(run / "config.json")
    return config.task if config.train_file is None and config.task else Path(config.train_file or run).stem


def _run_delta(run: Path) -> SparseDelta:
    import transformers

    if (run / "delta").is_dir():
        delta = SparseDelta.load(run / "delta")
    elif (run / "model").is_dir():
        config = TrainConfig.load_json(run / "config.json")
        if run_kind(run) == "generation":  # a causal LM: its own head, tied to the embeddings, no labels
            with quiet_transformers():
                tuned = transformers.AutoModelForCausalLM.from_pretrained(run / "model", local_files_only=True)
                base = transformers.AutoModelForCausalLM.from_pretrained(
                    model_folder(config.model), **weights_dtype(config.dtype), local_files_only=True)
            head = {"num_labels": 0, "kind": "generation", "label_names": []}
        else:
            with quiet_transformers():
                tuned = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model",
                                                                                        local_files_only=True)
                base = transformers.AutoModelForSequenceClassification.from_pretrained(
                    model_folder(config.model), num_labels=tuned.config.num_labels, **weights_dtype(config.dtype),
                    local_files_only=True)
            head = {"num_labels": tuned.config.num_labels, "kind": "regression" if tuned.config.num_labels == 1
                    else "classification", "label_names": [tuned.config.id2label[i] for i in
                                                            range(tuned.config.num_labels)]}
        delta = SparseDelta.from_training(base.state_dict(), tuned, method=config.method,
                                          hparams={**config.to_dict(), **head}, base_model=config.model,
                                          base_files=base_files(model_folder(config.model)))
    else:
        raise FileNotFoundError(f"{run} holds no saved weights (neither delta/ nor model/); was it run with "
                                "--save none?")
    return delta


def apply_delta(delta_dir: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None,
                overwrite: bool = False, task: str | None = None) -> Path:
    """Base model + delta, saved as a Hugging Face model folder (with the base's tokenizer) in `output`.
    A multi-task run's folder (`childtune.multitask`) needs the `task`: its shared delta, then the task's."""

    source = Path(delta_dir)
    shared = _shared_delta(source, task)
    delta_dir = source / "tasks" / str(task) / "delta" if shared else \
        source / "delta" if (source / "delta").is_dir() else source
    with RunFolder(output, overwrite, kind="model", reads=[source]) as work:
        delta = SparseDelta.load(delta_dir)
        name = model or delta.config.base_model
        if not name:
            raise DeltaError("the delta names no base model; pass --model")
        path = model_folder(name)
        check_target(output, reads=[path])  # the base model, known once the delta names it
        tokenizer, tuned = base_for(delta, path)
        if shared:  # the task's delta was made on base + shared change, and its fingerprint says so
            SparseDelta.load(source / "shared" / "delta").apply(tuned)
        delta.apply(tuned)
        with quiet_transformers():
            tuned.save_pretrained(work)
            tokenizer.save_pretrained(work)
            delta_path = os.path.relpath(delta_dir.resolve(), Path(output).resolve())  # relative to this folder
            write_json(work / "childtune.json", {"delta": delta_path, "base_model": name,
                                                 "method": delta.config.method,
                                                 "changed_params": delta.config.num_changed})
    return Path(output)


def _shared_delta(source: Path, task: str | None) -> bool:
    """Whether `source` is a multi-task run whose `task` to apply (refused: a task it lacks, or none given
    for one; a task given for any other folder)."""
    tasks = sorted(p.parent.name for p in (source / "tasks").glob("*/delta")) if (source / "shared").is_dir() else []
    if not tasks:
        if task is not None:
            raise DeltaError(f"--task {task}: {source} is not a multi-task run (train --tasks); apply it without "
                             "--task")
        return False
    if task not in tasks:
        raise DeltaError(f"{source} is a multi-task run: pass --task, one of {', '.join(tasks)}"
                         + (f" (it has no task {task!r})" if task else ""))
    return True


def run_kind(run: Path) -> str:
    """What a run folder's model is for: its metrics' `kind`, else its config's, else classification."""
    for name in ("metrics.json", "config.json"):
        try:
            kind = json.loads((run / name).read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            continue
        if kind in ("classification", "regression", "generation"):
            return kind
    return "classification"


def base_for(delta: SparseDelta, path: Path):
    """Tokenizer and the base model a delta applies to, built as its task needs: the causal LM for a
    generation delta, else a classifier with the delta's head (labels, names, regression or not). The
    folder must hold the tokenizer and settings the delta was made with (`check_base_files`)."""
    import transformers

    check_base_files(delta, path)
    if model_type(path) == VLM_TYPE:
        raise DeltaError(f"{path} is a vision-language model assembled from its parts, which no model folder "
                         "holds: apply its delta in Python (childtune.models.vlm.load, then SparseDelta.apply)")
    hparams = head_of(delta)
    with quiet_transformers():
        tokenizer = preprocessor(path)
        if hparams.get("kind") == "generation":
            return tokenizer, transformers.AutoModelForCausalLM.from_pretrained(
                path, **weights_dtype(hparams.get("dtype")), local_files_only=True)
        if not hparams.get("num_labels") and not delta.dense:
            raise DeltaError("the delta records no task head (num_labels) to build a classifier with")
        labels: dict[str, Any] = {"num_labels": hparams.get("num_labels") or next(iter(delta.dense.values())).shape[0]}
        if hparams.get("label_names"):
            labels["id2label"] = dict(enumerate(hparams["label_names"]))
            labels["label2id"] = {n: i for i, n in enumerate(hparams["label_names"])}
        if hparams.get("kind") == "regression":
            labels["problem_type"] = "regression"
        return tokenizer, transformers.AutoModelForSequenceClassification.from_pretrained(
            path, **labels, **weights_dtype(hparams.get("dtype")), local_files_only=True)


def check_base_files(delta: SparseDelta, path: Path) -> None:
    """Refuse a base folder whose tokenizer or architecture settings (`models.base_files`) differ from those
    recorded in the delta: its weights can match the fingerprint exactly while its ids stand for other
    tokens, and `apply` would ship that tokenizer with the tuned weights."""
    recorded = delta.config.base_files
    if not recorded:  # made by childtune before version 2, or from a bare state dict
        warnings.warn(f"the delta records no tokenizer or settings of its base: only {path}'s weights are checked",
                      stacklevel=3)
        return
    found = base_files(path)
    for name in sorted(recorded.keys() | found.keys()):
        if recorded.get(name) != found.get(name):
            how = ("is missing" if name not in found else "is not in the delta's base" if name not in recorded
                   else "differs from the delta's base")
            raise DeltaError(f"wrong base model: {path / name} {how} (the delta was made on "
                             f"{delta.config.base_model or 'an unnamed model'!r}); apply it to the model folder it "
                             "was trained from")


def head_of(delta: SparseDelta) -> dict:
    """The delta's hparams, their task-head fields (`kind`, `num_labels`, `label_names`) type-checked: a
    hand-edited delta_config.json fails as a DeltaError naming the field, not inside transformers."""
    hparams = delta.config.hparams
    kind, num, names = hparams.get("kind"), hparams.get("num_labels"), hparams.get("label_names")
    if kind not in (None, "classification", "regression", "generation"):
        raise DeltaError(f"{CONFIG_FILE} hparams.kind must be classification, regression or generation, got {kind!r}")
    if num is not None and (type(num) is not int or num < 0):
        raise DeltaError(f"{CONFIG_FILE} hparams.num_labels must be a non-negative integer, got {num!r}")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                              or (names and len(names) != num)):
        raise DeltaError(f"{CONFIG_FILE} hparams.label_names must be a list of num_labels ({num!r}) texts, "
                         f"got {names!r}")
    return hparams
