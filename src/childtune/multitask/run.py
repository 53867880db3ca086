"""A multi-task run: one base, a child network shared by several tasks, each task's own part and head.

`childtune train --tasks mr,subj,spam` (a `TrainConfig` with `tasks`):

1. each task's data and classifier as a single-task run builds them; the classifiers share one backbone
   (`model.share_backbone`);
2. each task's Fisher information over the backbone's transformer blocks (child-d's settings: samples,
   per example, train mode, clip), on its own training data;
3. the shared child network (`choose.shared_network`, `--shared-child`, size `--reserve-p`) and each task's
   own (`choose.task_networks`, `--task-child`);
4. training on a mixture: each step is one batch of one task, drawn by seed (`mixture`); the shared
   elements are updated by every task's batches (`SparseChildAdamW` over them), a task's own elements and
   head by its batches only (one `SparseChildAdamW` per task), with the task's own values swapped in
   (`model.TaskParts`); the learning rate follows one linear schedule over all steps, and the gradient
   of each step is clipped to `max_grad_norm` as a single-task run's is;
5. every task's dev and test scores, then the run folder: `shared/delta` (the shared change, against the
   base) and `tasks/<task>/delta` (that task's own change and head, against base + shared change: its
   recorded base fingerprint is that model's, so it refuses any other), `metrics.json` with every task's
   scores and the bytes stored (`stored_bytes`, and by part), `masks.safetensors` with the shared child network.

With `--merge` the tasks are trained apart and their changes merged instead (`merged.train_merged`), into
the same layout. `childtune apply RUN --task NAME` applies both deltas (`training.export.apply_delta`):
the task's model a user evaluates or ships. With `checkpoint_every` the run saves a checkpoint into its
partial folder (`resume`), which `train --resume` continues from; it runs one process in fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from childtune.data.types import TaskData
from childtune.delta import SparseDelta
from childtune.fileio import write_json
from childtune.fisher import fisher_information
from childtune.masks import MASKS_FILE, Indices, save_masks, to_masks
from childtune.multitask import resume as checkpoint
from childtune.multitask.choose import shared_network, task_networks
from childtune.multitask.merged import summary, task_scores, train_merged
from childtune.multitask.model import TaskParts, backbone_names, share_backbone
from childtune.optim import SparseChildAdamW
from childtune.strategies import GivenNetwork
from childtune.training.checkpoint import remove_checkpoint
from childtune.training.config import ConfigError, TrainConfig, updates_per_epoch
from childtune.training.evaluate import PhasePeaks
from childtune.training.inputs import batches, load_data, loader
from childtune.training.loop import TrainError
from childtune.training.models import base_files, load_model, model_folder, run_device, task_collate
from childtune.training.params import linear_factor, param_groups
from childtune.training.runfolder import RunFolder, run_reads, stored_bytes


def mixture(sizes: list[int], steps: int, mix: str, temperature: float, seed: int) -> list[int]:
    """Which task (its position in `sizes`) each of `steps` steps trains on: drawn independently with
    probability proportional to the task's training examples, or to examples^(1/temperature)."""
    power = 1.0 if mix == "proportional" else 1.0 / temperature
    weights = torch.tensor([float(n) ** power for n in sizes], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, steps, replacement=True, generator=generator).tolist()


def train_tasks(config: TrainConfig, *, checkpoint_every: int = 0, resume: bool = False) -> dict[str, Any]:
    """Train `config.tasks` at once (module docstring); return (and, with `config.output`, write) the metrics.
    `checkpoint_every` > 0 saves a checkpoint every that many steps (in the run's partial folder, which an
    interrupted run leaves); `resume` continues the interrupted run from its last checkpoint."""
    config = config.resolved()
    if (checkpoint_every or resume) and (config.merge or not config.output):
        raise ConfigError("checkpoints are taken of one multi-task run with an output folder (not with --merge, "
                          "whose single-task runs are short and run one after another)")
    folder = RunFolder(config.output, config.overwrite, resume, reads=run_reads(config)) if config.output else None
    try:
        if config.merge:
            return train_merged(config, folder)
        with folder or contextlib.nullcontext() as workdir:
            return _train_tasks(config, workdir, checkpoint_every, resume)
    finally:
        if folder is not None:
            folder.release()


