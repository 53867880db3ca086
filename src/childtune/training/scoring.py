"""Scoring a model folder on a task without training it: what `childtune evaluate` runs.

A model made by `childtune apply` (a run's delta on its base, or a task's share of `childtune merge`), a
run's saved `model/`, or any Hugging Face folder is scored as a run scores itself at its end: the same
task loading, batching and metrics (`training.evaluate`), on the dev and test splits.
"""

from __future__ import annotations

from typing import Any

from childtune.training.config import TrainConfig
from childtune.training.evaluate import evaluate
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
