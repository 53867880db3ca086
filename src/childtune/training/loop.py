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
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from childtune import shards
from childtune.delta import DeltaError, SparseDelta
from childtune.fileio import write_json
from childtune.masks import MASKS_FILE, save_masks
from childtune.models import quantized
from childtune.optim import ChildOptimizer, SparseChildAdamW, state_bytes
from childtune.strategies import Strategy
from childtune.training import distributed
from childtune.training.config import (
    ConfigError,
    TrainConfig,
    build_strategy,
    causal_lm_notice,
    updates_per_epoch,
)
from childtune.training.evaluate import PhasePeaks, count_elements, evaluate, to_device
from childtune.training.inputs import batches, load_data, loader
from childtune.training.methods import METHODS
from childtune.training.models import (
    add_lora,
    base_files,
    in_weight_dtype,
    load_model,
    model_folder,
    quiet_transformers,
    run_device,
    task_collate,
)
from childtune.training.params import (
    freeze_unchosen,
    linear_schedule,
    make_optimizer,
    param_groups,
    restrict_to_parts,
)
from childtune.training.runfolder import MetricsLog, RunFolder, run_reads, stored_bytes


class TrainError(RuntimeError):
    """Training could not go on (e.g. a non-finite loss): the message says where and what to change."""


# ---------------------------------------------------------------------------------------- the state


class Callback(Protocol):
    """Hooks around the loop (checkpointing, resuming, distributed logging). Every hook is optional: a
    subclass inherits these no-ops; a class with all three needs no import of this module (`Checkpointer`).

    `on_start` runs before any work: a resume callback restores `state` there and sets
    `state.resumed`, which skips the child network's preparation (its masks come from the optimizer state).
    """

    def on_start(self, state: TrainState) -> None:
        return None

    def on_step(self, state: TrainState) -> None:
        return None

    def on_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        return None


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
    unused: list[torch.Tensor] = field(default_factory=list)  # FSDP2: weights no strict update touches (their
    # gradients are dropped before clipping, as `freeze_unchosen` keeps them from existing on one process)
    extra: dict[str, Any] = field(default_factory=dict)  # callbacks' own bookkeeping


# ------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, callbacks: Sequence[Callback] = (), *, resume: bool = False) -> dict[str, Any]:
    """Fine-tune with `config.method`; return (and, with `config.output`, write) the run's metrics.

    Under torchrun every rank calls this: DDP, the data sharded by rank, files written by rank 0 only.
    `resume` reopens the interrupted run's working folder (and its checkpoint) instead of a fresh one.
    """
    given, config = config, config.resolved(processes=distributed.info().world_size)
    me = distributed.init()
    if config.optimizer_in_backward and me.world_size > 1 and not config.fsdp:
        raise ConfigError("--optimizer-in-backward runs on one process or sharded (--fsdp): DDP averages "
                          "gradients in its own hooks, after the step would have used them")
    if config.child_only_grads and me.world_size > 1 and not config.fsdp:
        raise ConfigError("--child-only-grads runs on one process or sharded (--fsdp): DDP averages the weights' "
                          ".grad in its own hooks, and a child-only gradient is no .grad (pass --no-child-only-grads)")
    notice = causal_lm_notice(given, config)
    if notice and me.is_main:
        print(notice, file=sys.stderr)
    if config.fsdp and me.world_size < 2:
        raise ConfigError("--fsdp shards over processes: run it with --nproc N (N >= 2) or under torchrun")
    if config.batch_size % me.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the {me.world_size} processes")
    folder = RunFolder(config.output, config.overwrite, resume, reads=run_reads(config)) \
        if config.output and me.is_main else None
    try:
        return _train(config, callbacks, folder, me)
    finally:
        if folder is not None:
            folder.release()  # also when the run failed before its folder was opened


