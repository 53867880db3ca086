"""Several tasks served by one merged change: the baseline a shared child network is measured against.

`childtune train --tasks mr,subj,spam --merge ties` trains each task alone (a single-task run of the
method, its own child network and head, in a scratch folder), merges the runs' sparse deltas by `sum`,
`ties` or `dare` (`delta.task_merge`, peft's rules, `--merge-density`, DARE's draw seeded by the run's
seed) and scores each task on base + merged change + its own head. The run folder has a multi-task run's
layout, so `apply --task`, the study tables and the bytes-stored comparison take it unchanged:
`shared/delta` is the merged change, `tasks/<task>/delta` the task's head alone, made on base + merged
change (whose fingerprint it checks), and `single/<task>/delta` each run's own delta, kept so the merge can
be checked or redone (not counted in `stored_bytes`, which is what serving the tasks needs).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from childtune.data.types import TaskData
from childtune.delta import SparseDelta
from childtune.delta.format import fingerprint
from childtune.delta.sparse import describe
from childtune.delta.task_merge import merge_tasks
from childtune.fileio import write_json
from childtune.training.config import TrainConfig
from childtune.training.evaluate import PhasePeaks, evaluate
from childtune.training.export import base_for
from childtune.training.inputs import load_data
from childtune.training.loop import train
from childtune.training.models import model_folder, task_collate
from childtune.training.runfolder import RunFolder, stored_bytes


def mean_score(scores: dict[str, dict[str, Any]], split: str) -> dict[str, float] | None:
    """{"mean": the tasks' primary metrics on `split`, averaged}: a multi-task run's one score (None where
    a task has no such split)."""
    values = [s[split][s["primary_metric"]] for s in scores.values() if s[split] is not None]
    return {"mean": sum(values) / len(values)} if len(values) == len(scores) else None


def summary(scores: dict[str, dict[str, Any]], config: TrainConfig) -> dict[str, Any]:
    """What one score per run reads (a study's or compare's tables, the ledger), for both multi-task recipes:
    the mean of each task's primary metric, every task's own scores, the split sizes summed."""
    return {"task": "+".join(scores), "primary_metric": "mean", "kind": "classification",
            **{split: mean_score(scores, split) for split in ("dev", "test")},
            **{f"{split}_examples": sum(s[f"{split}_examples"] for s in scores.values())
               for split in ("train", "dev", "test")},
            "tasks": scores, "method": config.method, "seed": config.seed, "epochs": config.epochs}


def task_scores(model, data: TaskData, collate, config: TrainConfig) -> dict[str, Any]:
    """One task's dev and test scores (the model as it serves that task) and split sizes:
    what a multi-task run records per task, merged or not."""
    t = data.spec.name
    dev = evaluate(model, data.dev, data.spec, collate, config, f"eval dev {t}")
    test = evaluate(model, data.test, data.spec, collate, config, f"eval test {t}") if data.test else None
    return {"dev": dev, "test": test, "primary_metric": data.spec.metric, "train_examples": len(data.train),
            "dev_examples": len(data.dev), "test_examples": len(data.test)}


def train_merged(config: TrainConfig, folder: RunFolder | None) -> dict[str, Any]:
    """Each of `config.tasks` trained alone, the changes merged by `config.merge` (module docstring)."""
    phases = PhasePeaks()
    names = config.task_names()
    assert config.merge is not None
    with tempfile.TemporaryDirectory(prefix="childtune-merge-") as scratch:
        alone = {t: train(replace(config.for_task(t), output=str(Path(scratch) / t), overwrite=False))
                 for t in names}
        phases.start("merge")
        deltas = {t: SparseDelta.load(Path(scratch) / t / "delta") for t in names}
        entries = merge_tasks(list(deltas.values()), config.merge, density=config.merge_density, seed=config.seed)
        base = next(iter(deltas.values())).config
        meta = {"base_model": base.base_model, "base_files": base.base_files, "dense_patterns": base.dense_patterns,
                "num_elements": base.num_elements}
        method = f"{config.merge}({config.method})"
        shared = SparseDelta(describe(entries, {}, method=method, hparams={**config.to_dict(), "part": "shared"},
                                      base_fingerprint=base.base_fingerprint, **meta), entries, {})
        phases.start("evaluate")
        heads, scores = {}, {}
        for t in names:
            tokenizer, model = base_for(deltas[t], model_folder(config.model))
            shared.apply(model)
            on = fingerprint(model, base.dense_patterns)
            heads[t] = SparseDelta(describe({}, deltas[t].dense, method=method, base_fingerprint=on, hparams={
                **deltas[t].config.hparams, "part": t, "shared_delta": "../../shared/delta"}, **meta), {},
                deltas[t].dense)
            heads[t].apply(model)
            task_config = config.for_task(t)
            data = load_data(task_config)
            collate = task_collate(task_config, tokenizer, model, data.spec.kind)
            scores[t] = {**task_scores(model, data, collate, task_config), "steps": alone[t]["steps"],
                         "alone": {"dev": alone[t]["dev"], "test": alone[t]["test"]}}
        metrics: dict[str, Any] = {
            **summary(scores, config), "merge": config.merge,
            "merge_density": config.merge_density, "steps": sum(m["steps"] for m in alone.values()),
            "merged_params": sum(len(e.indices) for e in entries.values()),
            "prepare_time_s": round(sum(m["prepare_time_s"] for m in alone.values()), 3),
            "train_time_s": round(sum(m["train_time_s"] for m in alone.values()), 3),
        }
        with folder or contextlib.nullcontext() as workdir:
            if workdir:
                phases.start("save")
                replace(config, overwrite=False).save_json(workdir / "config.json")
                shared.save(workdir / "shared" / "delta")
                by_task: dict[str, int] = {}
                for t in names:
                    heads[t].save(workdir / "tasks" / t / "delta")
                    by_task[t] = stored_bytes(workdir / "tasks" / t / "delta")
                    shutil.copytree(Path(scratch) / t / "delta", workdir / "single" / t / "delta")
                merged_bytes = stored_bytes(workdir / "shared" / "delta")
                metrics["stored_bytes"] = merged_bytes + sum(by_task.values())
                metrics["stored_bytes_by_part"] = {"shared": merged_bytes, "tasks": by_task}
            phases.start(None)
            metrics["peak_rss_mib"], metrics["peak_rss_mib_by_phase"] = phases.overall(), phases.peaks
            if workdir:
                write_json(workdir / "metrics.json", metrics)
    return metrics
