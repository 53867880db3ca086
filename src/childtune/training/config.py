"""Every knob of a training run in one typed dataclass: the one place for a run's defaults.

A run is reproducible from its `config.json` alone, so the saved config holds *resolved* values: the
per-method defaults (learning rate, child-network size, strictness) are filled in before it is written,
and a later change of default cannot silently change what a rerun does. Loading is strict: an unknown
or mistyped key is an error that names it, never a value quietly ignored.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from childtune.data.tasks import TASKS
from childtune.data.userfiles import generation_columns, read_task_file
from childtune.fileio import write_json
from childtune.models.folders import is_vision_language
from childtune.strategies import Strategy
from childtune.training.methods import CAUSAL_LM, DENSE_RUN, METHODS, PRESET_FIELDS, PRESETS, Method

_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """The fields' types, evaluated once: `get_type_hints` compiles every annotation string each call,
    which made reading a ledger of a few hundred records take seconds. (A dict, not functools.cache, whose
    Hashable argument mypy cannot match with a class whose instances are unhashable.)"""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_PATHS = ("train_file", "dev_file", "test_file", "model")
"""Fields that may hold a path (`model` may instead name a pinned model, which is no path on disk)."""


NOT_SETTINGS = frozenset({"output", "overwrite", "progress", "log_every", "report_to", "device", "fisher_passes",
                          "child_only_grads"})
"""Fields about where and how a run is written or shown, not what it computes: a resumed run, a reused
study cell and a ledger record may differ in these and still be the same run. (`fisher_passes` trades
memory for time and gives the same child network; `child_only_grads` gives the same update from the same
child gradient values, summed in another order, so a checkpoint or ledger record from before it existed
still matches; only a step after backward whose clipping bites differs, its norm then measured over the
child elements.)"""

_WITH_P = "/".join(n for n, m in METHODS.items() if "reserve_p" in m.childtune)
_FIXED = ", ".join(n for n, m in METHODS.items()
                   if m.network == "fixed" and m.childtune.get("strict") and not m.adapter)
"""Methods named in help texts and errors, read from the method table so that a new method joins them:
those sized by p, and those whose strict child network is fixed (child-only gradients can apply)."""

_CHOICES = {"id3_head": ("outside", "inside"), "id3_schedule": ("ramp", "authors"),
            "bias_correction": ("element", "tensor"), "random_targets": ("all", "qv"),
            "random_sampling": ("exact", "bernoulli"), "random_budget": ("scored", "model"),
            "dyn_start": ("random", "fisher"), "dyn_schedule": ("cosine", "linear", "constant"),
            "dyn_importance": ("magnitude", "signal"),
            "optimizer": ("torch", "authors"), "preset": PRESETS, "report_to": ("none", "tensorboard"),
            "dtype": ("fp32", "bf16"), "device": ("auto", "cpu", "cuda"),
            "child_budget": ("joint", "per-part"), "shared_child": ("fisher-sum", "fisher-intersection", "union"),
            "mix": ("proportional", "temperature"),
            "merge": ("sum", "ties", "dare")}


MULTITASK_METHODS = frozenset({"child-d"})
"""The methods a multi-task run trains (`tasks`): its shared and per-task child networks are chosen from the
tasks' Fisher scores, as Child-Tuning_D chooses one."""

MULTITASK_FIELDS = frozenset({"tasks", "shared_child", "task_child", "mix", "mix_temperature", "merge",
                              "merge_density"})
"""The settings of a multi-task run (`tasks`, `childtune.multitask`), which a single-task run ignores."""

LARGEST_INT = 2**31 - 1
"""The largest size, count or seed a config may hold: far beyond any real run, well within what torch,
`itertools.islice` and the data order's arithmetic accept (a 10**23 batch size failed deep in the loader)."""