def _train(config: TrainConfig, callbacks: Sequence[Callback], folder: RunFolder | None, me) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    phases = PhasePeaks()  # metrics.json's peak_rss_mib_by_phase
    phases.start("data")
    task = load_data(config)
    if not task.train or not task.dev:
        raise ConfigError("training needs a non-empty train and dev split")
    phases.start("model")
    tokenizer, model = load_model(config, task.spec)
    if config.base_bits is None:  # (a quantized base is loaded onto its device, in its dtype)
        model = model.to(run_device(config, me))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = in_weight_dtype(config, model)
    if config.gradient_checkpointing:  # recompute activations in backward: memory for compute
        _checkpoint_activations(model)
    collate = task_collate(config, tokenizer, model, task.spec.kind)
    phases.start("base_copy")  # the base's weights kept for the delta, and the delta tried on them
    pretrained, view = _base_and_view(config, model, me)
    if config.fsdp:  # before the optimizer, which must see the sharded parameters; FSDP2 syncs, not DDP
        model = distributed.shard(model)
    _check_the_end(config, task.spec, model, pretrained, view)
    total_steps = updates_per_epoch(len(task.train), config.batch_size) * config.epochs
    phases.start("setup")
    model, params, strategy, optimizer, scheduler = setup(config, model, total_steps)

    with folder or _NoFolder() as workdir, MetricsLog(
            workdir / "metrics.jsonl" if workdir else None,
            workdir / "tensorboard" if workdir and config.report_to == "tensorboard" else None) as log:
        state = TrainState(model, optimizer, scheduler, strategy, config, workdir, log)
        if workdir:  # what the run computed; how it was written (overwrite) is not replayed by --config
            replace(config, overwrite=False).save_json(workdir / "config.json")
        for cb in callbacks:
            cb.on_start(state)

        phases.start("prepare")
        started = time.perf_counter()
        if not state.resumed:  # Child-Tuning_D: Fisher information on the training data (own progress bar)
            # DDP: each rank scores its share and the Fisher pass sums them; FSDP2: every rank scores every batch
            ranks = 1 if config.fsdp else me.world_size
            shard = distributed.ShardedSampler(len(task.train), seed=config.seed, shuffle=False,
                                               rank=me.rank % ranks, world_size=ranks)
            fisher_batches = loader(task.train, batch_size=config.batch_size // ranks, sampler=shard,
                                    collate_fn=collate)
            strategy.prepare(model, fisher_batches, progress=config.progress and me.is_main)
        prepare_time = time.perf_counter() - started
        if config.strict and not config.fsdp:  # (FSDP2 fixed which parameters need gradients when it sharded)
            freeze_unchosen(strategy, params)  # before any DDP wrapping: DDP fixes its params
        elif config.strict:
            state.unused = [params[name] for name in strategy.untouched() if name in params]  # (collective)
        # after the Fisher pass (dense gradients) and a resume (the masks then come from the checkpoint)
        child_grads = optimizer.child_only_grads(model) if config.child_only_grads and isinstance(
            optimizer, SparseChildAdamW) else None
        state.model = distributed.wrap(model)  # DDP under torchrun; the model itself for one process

        phases.start("train")
        started = time.perf_counter()
        bar = tqdm(total=total_steps, initial=state.step + state.skipped, desc=f"train {config.method}",
                   unit="step", disable=not config.progress or not me.is_main)
        losses: list[float] = []
        while state.epoch < config.epochs:
            model.train()
            for batch in batches(task.train, collate, config, state.epoch, state.batch):
                loss = train_step(state, batch)
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
        if child_grads is not None:  # evaluation, counting and saving see the plain Linear modules
            child_grads.remove()

        phases.start("evaluate")
        started = time.perf_counter()
        dev = evaluate(model, task.dev, task.spec, collate, config, "eval dev")
        test = evaluate(model, task.test, task.spec, collate, config, "eval test") if task.test else None
        eval_time = time.perf_counter() - started
        log.write(eval="dev", epoch=state.epoch, step=state.step, **dev)
        if test is not None:
            log.write(eval="test", epoch=state.epoch, step=state.step, **test)

        phases.start("count")
        tuned = model.merge_and_unload() if METHODS[config.method].adapter == "lora" and \
            config.base_bits is None else model  # (QLoRA keeps its adapter: a merge would requantize the base)
        masks = strategy.final_masks(state.step)
        if config.fsdp:  # whole masks and weights, gathered from every rank's rows (collective)
            masks = masks and shards.gather_masks(masks, params)
            tuned = _gathered(config, task.spec, model)
        metrics = {
            "task": task.spec.name, "method": config.method, "seed": config.seed,
            "kind": task.spec.kind, "primary_metric": task.spec.metric,
            "train_examples": len(task.train), "dev_examples": len(task.dev), "test_examples": len(task.test),
            "dev": dev, "test": test,
            "steps": state.step, "skipped_steps": state.skipped, "epochs": config.epochs,
            "prepare_time_s": round(prepare_time, 3), "train_time_s": round(train_time, 3),
            "eval_time_s": round(eval_time, 3),
            "truncated_prompts": getattr(collate, "truncated", 0),
            "optimizer_state_bytes": state_bytes(optimizer), "device": str(next(model.parameters()).device),
            "torch_threads": torch.get_num_threads(),  # the times above depend on it
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            **(count_elements(pretrained, tuned, params, masks, view) if tuned is not None else {}),
        }
        if workdir:
            phases.start("save")
            _save_weights(config, workdir, pretrained, tuned if view is None else view, tokenizer, task.spec)
            metrics["stored_bytes"] = sum(stored_bytes(workdir / part) for part in ("delta", "model", "adapter"))
            if masks:  # the child network itself, strict or not, for `childtune analyze`
                save_masks(masks, workdir / MASKS_FILE)
        phases.start(None)
        metrics["peak_rss_mib"], metrics["peak_rss_mib_by_phase"] = phases.overall(), phases.peaks
        if workdir:
            write_json(workdir / "metrics.json", metrics)
        for cb in callbacks:
            cb.on_end(state, metrics)
    return metrics