@dataclass
class _Tasks:
    """What every phase of a multi-task run reads: each task's config, data, model and collate (the models
    sharing one backbone), the backbone's tensor names and their pre-trained values."""

    names: list[str]
    configs: dict[str, TrainConfig]
    data: dict[str, TaskData]
    models: dict[str, torch.nn.Module]
    collates: dict[str, Any]
    device: torch.device
    backbone: list[str]
    base: dict[str, torch.Tensor]

    @classmethod
    def load(cls, config: TrainConfig) -> _Tasks:
        names = config.task_names()
        configs = {t: config.for_task(t) for t in names}
        data = {t: load_data(c) for t, c in configs.items()}
        device = run_device(config)
        models, tokenizer = {}, None
        for t, c in configs.items():
            tokenizer, models[t] = load_model(c, data[t].spec)
        share_backbone(models)
        for model in models.values():
            model.to(device)
        first = models[names[0]]
        backbone = backbone_names(first)
        base = {n: t.detach().cpu().clone() for n, t in first.state_dict().items() if n in backbone}
        collates = {t: task_collate(configs[t], tokenizer, models[t], data[t].spec.kind) for t in names}
        return cls(names, configs, data, models, collates, device, backbone, base)


def _train_tasks(config: TrainConfig, workdir: Path | None, every: int, resume: bool) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    phases = PhasePeaks()
    if workdir and not resume:  # what --resume reads back
        replace(config, overwrite=False).save_json(workdir / "config.json")
    saved = checkpoint.load(workdir, config) if resume and workdir else None
    phases.start("model")
    tasks = _Tasks.load(config)
    phases.start("prepare")
    started = time.perf_counter()
    shared, own = (saved.shared, saved.own) if saved else _choose(config, tasks)
    prepare_time = time.perf_counter() - started
    phases.start("train")
    started = time.perf_counter()
    parts, steps = _fit(config, tasks, shared, own, _Checkpoints(workdir, every, saved))
    train_time = time.perf_counter() - started
    phases.start("evaluate")
    scores = {}
    for t in tasks.names:
        parts.activate(t)
        scores[t] = {**task_scores(tasks.models[t], tasks.data[t], tasks.collates[t], tasks.configs[t]),
                     "steps": steps[t], "own_params": count_index(own[t])}
    metrics: dict[str, Any] = {
        **summary(scores, config), "shared_child": config.shared_child,
        "task_child": config.task_child, "mix": config.mix, "steps": sum(steps.values()),
        "shared_params": count_index(shared), "scored_params": sum(tasks.base[n].numel() for n in shared),
        "prepare_time_s": round(prepare_time, 3), "train_time_s": round(train_time, 3),
        "torch_threads": torch.get_num_threads(),
    }
    if workdir:
        phases.start("save")
        by_part = _save(config, tasks, parts, workdir)
        metrics["stored_bytes"], metrics["stored_bytes_by_part"] = by_part.pop("total"), by_part
        save_masks(to_masks(shared, tasks.base), workdir / MASKS_FILE)
        remove_checkpoint(workdir)  # a finished run needs none
    phases.start(None)
    metrics["peak_rss_mib"], metrics["peak_rss_mib_by_phase"] = phases.overall(), phases.peaks
    if workdir:
        write_json(workdir / "metrics.json", metrics)
    return metrics


@dataclass
class _Checkpoints:
    """Where and how often `_fit` checkpoints (`workdir` None or `every` 0: never), and what it resumes from."""

    workdir: Path | None
    every: int
    saved: checkpoint.Saved | None


def _choose(config: TrainConfig, tasks: _Tasks) -> tuple[Indices, dict[str, Indices]]:
    """The shared child network and each task's own, from each task's Fisher over the backbone's blocks on
    its own training data (child-d's settings)."""
    scores = []
    for t in tasks.names:
        batches = loader(tasks.data[t].train, batch_size=config.batch_size, collate_fn=tasks.collates[t])
        fisher = fisher_information(tasks.models[t], batches, num_samples=config.fisher_samples,
                                    per_example=config.fisher_per_example, train_mode=bool(config.fisher_train_mode),
                                    clip=config.fisher_clip or None, progress=config.progress)
        scores.append({n: s for n, s in fisher.items() if n in tasks.backbone})
    assert config.reserve_p is not None  # resolved
    shared = shared_network(scores, config.reserve_p, config.shared_child)
    return shared, dict(zip(tasks.names, task_networks(scores, shared, config.task_child), strict=True))


