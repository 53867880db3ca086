"""The domain-transfer experiment: a model trained on one domain, scored on others without further training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from childtune.data.batching import make_collate
from childtune.data.tasks import TASKS, load_task
from childtune.data.userfiles import load_files
from childtune.fileio import write_json
from childtune.study.plan import StudyError
from childtune.training.config import TrainConfig
from childtune.training.evaluate import evaluate
from childtune.training.inputs import load_data
from childtune.training.loop import Callback
from childtune.training.models import model_folder


class TransferEval(Callback):
    """Training callback: at the end of a run, score the trained model on other domains' test sets.

    The model is the one the run just trained, evaluated as is: no further training, and the source's
    head and label meaning are kept, so targets must have the source's kind and label names. Results go
    into the run's metrics (returned) and `transfer.json` in its folder.
    """

    def __init__(self, targets: Sequence[str]) -> None:
        self.targets = tuple(targets)

    def on_end(self, state, metrics: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        config = state.config
        source = TASKS.get(metrics["task"]) or _file_spec(config)
        tokenizer = AutoTokenizer.from_pretrained(model_folder(config.model), local_files_only=True)
        results = {}
        for target in self.targets:
            spec, examples = target_examples(target, source)
            collate = make_collate(tokenizer, config.max_length, spec.kind)
            results[target] = evaluate(state.model, examples, spec, collate, config, f"eval {target}")
        metrics["transfer"] = results
        if state.workdir is not None:
            write_json(Path(state.workdir) / "transfer.json", results)


def _file_spec(config: TrainConfig):
    return load_data(config).spec


def target_examples(target: str, source) -> tuple[Any, list]:
    """The target's test examples and the spec to score them with (the source's, checked compatible)."""
    if target in TASKS:
        task = load_task(target)
        spec, examples = task.spec, task.test
    else:
        path = Path(target)
        if not path.is_file():
            raise StudyError(f"transfer target {target!r} is neither a built-in task nor a file")
        task = load_files(path, path, kind=source.kind)
        spec, examples = replace(task.spec, name=path.stem, metric=source.metric), task.train
    if (spec.kind, spec.num_labels, spec.label_names) != (source.kind, source.num_labels, source.label_names):
        raise StudyError(f"transfer target {target!r} has labels {spec.label_names} ({spec.kind}); the source "
                         f"{source.name!r} has {source.label_names} ({source.kind})")
    if not examples:
        raise StudyError(f"transfer target {target!r} has no test examples")
    return replace(spec, metric=source.metric), examples