def setup(config: TrainConfig, model: torch.nn.Module, total_steps: int):
    """What a run of `config.method` trains with: the model (a LoRA model for adapter methods), the
    parameters it trains by name, the strategy choosing their child network, the optimizer applying it
    and the learning-rate schedule. The strategy is not prepared yet (Child-Tuning_D's Fisher pass)."""
    if METHODS[config.method].adapter == "lora":
        if config.child_scope is not None:
            raise ConfigError("--child-scope chooses where a child network lies; LoRA's adapters lie where peft "
                              "puts them (the model's lora_target_modules)")
        model = add_lora(model, config)
    elif config.child_scope is not None:
        restrict_to_parts(model, config.child_scope)
    if config.weight_decay is None:
        raise ConfigError("setup needs a resolved config (TrainConfig.resolved() fills the method's weight_decay)")
    groups = param_groups(model, config.weight_decay)
    params = {n: p for g in groups for n, p in g["params"]}
    strategy = build_strategy(config, total_steps, params)
    optimizer = make_optimizer(groups, strategy, config)
    scheduler = linear_schedule(optimizer, round(config.warmup * total_steps), total_steps)
    return model, params, strategy, optimizer, scheduler


def _micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[tuple[dict[str, torch.Tensor], float]]:
    """`batch` cut into `n` micro-batches, each with the share of the batch's loss it carries: its share
    of the examples, or of the target tokens for a causal LM (whose loss is a mean over tokens)."""
    parts = [dict(zip(batch, values, strict=True)) for values in zip(
        *(torch.tensor_split(v, n) for v in batch.values()), strict=True)]
    parts = [p for p in parts if len(p["labels"])]

    def weight(part: dict[str, torch.Tensor]) -> float:
        labels = part["labels"]
        return float((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else float(len(labels))

    total = sum(weight(p) for p in parts) or 1.0
    return [(p, weight(p) / total) for p in parts]


def train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> float | None:
    """One update from `grad_accum` micro-batches; a non-finite loss or gradient stops the run or skips
    the batch, never reaching the weights. Accumulated gradients equal the whole batch's (losses weighted
    by each micro-batch's share of it); under DDP only the last micro-batch synchronises."""
    config, model, optimizer = state.config, state.model, state.optimizer
    parts = _micro_batches(batch, config.grad_accum)
    autocast = (torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16) if config.bf16
                else contextlib.nullcontext())
    loss, finite_loss = torch.zeros((), device=next(model.parameters()).device), True
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None  # `distributed.wrap`
    for i, (part, share) in enumerate(parts):
        sync = ddp.no_sync() if ddp is not None and i < len(parts) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                micro = model(**to_device(part, model)).loss * share
            finite_loss = finite_loss and bool(torch.isfinite(micro))
            if config.optimizer_in_backward:  # hooks buffer child gradients until the update's last micro-batch
                _stepping_in_backward(optimizer).accumulating = i < len(parts) - 1
            if not finite_loss and config.optimizer_in_backward:  # backward would already update weights
                raise TrainError(f"non-finite loss at epoch {state.epoch}, batch {state.batch} (after {state.step} "
                                 "updates); the weights were not updated. Lower --lr")
            micro.backward()  # even when not finite: every rank runs the same backward passes (DDP's sync)
            loss = loss + micro.detach().float()
    for param in state.unused:  # never applied, so not part of the update's norm (clipped as on one process)
        param.grad = None
    finite = not distributed.any_rank(not finite_loss)  # every rank skips together, or DDP hangs
    if finite and not config.optimizer_in_backward:  # the gradient is whole: clip it, and check it too
        finite = bool(torch.isfinite(_clip(optimizer, config.max_grad_norm)))
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
    broken = optimizer.nonfinite() if isinstance(optimizer, SparseChildAdamW) else [  # its updated elements only
        n for n, p in state.model.named_parameters()
        if p.requires_grad and not bool(torch.isfinite(shards.local(p)).all())]  # (this rank's rows)
    if distributed.any_rank(bool(broken)) if config.fsdp else broken:  # a finite gradient can still take a
        # weight past float range (a huge learning rate); sharded, every rank stops together
        raise TrainError(f"update {state.step} (epoch {state.epoch}, batch {state.batch}) made weights "
                         f"non-finite, e.g. in {broken[0] if broken else 'another rank rows'!r}: the run diverged. "
                         "Lower --lr")
    return float(loss.detach())


def _checkpoint_activations(model: torch.nn.Module) -> None:
    """Recompute `model`'s activations in backward (non-reentrant), by the name its transformers gives it."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"--gradient-checkpointing needs a transformers model, got {type(model).__name__}")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _stepping_in_backward(optimizer: torch.optim.Optimizer) -> ChildOptimizer | SparseChildAdamW:
    """`optimizer` as one that steps inside backward (`make_optimizer` builds one of these two for it)."""
    if not isinstance(optimizer, ChildOptimizer | SparseChildAdamW):
        raise TypeError(f"{type(optimizer).__name__} cannot step in backward (--optimizer-in-backward)")
    return optimizer


def _clip(optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip the update's gradient to `max_norm` (None: measure it only) and return its norm: torch's
    `clip_grad_norm_` over the optimizer's parameters, with the child-only gradients that backward
    delivered (`SparseChildAdamW.child_only_grads`, no `.grad`) counted and scaled as part of it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    vectors = optimizer.child_gradients() if isinstance(optimizer, SparseChildAdamW) else []
    if not vectors:
        return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    grads = [p.grad for p in params if p.grad is not None]
    group = shards.group_of(params)
    if group is None:
        norm = torch.nn.utils.get_total_norm(grads + vectors)
    else:  # FSDP2: the dense part's norm over the ranks' shards, and each rank's vectors are of its own rows
        squares = torch.nn.utils.get_total_norm(vectors).square()
        torch.distributed.all_reduce(squares, group=group)
        dense = torch.nn.utils.get_total_norm(grads)
        norm = ((dense.full_tensor() if shards.is_sharded(dense) else dense).square() + squares).sqrt()
    if max_norm is not None:  # clip_grads_with_norm_'s arithmetic
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in grads + vectors:
            grad.mul_(coef)
    return norm


def _gathered(config: TrainConfig, spec, model: torch.nn.Module) -> torch.nn.Module | None:
    """Rank 0: an unsharded copy of the FSDP2 model with its tuned weights (for counting and saving);
    None on the other ranks. Every rank must call it (the weights are all-gathered)."""
    state = distributed.full_state_dict(model)
    if state is None:
        return None
    _, plain = load_model(config, spec)
    plain = in_weight_dtype(config, plain)
    plain.load_state_dict(state)
    return plain


def _base_and_view(config: TrainConfig, model: torch.nn.Module, me) -> tuple[Any, Any]:
    """What the run's delta and counts compare: the base's weights as loaded, and a view of the tuned
    weights where the model's state dict does not hold them (None: it does). In full precision, a copy of
    the state taken now (sharded: on rank 0 only). On a quantized base (`models.quantized.states`), both
    read the unquantized base from the model folder one tensor at a time, the view with the child's values
    over it; QLoRA compares nothing (it keeps its adapter)."""
    if config.base_bits is not None:
        if METHODS[config.method].adapter:
            return {}, None
        return quantized.states(model, model_folder(config.model))
    pretrained = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()} if (
        me.is_main or not config.fsdp) else {}  # sharded: only rank 0 counts and saves against the base
    return pretrained, None


def _check_the_end(config: TrainConfig, spec, model: torch.nn.Module, pretrained: Any, view: Any) -> None:
    """Take the run's last steps (gather a sharded model, build the delta) on the untrained model, before
    any work, so that a run cannot train for hours and then fail to save. Every rank calls it and every
    rank stops with the same message (one line from the launcher; no rank left waiting in a collective).
    The model is the one before any LoRA adapter: an adapter run saves that model, merged."""
    tuned = _gathered(config, spec, model) if config.fsdp else model
    problem = None
    if tuned is not None and _saves(config, tuned) == "delta":
        try:
            _delta(config, pretrained, tuned if view is None else view, spec)
        except DeltaError as err:
            problem = f"this run could not save its delta at the end, so it did not start: {err}"
    problem = next(filter(None, distributed.gather(problem)), None)
    if problem:
        raise ConfigError(problem)


def _saves(config: TrainConfig, model: Any) -> str:
    """The weights a run keeps: a sparse delta against the base for strict runs (exactly the child
    network), else the whole model, unless `save` says. A model that is no model folder's (the
    vision-language model assembled from parts) keeps a delta whatever the run, and so does one on a
    quantized base (its view, against the unquantized base); QLoRA keeps its adapter."""
    if config.base_bits is not None:
        return "none" if config.save == "none" else "adapter" if METHODS[config.method].adapter else "delta"
    if not hasattr(model, "save_pretrained"):
        if config.save == "model":
            raise ConfigError(f"--save model writes a model folder, which {config.model} is assembled from, not "
                              "saved as: keep a delta (--save delta)")
        return "delta" if config.save == "auto" else config.save
    return config.save if config.save != "auto" else ("delta" if config.strict else "model")


def _delta(config: TrainConfig, pretrained, model, spec) -> SparseDelta:
    # a generation task's answers are texts: the label names an image task answered in words keeps are no head's
    names = list(spec.label_names) if spec.kind != "generation" else []
    head = {"num_labels": spec.num_labels, "label_names": names, "kind": spec.kind}
    return SparseDelta.from_training(pretrained, model, method=config.method, hparams={**config.to_dict(), **head},
                                     base_model=config.model, base_files=base_files(model_folder(config.model)))


def _save_weights(config: TrainConfig, workdir: Path, pretrained, model, tokenizer, spec) -> None:
    save = _saves(config, model)
    if save == "delta":
        _delta(config, pretrained, model, spec).save(workdir / "delta")
    elif save in ("model", "adapter"):
        with quiet_transformers():
            model.save_pretrained(workdir / save)
            tokenizer.save_pretrained(workdir / save)


class _NoFolder:
    """Stands in for a RunFolder when nothing is written (library use without `output`)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None