class ConfigError(ValueError):
    """A configuration that cannot run, explained in one line naming the offending key."""


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass
class TrainConfig:
    """One fine-tuning run. `None` means "the method's default" (see `METHODS`) where noted."""

    # -- data
    task: str | None = field(default="mr", metadata=_opt(
        "built-in task (mr, subj, spam, bbc-news, snli, vader-*)"))
    train_file: str | None = field(default=None, metadata=_opt("your train CSV/JSONL (instead of --task)",
                                                                flag="--train"))
    dev_file: str | None = field(default=None, metadata=_opt("your dev CSV/JSONL", flag="--dev"))
    test_file: str | None = field(default=None, metadata=_opt("your test CSV/JSONL (optional)", flag="--test"))
    text_col: str = field(default="text", metadata=_opt("text column of --train/--dev/--test"))
    label_col: str = field(default="label", metadata=_opt("label column of --train/--dev/--test"))
    text_pair_col: str | None = field(default=None, metadata=_opt(
        "second text column: every example is a sentence pair (NLI, paraphrase)"))
    prompt_col: str = field(default="prompt", metadata=_opt("generation: prompt column of your files"))
    target_col: str = field(default="target", metadata=_opt("generation: target (answer) column of your files"))
    chat_template: bool = field(default=False, metadata=_opt(
        "generation: wrap each prompt in the tokenizer's chat template (instruct models)"))
    max_new_tokens: int = field(default=16, metadata=_opt("generation: longest answer decoded at evaluation"))
    kind: str | None = field(default=None, metadata=_opt(
        "your files' task kind, 'classification', 'regression' or 'generation' (default: generation when "
        "they have the --prompt-col and --target-col columns and no --text-col, else inferred from the labels, "
        "refusing mixed evidence)"))
    train_size: int | None = field(default=None, metadata=_opt("subsample this many training examples (by seed)"))
    model: str = field(default="all-MiniLM-L6-v2",
                       metadata=_opt("a local Hugging Face model folder, or the name of a pinned offline model"))
    max_length: int = field(default=128, metadata=_opt("truncate texts to this many tokens"))
    eval_size: int | None = field(default=None, metadata=_opt(
        "evaluate on at most this many dev and test examples (a fixed sample, the same for every run)"))
    tasks: str | None = field(default=None, metadata=_opt(
        "several tasks at once, comma-separated, instead of --task: built-in ones and your own as task files (e.g. "
        "mr,subj,reviews.json, the file holding {\"train\": \"reviews/train.csv\", \"dev\": \"reviews/dev.csv\"} "
        "and optionally test, text_col, label_col, text_pair_col, name): one model with "
        "a head per task, trained on a mixture of them (--mix), child-d's child network shared by all tasks "
        "(--shared-child) plus each task's own (--task-child)"))
    shared_child: str = field(default="fisher-sum", metadata=_opt(
        "--tasks: the shared child network, the top --reserve-p of the tasks' Fisher scores (each divided by its "
        "sum) combined by 'fisher-sum', 'fisher-intersection' (their minimum: what every task needs) or "
        "'union' (their maximum: what any task needs)"))
    task_child: float = field(default=0.0, metadata=_opt(
        "--tasks: each task's own child network outside the shared one, this share of the scored weights (0: "
        "none); its values change only on that task's batches and are its delta's"))
    mix: str = field(default="proportional", metadata=_opt(
        "--tasks: each step trains on one task, drawn by seed in proportion to its training examples "
        "('proportional') or to examples^(1/--mix-temperature) ('temperature', which favours small tasks)"))
    mix_temperature: float = field(default=2.0, metadata=_opt("--tasks with --mix temperature: T > 0"))
    merge: str | None = field(default=None, metadata=_opt(
        "--tasks: instead of one run of all tasks, a run of each task alone (its own child-d child network) and "
        "their changes merged by 'sum' (task arithmetic), 'ties' or 'dare' (peft's rules), a head each: the "
        "baseline a multi-task child network is measured against"))
    merge_density: float = field(default=1.0, metadata=_opt(
        "--merge ties or dare: the share of each run's changed elements kept, in (0, 1]"))
    child_scope: str | None = field(default=None, metadata=_opt(
        "a model of named parts (the vision-language model crnn-smollm2: vision, connector, language): the parts "
        "the child network may lie in, comma-separated; the others stay frozen (a connector trains whole, like "
        "a head, wherever it is named)"))
    child_budget: str = field(default="joint", metadata=_opt(
        "child-d on a model of named parts: 'joint' (one top --reserve-p over every part in --child-scope) or "
        "'per-part' (the top --reserve-p of each part's own weights)"))
    # -- method
    method: str = field(default="child-d", metadata=_opt(", ".join(METHODS)))
    preset: str = field(default="childtune", metadata=_opt(
        "every unset method setting from 'childtune' (ours, chosen on evidence) or 'authors' (their code)"))
    reserve_p: float | None = field(default=None, metadata=_opt(
        f"child network share ({_WITH_P}; child-d and child-d-random on a causal LM: 0.05)"))
    lr: float | None = field(default=None, metadata=_opt("peak learning rate"))
    strict: bool | None = field(default=None, metadata=_opt(
        "change nothing outside the child network, weight decay included"))
    rest: str | None = field(default=None, metadata=_opt(
        "child-d: parameters outside the scored blocks (embeddings, pooler) 'freeze' or 'train' (the authors')"))
    fisher_samples: int | None = field(default=None, metadata=_opt("child-d: examples for Fisher (none: all)"))
    fisher_per_example: bool = field(default=False, metadata=_opt("child-d: exact per-example Fisher (slower)"))
    fisher_train_mode: bool | None = field(default=None, metadata=_opt(
        "child-d: Fisher pass with dropout on (train mode), as the authors ran it"))
    fisher_clip: float | None = field(default=None, metadata=_opt(
        "child-d: clip each tensor's gradient to this norm before squaring (0: no clipping)"))
    fisher_passes: int | None = field(default=None, metadata=_opt(
        "child-d: score the blocks in this many groups, one Fisher pass each: less memory, more time, the same "
        "child network (none: 1)"))
    id3_budget: float = field(default=0.005, metadata=_opt("id3: final child network, fraction of scored weights"))
    id3_eps: float | None = field(default=None, metadata=_opt("id3: eps in |g| / (|w| + eps)^exp"))
    id3_exp: float | None = field(default=None, metadata=_opt("id3: exponent in |g| / (|w| + eps)^exp"))
    id3_head: str | None = field(default=None, metadata=_opt(
        "id3: the task head 'outside' the budget (trained in full) or 'inside' it (competing for it)"))
    id3_schedule: str | None = field(default=None, metadata=_opt(
        "id3: 'ramp' (linear, capped at the budget) or 'authors' (budget // steps per step, uncapped)"))
    id3_every: int = field(default=1, metadata=_opt(
        "id3: grow every K steps, admitting K steps' share of the schedule at once, ranked by that step's "
        "gradient alone (1: the authors' rule, every step). K > 1 trades the per-step scores for dense "
        "weight gradients on one step in K only (with child-only gradients between: the default for a "
        "causal LM when K > 1); the same budget and final size; its effect on quality is unmeasured"))
    dyn_start: str = field(default="random", metadata=_opt(
        "child-dyn: the first child network, 'random' (random masking's) or 'fisher' (child-d's top p)"))
    dyn_every: int = field(default=20, metadata=_opt("child-dyn: steps between reselections"))
    dyn_drop: float = field(default=0.3, metadata=_opt(
        "child-dyn: share of each tensor's child elements replaced at the first reselection, decaying by "
        "--dyn-schedule"))
    dyn_schedule: str = field(default="cosine", metadata=_opt(
        "child-dyn: the drop share's decay to 0 at the end of training, 'cosine' (RigL), 'linear' (SpIEL) "
        "or 'constant'"))
    dyn_importance: str = field(default="magnitude", metadata=_opt(
        "child-dyn: regrow where |mean gradient| over the window is largest ('magnitude') or its mean less "
        "1.65 standard errors ('signal', SpIEL's; window >= 2)"))
    dyn_window: int = field(default=1, metadata=_opt(
        "child-dyn: steps of dense gradients before each reselection, whose statistics choose the regrown"))
    bias_correction: str | None = field(default=None, metadata=_opt(
        "sparse AdamW on growing child networks: Adam's bias correction per 'element' (from when it joined) "
        "or per 'tensor' (its steps, as dense AdamW counts)"))
    random_targets: str | None = field(default=None, metadata=_opt(
        "random: mask 'all' weights or only the attention 'qv' projection weights (the rest frozen)"))
    random_sampling: str | None = field(default=None, metadata=_opt(
        "random: exactly p of the weights ('exact') or each kept with probability p ('bernoulli')"))
    random_budget: str | None = field(default=None, metadata=_opt(
        "random: p is a share of the 'scored' weights or of the whole 'model'"))
    optimizer: str | None = field(default=None, metadata=_opt(
        "AdamW arithmetic of dense runs: 'torch' (fused) or 'authors' (Child-Tuning's: eps before bias "
        "correction, decay after the step)"))
    gradual_every: int | None = field(default=None, metadata=_opt(
        "gradual: steps between unfreezing blocks (default: all unfrozen by mid-training)"))
    lora_rank: int = field(default=8, metadata=_opt("lora: rank"))
    lora_alpha: int = field(default=16, metadata=_opt("lora: alpha"))
    lora_dropout: float = field(default=0.1, metadata=_opt("lora: dropout"))
    # -- optimisation
    epochs: int = field(default=3, metadata=_opt("passes over the training data"))
    batch_size: int = field(default=16, metadata=_opt("training batch size (per update, all processes together)"))
    grad_accum: int = field(default=1, metadata=_opt(
        "accumulate each update's gradient over N micro-batches (the same update, less activation memory)"))
    gradient_checkpointing: bool = field(default=False, metadata=_opt(
        "recompute activations in backward instead of keeping them (less memory, more time)"))
    bf16: bool = field(default=False, metadata=_opt("forward and backward under bfloat16 autocast, fp32 weights"))
    device: str = field(default="auto", metadata=_opt("'cuda', 'cpu', or 'auto' (a GPU when torch sees one)"))
    dtype: str | None = field(default=None, metadata=_opt(
        "weights in 'fp32', or 'bf16' with fp32 masters for the child elements only (strict sparse runs) or "
        "fp32 LoRA adapters (none: bf16 for a causal LM trained with a strict child network, e.g. child-d, "
        "random, id3, else fp32)"))
    base_bits: int | None = field(default=None, metadata=_opt(
        "freeze the base in 4-bit NF4 or 8-bit int8 (bitsandbytes, as QLoRA) and hold the child network as fp32 "
        "values over it (indices + values, masters and moments for the child only); its delta is against the "
        "unquantized base. Causal LMs and text classifiers; strict sparse methods, and LoRA (QLoRA) (none: "
        "full precision)"))
    optimizer_in_backward: bool | None = field(default=None, metadata=_opt(
        "update each parameter inside backward and free its gradient at once (every method but the authors' "
        "AdamW runs; turns off global-norm clipping, which needs every gradient first) (none: on for a causal "
        "LM trained with a strict child network on one process or with --fsdp, else off)"))
    child_only_grads: bool | None = field(default=None, metadata=_opt(
        "compute the gradient of each partially chosen Linear weight at its child elements only, never the "
        f"dense dW: the same update, less memory and work. Fixed child networks ({_FIXED}; strict), and "
        "id3 with --id3-every K > 1 (dense on its growth steps); not gradual or id3 growing every step; "
        "with --fsdp (the vectors are averaged over the ranks), not with DDP, whose hooks wait for dense "
        "gradients. With the step after backward, clipping measures the "
        "child elements' gradient, not the whole dW's (none: on for a causal LM with a fixed child network, or "
        "id3 with --id3-every > 1, on one process or with --fsdp, else off)"))
    fsdp: bool = field(default=False, metadata=_opt(
        "with --nproc N: shard weights, gradients, masks and optimizer state over the processes (FSDP2) "
        "instead of replicating them (DDP)"))
    eval_batch_size: int = field(default=64, metadata=_opt("evaluation batch size"))
    weight_decay: float | None = field(default=None, metadata=_opt(
        "AdamW decoupled weight decay (not on bias/LayerNorm)"))
    warmup: float = field(default=0.1, metadata=_opt("share of steps with linear LR warmup, then linear decay"))
    max_grad_norm: float | None = field(default=1.0, metadata=_opt("clip gradients to this norm (none: no clip)"))
    seed: int = field(default=1, metadata=_opt("seed for subsampling, head init, data order, masks"))
    nonfinite: str = field(default="stop", metadata=_opt(
        "on a non-finite loss or gradient: 'stop' with an error, or 'skip' the step (weights never change)"))
    # -- outputs
    metric_extra: tuple[str, ...] = field(default=(), metadata=_opt("extra metrics, comma-separated (mcc)"))
    output: str | None = field(default=None, metadata=_opt("run folder to write (refused if it holds a run)"))
    overwrite: bool = field(default=False, metadata=_opt("replace a run already in --output"))
    save: str = field(default="auto", metadata=_opt(
        "weights to keep: 'delta' (sparse, vs the base), 'model' (whole), 'none'; auto: delta for strict runs"))
    log_every: int = field(default=10, metadata=_opt("log the training loss every N steps"))
    report_to: str = field(default="none", metadata=_opt(
        "also write the logged numbers as TensorBoard event files in RUN/tensorboard ('tensorboard')"))
    eval_every_epoch: bool = field(default=False, metadata=_opt("also evaluate dev after every epoch"))
    progress: bool = field(default=True, metadata=_opt("show progress bars"))

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metric_extra"] = list(self.metric_extra)
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> TrainConfig:
        """Parse strictly: unknown keys and values of the wrong type are errors naming the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(raw).__name__}")
        hints = _type_hints(cls)
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"unknown config key {key!r}")
        return cls(**{key: _coerce(key, value, hints[key]) for key, value in raw.items()})

    def save_json(self, path: str | Path) -> None:
        """Write the config; file paths in it are stored relative to the file's folder where they can be,
        so a run folder moved with its data, or used from another directory, still finds them."""
        path = Path(path)
        out = self.to_dict()
        for key in _PATHS:
            if out[key] and Path(out[key]).exists():
                out[key] = os.path.relpath(Path(out[key]).resolve(), path.parent.resolve())
        write_json(path, out)

    @classmethod
    def load_json(cls, path: str | Path) -> TrainConfig:
        """Read a config; a relative file path in it means relative to the config file's folder (as
        `save_json` writes them), else, for configs written by hand, relative to the working directory."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys(str(path)))
        except ConfigError:
            raise
        except ValueError as err:  # malformed JSON, undecodable bytes, a number too long to read
            raise ConfigError(f"{path} is not a JSON config: {err}") from None
        if isinstance(raw, dict):
            for key in _PATHS:
                value = raw.get(key)
                if isinstance(value, str) and value and not Path(value).is_absolute() and (
                        path.parent / value).exists():
                    raw[key] = str((path.parent / value).resolve())
        return cls.from_dict(raw)

    # ------------------------------------------------------------------ defaults and checks

    def _check_fsdp(self) -> None:
        """What FSDP2 runs do not support (yet), refused before any rank starts."""
        if METHODS[self.method].adapter:
            raise ConfigError(f"--fsdp with {self.method}: childtune does not shard peft adapters; LoRA keeps "
                              "little state to shard, so run it with DDP (--nproc N without --fsdp)")
        if METHODS[self.method].network == "dynamic":
            raise ConfigError(f"--fsdp with {self.method}: each rank would reselect among its own rows of a weight; "
                              "run it on one process or with DDP (--nproc N without --fsdp)")
        if self.optimizer == "authors":
            raise ConfigError("--fsdp with --optimizer authors: the authors' AdamW masks whole tensors; use the "
                              "default torch optimizer")
        if self.fisher_per_example:
            raise ConfigError("--fsdp with --fisher-per-example: an example's gradient is never whole on one rank "
                              "when sharded; score per batch")

    def task_entries(self) -> list[str]:
        """The `tasks` of a multi-task run as given: built-in names and task files (`*.json`)."""
        return [entry.strip() for entry in (self.tasks or "").split(",") if entry.strip()]

    def task_names(self) -> list[str]:
        """The tasks of a multi-task run, in the order given (a task file's by its `name`); empty for a
        single-task run."""
        return [read_task_file(e).name if e.endswith(".json") else e for e in self.task_entries()]

    def for_task(self, name: str) -> TrainConfig:
        """The single-task config of one task of a multi-task run: a built-in task, or a task file's files
        and columns (`data.userfiles.TaskFile`), read as classification (a head per task)."""
        for entry in self.task_entries():
            if entry.endswith(".json") and (task := read_task_file(entry)).name == name:
                return replace(self, tasks=None, merge=None, task=None, train_file=task.train, dev_file=task.dev,
                               test_file=task.test, text_col=task.text_col, label_col=task.label_col,
                               text_pair_col=task.text_pair_col, kind="classification")
        return replace(self, tasks=None, merge=None, task=name)

    def _check_tasks(self) -> None:
        """What a multi-task run (`childtune.multitask`) supports, refused in one line each."""
        unknown = [e for e in self.task_entries() if e not in TASKS and not e.endswith(".json")]
        if unknown:
            raise ConfigError(f"tasks: no built-in task {unknown[0]!r} (built-in: {', '.join(TASKS)}); name your "
                              "own as a task file, e.g. reviews.json holding {\"train\": ..., \"dev\": ...}")
        names = self.task_names()
        if len(names) < 2 or len(set(names)) < len(names):
            raise ConfigError(f"tasks must name two different tasks or more, got {self.tasks!r}")
        if any(TASKS[n].kind == "generation" for n in names if n in TASKS):
            raise ConfigError("tasks: a multi-task run trains classifiers (a head per task); "
                              f"{[n for n in names if n in TASKS and TASKS[n].kind == 'generation']} are generation "
                              "tasks")
        if self.method not in MULTITASK_METHODS:
            raise ConfigError(f"--tasks chooses child-d's child network from the tasks' Fisher scores; got --method "
                              f"{self.method}")
        if self.train_file is not None or self.fsdp or self.dtype == "bf16" or self.optimizer_in_backward or \
                self.child_only_grads or self.grad_accum != 1:
            raise ConfigError("--tasks runs one process in fp32 with the step after backward: not with --train, "
                              "--fsdp, --dtype bf16, --optimizer-in-backward, --child-only-grads or --grad-accum")
        _check(0 <= self.task_child < 1, "task_child", self.task_child, "in [0, 1)")
        _check(self.mix_temperature > 0, "mix_temperature", self.mix_temperature, "> 0")
        _check(0 < self.merge_density <= 1, "merge_density", self.merge_density, "in (0, 1]")

    def _check_base_bits(self, processes: int) -> None:
        """What a quantized base (`models.quantized`) supports, refused in one line each."""
        _check(self.base_bits in (4, 8), "base_bits", self.base_bits, "4 or 8")
        spec = METHODS[self.method]
        if not spec.adapter and (spec.network == "per_step" or not self.strict):
            raise ConfigError(f"--base-bits with {self.method}: a quantized base cannot be updated in place; it takes "
                              "a strict sparse child network held over it (e.g. child-d, random, id3) or LoRA")
        if self.tasks is not None or self.fsdp or processes > 1:
            raise ConfigError("--base-bits runs one process and one task: not with --tasks, --fsdp or --nproc")
        if self.image_classifier_run() or is_vision_language(self.model):
            raise ConfigError("--base-bits quantizes a text model's Linear layers (a causal LM or a text "
                              "classifier); not an image model")
        if self.fisher_per_example or self.optimizer == "authors":
            raise ConfigError("--base-bits: per-example Fisher and the authors' dense AdamW need whole weights; "
                              "score per batch, with the default optimizer")
        if self.save == "model":
            raise ConfigError("--base-bits keeps a delta against the unquantized base; `childtune apply RUN/delta "
                              "OUT` writes the merged full-precision model folder from it")

    def _check_child_only(self) -> None:
        """Where child-only gradients cannot run, refused in one line that says why."""
        spec = METHODS[self.method]
        if not spec.child_only(self) or spec.adapter or not self.strict:
            why = (f"{self.method}'s child network {'grows' if spec.network == 'growing' else 'changes every step'}"
                   " and is chosen from dense gradients" if not spec.child_only(self) else
                   f"{self.method} here is not a strict child network of the base's weights")
            raise ConfigError(f"child_only_grads needs a fixed, strict child network ({_FIXED}) or id3 with "
                              f"id3_every > 1: {why}")

    def resolved(self, processes: int = 1) -> TrainConfig:
        """A copy with the method's defaults filled in and everything checked: what a run really uses.

        `processes`: how many ranks will run it (DDP, or FSDP2 with `fsdp`), which the run settings of a
        causal LM depend on (`causal_lm_run`)."""
        check_method(self.method)
        spec = METHODS[self.method]
        raw = self.to_dict()
        for key in _PATHS:  # absolute, so a resumed run or a rerun from elsewhere reads the same files
            if isinstance(raw[key], str) and raw[key] and Path(raw[key]).exists():
                raw[key] = str(Path(raw[key]).resolve())
        if isinstance(raw["tasks"], str):  # task files too
            raw["tasks"] = ",".join(str(Path(e).resolve()) if e.endswith(".json") and Path(e).is_file() else e
                                    for e in self.task_entries())
        done = TrainConfig.from_dict(raw)  # every value passes the field's type, wherever it came from
        if done.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {done.preset!r}")
        defaults = spec.defaults(done.preset)
        causal = done.causal_lm_run(defaults["strict"] if done.strict is None else done.strict)
        if causal and done.preset == "childtune":
            defaults = {**defaults, **spec.causal_lm}
        if done.preset == "childtune" and done.image_classifier_run():
            defaults = {**defaults, **spec.image}
        done = replace(done, metric_extra=tuple(self.metric_extra),
                       **{key: defaults[key] for key in PRESET_FIELDS if getattr(done, key) is None})
        done = replace(done, **{key: value for key, value in _run_settings(done, spec, causal, processes).items()
                                if getattr(done, key) is None})
        if done.optimizer_in_backward:  # no global norm before the first parameter is updated
            done = replace(done, max_grad_norm=None)
        done.validate(processes)
        return done

    def image_classifier_run(self) -> bool:
        """Whether this run classifies images (a built-in image task, or a folder of class folders) with an
        image classifier, not the vision-language model (which answers as a causal LM does)."""
        if is_vision_language(self.model):
            return False
        if self.train_file is not None:
            return Path(self.train_file).is_dir()
        task = TASKS.get(self.task or "")
        return task is not None and task.inputs == "image"

    def causal_lm_run(self, strict: bool) -> bool:
        """Whether this run trains a causal LM (a generation task) with a strict child network that the
        sparse optimizer steps (every method but full, child-f and the LoRA ones), so that its unset run
        settings resolve to `CAUSAL_LM` (and the method's `causal_lm`). Reads the train file's
        columns only when one of those settings is unset and `kind` does not say."""
        spec = METHODS[self.method]
        unset = any(getattr(self, key) is None for key in (*CAUSAL_LM, *spec.causal_lm))
        if not unset or not strict or spec.adapter or spec.network == "per_step":
            return False
        if self.train_file is None:
            task = TASKS.get(self.task or "")
            return task is not None and task.kind == "generation"
        if self.kind is not None:
            return self.kind == "generation"
        return generation_columns(self.train_file, self.text_col, self.prompt_col, self.target_col)

    def validate(self, processes: int = 1) -> None:
        """Refuse, in one line naming the field, any value of the wrong type (from the field's hint), out
        of range, or in a combination that cannot run."""
        check_method(self.method)
        files = self.train_file is not None or self.dev_file is not None or self.test_file is not None
        if files and (self.train_file is None or self.dev_file is None):
            raise ConfigError("your own data needs both --train and --dev files")
        if not files and not self.task:
            raise ConfigError("give a --task, or --train and --dev files")
        hints = _type_hints(TrainConfig)
        for f in fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            _check(not isinstance(value, float) or math.isfinite(value), f.name, value, "a finite number")
            _check(not isinstance(value, int) or isinstance(value, bool) or abs(value) <= LARGEST_INT, f.name,
                   value, f"between -{LARGEST_INT} and {LARGEST_INT}")
        _check(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number")
        if self.child_budget == "per-part" and self.method not in ("child-d", "child-d-random"):
            raise ConfigError(f"--child-budget per-part cuts child-d's Fisher scores part by part; {self.method} "
                              "chooses its child network otherwise (use --child-budget joint)")
        if self.child_scope is not None and not all(self.child_scope.split(",")):
            raise ConfigError(f"child_scope must name parts, comma-separated, got {self.child_scope!r}")
        _check(self.id3_eps is None or self.id3_eps > 0, "id3_eps", self.id3_eps, "> 0")
        _check(self.id3_exp is None or self.id3_exp >= 0, "id3_exp", self.id3_exp, ">= 0")
        _check(self.fisher_clip is None or self.fisher_clip >= 0, "fisher_clip", self.fisher_clip, ">= 0")
        for key, allowed in _CHOICES.items():
            _check(getattr(self, key) in (None, *allowed), key, getattr(self, key), " or ".join(map(repr, allowed)))
        _check(self.kind in (None, "classification", "regression", "generation"), "kind", self.kind,
               "'classification', 'regression' or 'generation'")
        _check(self.output is None or bool(self.output.strip()), "output", self.output, "a folder name, not empty")
        if self.optimizer_in_backward and self.nonfinite != "stop":
            raise ConfigError("optimizer_in_backward updates during backward: it cannot skip a non-finite step "
                              "(nonfinite must be 'stop')")
        if self.fsdp:
            self._check_fsdp()
        if self.child_only_grads:
            self._check_child_only()
        if self.base_bits is not None:
            self._check_base_bits(processes)
        if self.tasks is not None:
            self._check_tasks()
        elif self.merge is not None:
            raise ConfigError("--merge merges the runs of several tasks: give them with --tasks")
        if files and self.text_col == self.label_col:
            raise ConfigError(f"text_col and label_col are both {self.text_col!r}: the model would read the label")
        _check(self.reserve_p is None or 0 < self.reserve_p <= 1, "reserve_p", self.reserve_p, "in (0, 1]")
        _check(0 < self.id3_budget < 1, "id3_budget", self.id3_budget, "a fraction in (0, 1)")
        for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "lora_rank", "lora_alpha",
                    "max_new_tokens", "grad_accum", "id3_every", "dyn_every", "dyn_window"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "at least 1")
        _check(self.max_length >= 2, "max_length", self.max_length, "at least 2")
        for key in ("train_size", "fisher_samples", "fisher_passes", "gradual_every", "eval_size"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, value, "at least 1")
        _check(0 <= self.warmup < 1, "warmup", self.warmup, "in [0, 1)")
        _check(0 <= self.dyn_drop <= 1, "dyn_drop", self.dyn_drop, "in [0, 1]")
        _check(self.dyn_window <= self.dyn_every, "dyn_window", self.dyn_window,
               f"at most dyn_every ({self.dyn_every})")
        _check(self.dyn_importance != "signal" or self.dyn_window >= 2, "dyn_window", self.dyn_window,
               "at least 2 with dyn_importance 'signal' (it uses the window's variance)")
        _check(self.weight_decay is None or self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        _check(self.nonfinite in ("stop", "skip"), "nonfinite", self.nonfinite, "'stop' or 'skip'")
        _check(self.rest in (None, "freeze", "train"), "rest", self.rest, "'freeze' or 'train'")
        _check(self.save in ("auto", "delta", "model", "none"), "save", self.save, "auto, delta, model or none")
        unknown = sorted(set(self.metric_extra) - {"mcc"})
        _check(not unknown, "metric_extra", ",".join(unknown), "only 'mcc'")
        if self.method == "lora" and self.save == "delta":
            raise ConfigError("save='delta' is for masking methods; a LoRA run saves its merged model")


def _run_settings(config: TrainConfig, spec: Method, causal: bool, processes: int) -> dict[str, Any]:
    """`CAUSAL_LM` for a causal LM's selective run (`causal`), less what this run cannot use, else
    `DENSE_RUN` (a method's `causal_lm` may take a lean setting back). The step in backward needs one
    process or FSDP2 (DDP reduces gradients in its own hooks), a non-finite step that stops the run, and, for
    a child network that is not fixed, one micro-batch per update (ID3 ranks the whole update's gradient);
    child-only gradients need a fixed or dynamic child network, or ID3 growing every K > 1 steps
    (`Method.child_only`), on one process or FSDP2 (DDP's reducer waits for every weight's dense gradient)."""
    if not causal:
        return DENSE_RUN
    lean = {**CAUSAL_LM, **{key: value for key, value in spec.causal_lm.items() if key in CAUSAL_LM}}
    ddp = processes > 1 and not config.fsdp
    in_backward = lean["optimizer_in_backward"] and not ddp and config.nonfinite == "stop" and (
        config.grad_accum == 1 or spec.network == "fixed")
    child_only = lean["child_only_grads"] and spec.child_only(config) and not ddp
    return {**lean, "optimizer_in_backward": in_backward, "child_only_grads": child_only}


def causal_lm_notice(given: TrainConfig, done: TrainConfig) -> str | None:
    """The one line a run prints when `given` left a causal LM's run settings (`CAUSAL_LM`) to `resolved`
    and `done` took the lean ones: what it runs, and how to opt out. None otherwise."""
    lean = {key: getattr(done, key) for key in CAUSAL_LM if getattr(given, key) is None}
    if not lean or lean == {key: DENSE_RUN[key] for key in lean}:
        return None
    parts = ["bf16 weights, fp32 child masters" if done.dtype == "bf16" else "fp32 weights"]
    if given.reserve_p is None and done.preset == "childtune" and "reserve_p" in METHODS[done.method].causal_lm:
        parts.insert(0, f"p {done.reserve_p:g}")
    parts.append("step in backward (no gradient clipping)" if done.optimizer_in_backward else "step after backward")
    kind = METHODS[done.method].network
    grows = (f" (dense every {done.id3_every} steps, where {done.method} grows)" if kind == "growing" else
             f" (dense on the {done.dyn_window} steps before each reselection)" if kind == "dynamic" else "")
    parts.append(f"child-only gradients{grows}" if done.child_only_grads else
                 f"dense gradients ({done.method}'s child network grows from them)" if kind == "growing" else
                 "dense gradients")
    outs = {"dtype": "--dtype fp32", "optimizer_in_backward": "--no-optimizer-in-backward",
            "child_only_grads": "--no-child-only-grads"}
    opt_out = ", ".join(outs[key] for key, value in lean.items() if value != DENSE_RUN[key])
    return f"causal LM: {', '.join(parts)} (opt out: {opt_out})"


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {value!r}")


def unique_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A `json.loads` object_pairs_hook: a key given twice in one object is a ConfigError naming it and
    `where`, not decided by whichever came last (JSON's silent rule)."""
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _value in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ConfigError(f"{where}: key {repeated[0]!r} appears more than once; which value is meant?")
        return dict(pairs)
    return hook


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type (JSON lists become tuples, ints pass as floats), or a ConfigError."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if typing.get_origin(kind) is tuple and isinstance(value, list | tuple) and all(
            isinstance(v, str) for v in value
        ):
            return tuple(value)
    names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in options)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


def updates_per_epoch(examples: int, batch_size: int) -> int:
    """Optimizer updates in one epoch over `examples` training examples: one per batch, the last one
    partial. The loop's schedules and a study's `--updates` count with this one rule."""
    return math.ceil(examples / batch_size)


def build_strategy(config: TrainConfig, total_steps: int, param_names: Iterable[str]) -> Strategy:
    """The strategy `config.method` names, configured from `config` (resolved here if it is not yet).

    `total_steps` is the number of optimizer steps (ID3 reaches its budget there; gradual unfreezing
    spreads its schedule over it) and `param_names` the names the optimizer will see.
    """
    check_method(config.method)
    if any(getattr(config, key) is None for key in PRESET_FIELDS if key != "reserve_p"):
        config = config.resolved()
    return METHODS[config.method].build(config, total_steps, list(param_names))
