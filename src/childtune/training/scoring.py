"""Scoring a model folder on a task without training it: what `childtune evaluate` runs.

A model made by `childtune apply` (a run's delta on its base, or a task's share of `childtune merge`), a
run's saved `model/`, or any Hugging Face folder is scored as a run scores itself at its end: the same
task loading, batching and metrics (`training.evaluate`), on the dev and test splits. `score_run` scores
a finished run folder as it would ship, each of a multi-task run's tasks on its own.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from childtune.training.config import ConfigError, TrainConfig
from childtune.training.evaluate import evaluate
from childtune.training.export import apply_delta
from childtune.training.inputs import load_data
from childtune.training.models import in_weight_dtype, load_model, run_device, task_collate


def score(config: TrainConfig) -> dict[str, Any]:
    """Dev and test metrics of `config.model` on `config`'s task, in `config.dtype` (fp32 when unset)."""
    task = load_data(config)
    tokenizer, model = load_model(config, task.spec)
    model = in_weight_dtype(config, model.to(run_device(config)))
    collate = task_collate(config, tokenizer, model, task.spec.kind)
    dev = evaluate(model, task.dev, task.spec, collate, config, "eval dev")
    test = evaluate(model, task.test, task.spec, collate, config, "eval test") if task.test else None
    return {"task": task.spec.name, "model": config.model, "primary_metric": task.spec.metric,
            "dev_examples": len(task.dev), "test_examples": len(task.test), "dev": dev, "test": test}


def score_run(run: str | Path, *, progress: bool = True, device: str = "auto") -> dict[str, dict[str, Any]]:
    """Each task of a finished run folder (`train --output`), scored on that task's dev and test splits as a
    user would ship the run: its saved `model/`, or its base with its delta applied (a multi-task run: the
    base, the shared delta and the task's own, with the task's head). A quantized run (`--base-bits`) is
    scored merged into its full-precision base, as `apply` writes it. Task name -> `score`'s result."""
    run = Path(run)
    if not (run / "config.json").is_file() or not any((run / p).is_dir() for p in ("model", "delta", "shared")):
        raise ConfigError(f"{run} is not a finished run folder (config.json and model/, delta/ or shared/)")
    saved = replace(TrainConfig.load_json(run / "config.json"), progress=progress, device=device, base_bits=None,
                    output=None)
    if (run / "model").is_dir():
        return {saved.task or run.name: score(replace(saved, model=str(run / "model")))}
    scores = {}
    with tempfile.TemporaryDirectory(prefix="childtune-evaluate-") as tmp:
        tasks: list[str | None] = [*saved.task_names()] or [None]  # (a single-task run: its one task)
        for task in tasks:
            folder = apply_delta(run, Path(tmp) / (task or "model"), task=task)
            config = saved.for_task(task) if task else saved
            scores[task or saved.task or run.name] = score(replace(config, model=str(folder)))
    return scores