def _fit(config: TrainConfig, tasks: _Tasks, shared: Indices, own: dict[str, Indices], checkpoints: _Checkpoints
         ) -> tuple[TaskParts, dict[str, int]]:
    """Train on the mixture (module docstring, step 4), checkpointing and resuming as `checkpoints` says; the
    task parts as left, and each task's steps."""
    first = tasks.models[tasks.names[0]]
    backbone = {n: p for n, p in first.named_parameters() if n in tasks.backbone}
    for name, param in backbone.items():  # what no part of any task changes needs no gradient
        if not any(len(net.get(name, ())) for net in (shared, *own.values())):
            param.requires_grad_(False)
    assert config.weight_decay is not None and config.lr is not None
    adamw = partial(SparseChildAdamW, lr=config.lr, weight_decay=config.weight_decay,
                    bias_correction=config.bias_correction or "element")
    groups = [{**g, "params": [(n, p) for n, p in g["params"] if n in backbone]}
              for g in param_groups(first, config.weight_decay)]
    shared_opt = adamw([g for g in groups if g["params"]], GivenNetwork(_held(shared), always=()))
    task_opts = {t: adamw(param_groups(tasks.models[t], config.weight_decay), GivenNetwork(_held(own[t])))
                 for t in tasks.names}
    parts = TaskParts(backbone, own)
    sizes = [len(tasks.data[t].train) for t in tasks.names]
    total = sum(updates_per_epoch(n, config.batch_size) for n in sizes) * config.epochs
    warmup = round(config.warmup * total)
    optimizers = {"shared": shared_opt, **{f"task:{t}": o for t, o in task_opts.items()}}
    start, steps = 0, dict.fromkeys(tasks.names, 0)
    if checkpoints.saved is not None:
        start, steps = checkpoint.restore(checkpoints.saved, tasks.models, parts, optimizers)
    streams = {t: _stream(tasks.data[t].train, tasks.collates[t], tasks.configs[t], steps[t]) for t in tasks.names}
    for model in tasks.models.values():
        model.train()
    order = mixture(sizes, total, config.mix, config.mix_temperature, config.seed)
    bar = tqdm(total=total, initial=start, desc=f"train {len(tasks.names)} tasks", unit="step",
               disable=not config.progress)
    for step in range(start, total):
        which = order[step]
        task = tasks.names[which]
        model = tasks.models[task]
        parts.activate(task)
        loss = model(**{k: v.to(tasks.device) for k, v in next(streams[task]).items()}).loss
        if not torch.isfinite(loss):
            raise TrainError(f"non-finite loss at step {step} ({task}); the weights were not updated. Lower --lr")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                              config.max_grad_norm or math.inf)
        if not torch.isfinite(norm):
            raise TrainError(f"non-finite gradient at step {step} ({task}). Lower --lr")
        for optimizer in (shared_opt, task_opts[task]):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * linear_factor(step, warmup, total)
            optimizer.step()
        model.zero_grad(set_to_none=True)
        steps[task] += 1
        bar.update(1)
        bar.set_postfix(task=task, loss=f"{float(loss.detach()):.4f}")
        if checkpoints.workdir and checkpoints.every and (step + 1) % checkpoints.every == 0 and step + 1 < total:
            checkpoint.save(checkpoints.workdir, config, tasks.models, tasks.backbone, parts, optimizers,
                            (shared, own), step + 1, steps)
    bar.close()
    return parts, steps


def _stream(examples, collate, config: TrainConfig, done: int = 0):
    """A task's batches without end, from its `done`-th on: its epochs one after another, each in the
    (seed, epoch) order a single-task run of it would take."""
    per_epoch = updates_per_epoch(len(examples), config.batch_size)
    epoch, start = divmod(done, per_epoch)
    while True:
        yield from batches(examples, collate, config, epoch, start)
        epoch, start = epoch + 1, 0


def _save(config: TrainConfig, tasks: _Tasks, parts: TaskParts, workdir: Path) -> dict[str, Any]:
    """The shared delta and each task's (module docstring); the bytes each takes on disk."""
    files = base_files(model_folder(config.model))
    parts.activate(None)
    first = tasks.models[tasks.names[0]]
    shared_state = {n: t.detach().cpu().clone() for n, t in first.state_dict().items() if n in tasks.backbone}
    SparseDelta.from_training(tasks.base, shared_state, method=config.method,
                              hparams={**config.to_dict(), "part": "shared"}, base_model=config.model,
                              base_files=files).save(workdir / "shared" / "delta")
    own: dict[str, int] = {}
    stored: dict[str, Any] = {"shared": stored_bytes(workdir / "shared" / "delta"), "tasks": own}
    for t, model in tasks.models.items():
        parts.activate(t)
        spec = tasks.data[t].spec
        head = {"num_labels": spec.num_labels, "label_names": list(spec.label_names), "kind": spec.kind,
                "part": t, "shared_delta": "../../shared/delta"}
        SparseDelta.from_training(shared_state, model, method=config.method,
                                  hparams={**tasks.configs[t].to_dict(), **head}, base_model=config.model,
                                  base_files=files).save(workdir / "tasks" / t / "delta")
        own[t] = stored_bytes(workdir / "tasks" / t / "delta")
    stored["total"] = stored["shared"] + sum(own.values())
    return stored


def _held(network: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a child network holds elements of (the frozen ones bound to no optimizer left out)."""
    return {n: i for n, i in network.items() if len(i)}


def count_index(network: dict[str, torch.Tensor]) -> int:
    """Elements in a child network held as indices."""
    return sum(len(i) for i in network.values())
