"""What a study runs: its settings (`StudyConfig`), the grid of (task, method, hyper-parameters, seed)
cells in the order they run, each cell's full training config, and the record a finished cell leaves.

Each cell is one ordinary training run in its own folder `runs/<task>/<method>/<config>/seed<k>/`,
trained (or read back when done) by the one grid runner `childtune.study.grid`, which `compare` uses
too; `childtune.study.run` drives a whole study and `childtune.study.report` writes its findings.

Protocol, as in the Child-Tuning paper: for each task and method the hyper-parameters with the best
mean *dev* score over seeds are selected, and that configuration's *test* scores are reported. A method
is compared with `full` by a paired test over seeds (the seed fixes the 1,000-example subsample, the
head's initialisation and the data order, so the same seed is the same draw of data for both methods):
a paired t-test and the Wilcoxon signed-rank test, and Holm's correction over all comparisons
(`childtune.stats`).
Note that with 5 seeds an exact two-sided Wilcoxon test cannot go below p = 0.0625.

The transfer experiment trains on one domain and evaluates the same model, without further training,
on other domains' test sets (`TransferEval`, a training callback).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from childtune.training.config import MULTITASK_FIELDS, MULTITASK_METHODS, TrainConfig, updates_per_epoch

MethodGrid = dict[str, tuple[Any, ...]]
Grid = dict[str, MethodGrid | list[MethodGrid]]
"""method -> {setting: values}, every combination one config; or a list of such, the union of each one's
combinations (for settings that only make sense together: one budget rule per scope, say)."""

TASKS = ("mr", "subj", "vader-movie", "spam")
METHODS = ("full", "child-f", "child-d", "random", "id3", "gradual", "lora")
SEEDS = (1, 2, 3, 4, 5)
BASELINE = "full"

PAPER_GRID: Grid = {
    # Child-Tuning (Xu et al., 2021): p in {0.1, 0.2, 0.3}, learning rates 2e-5 .. 1e-4.
    "full": {"lr": (2e-5, 5e-5, 1e-4)},
    "child-f": {"reserve_p": (0.1, 0.2, 0.3), "lr": (2e-5, 5e-5, 1e-4)},
    "child-d": {"reserve_p": (0.1, 0.2, 0.3), "lr": (2e-5, 5e-5, 1e-4)},
    # Random masking and ID3 update a small fraction of the weights and need much larger steps.
    "random": {"reserve_p": (0.01,), "lr": (1e-3, 5e-3, 1e-2)},
    "id3": {"id3_budget": (0.005,), "lr": (1e-3, 2e-3, 5e-3)},
    "gradual": {"lr": (2e-5, 5e-5, 1e-4)},
    "lora": {"lora_rank": (8,), "lr": (2e-4, 5e-4, 1e-3)},
}
"""The hyper-parameter grid of the full study: every combination of a method's values is one config."""

DEFAULT_GRID: Grid = {m: {} for m in METHODS}
"""One config per method, its defaults in `config.METHODS`: the cheap study."""

TRANSFER_SOURCE = "vader-movie-bin"
TRANSFER_TARGETS = ("vader-tweets-bin", "vader-nyt-bin", "vader-amazon-bin")
TRANSFER_METHODS = ("full", "child-d", "child-f")

_SHORT = {"reserve_p": "p", "lr": "lr", "id3_budget": "budget", "lora_rank": "r", "epochs": "ep"}


class StudyError(ValueError):
    """A study that cannot run as configured (unknown grid key, empty grid, mismatched transfer target)."""


@dataclass
class StudyConfig:
    """What to run. `base` holds every other training setting (model, epochs, batch size, ...).

    `tasks` are built-in task names, or names mapped to `TrainConfig` overrides (your own files:
    `{"mine": {"task": None, "train_file": ..., "dev_file": ..., "test_file": ...}}`). `transfer_targets`
    are built-in task names or CSV/JSONL files with the source task's labels.
    """

    tasks: tuple[str, ...] | Mapping[str, Mapping[str, Any]] = TASKS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = SEEDS
    train_size: int | None = 1000
    grid: Grid = field(default_factory=lambda: dict(PAPER_GRID))
    base: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    output: str = "runs/study"
    baseline: str = BASELINE
    transfer: bool = True
    transfer_source: str | Mapping[str, Any] = TRANSFER_SOURCE
    transfer_targets: tuple[str, ...] = TRANSFER_TARGETS
    transfer_methods: tuple[str, ...] = TRANSFER_METHODS
    analysis: bool = True
    """Write per-layer shares and overlaps of the saved child networks (child-d, id3) after training."""
    train_sizes: tuple[int, ...] = ()
    """The low-resource curve: every task at each of these training-set sizes (a task `mr` becomes
    `mr-n100`, `mr-n300`, ...), instead of `train_size` alone."""
    updates: int | None = None
    """On a low-resource curve, give every size about this many optimizer updates (its epochs set by
    `epochs_for`) instead of `base.epochs` at all sizes: a fixed epoch count leaves the small sizes a few
    dozen updates, which tests the schedule, not the method."""
    name: str = ""
    """Names the study's block in a shared report file and prefixes its figures (empty: the one study)."""
    rows_by: tuple[str, ...] = ()
    """Settings whose values are compared, not tuned: cells that differ in one of them are rows of their own
    (`rows_apart`), where by default every config of a method competes on dev for its one row."""
    ledger: str | None = None
    """A JSON-lines file of finished cells (`childtune.study.ledger`): planned from, appended to."""


# ---------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    experiment: str  # "main" or "transfer"
    task: str
    method: str
    overrides: tuple[tuple[str, Any], ...]  # the hyper-parameters this cell sets, sorted by key
    seed: int

    def key(self) -> tuple[tuple[str, Any], ...]:
        """The cell as a ledger records it."""
        return (("experiment", self.experiment), ("task", self.task), ("method", self.method),
                ("overrides", [list(pair) for pair in self.overrides]), ("seed", self.seed))

    @classmethod
    def from_key(cls, record: Mapping[str, Any]) -> Cell:
        """The cell a ledger record describes."""
        return cls(record["experiment"], record["task"], record["method"],
                   tuple((k, v) for k, v in record["overrides"]), record["seed"])

    @property
    def label(self) -> str:
        """The config's name, safe as a folder name: `p0.1-lr2e-05`, or `default`."""
        return safe_name("-".join(f"{_SHORT.get(k, k)}{v}" for k, v in self.overrides) or "default")

    def folder(self, output: Path) -> Path:
        """Where the cell's run lives: always inside `output`, whatever its task, method or values say."""
        kind = "runs" if self.experiment == "main" else "transfer"
        return output / kind / safe_name(self.task) / safe_name(self.method) / self.label / f"seed{self.seed}"


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,79}")


def safe_name(text: str) -> str:
    """`text` itself when it is a plain folder name (letters, digits, `._+=-`, not starting with a dot),
    else a readable prefix and a hash of it, so no value (`/../x`, `..`, a path) can leave the study folder."""
    if _SAFE.fullmatch(text) and ".." not in text:
        return text
    readable = re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("._")[:40] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def configs(grid: Grid, method: str) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the method's grid values (one empty config when the grid has none); for a list
    of grids, each one's combinations in turn, each config once."""
    spec = grid.get(method, {})
    out: list[tuple[tuple[str, Any], ...]] = []
    known = {f.name for f in fields(TrainConfig)}
    for values in spec if isinstance(spec, list) else [spec]:
        keys = sorted(values)
        for key in keys:
            if key not in known:
                raise StudyError(f"grid for {method!r} sets {key!r}, which is not a training setting")
            if not values[key]:
                raise StudyError(f"grid for {method!r} gives no values for {key!r}")
        out += [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*(values[k] for k in keys))]
    return list(dict.fromkeys(out))


def _for_task(grid: list[tuple[tuple[str, Any], ...]], several: bool) -> list[tuple[tuple[str, Any], ...]]:
    """A method's configs for one task's cells: a single-task cell drops the multi-task settings (which it
    would ignore) and so runs each remaining config once."""
    if several:
        return grid
    kept = [tuple((k, v) for k, v in config if k not in MULTITASK_FIELDS) for config in grid]
    return list(dict.fromkeys(kept))


def task_overrides(tasks: str | Sequence[str] | Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Task name -> the `TrainConfig` fields that select it; a name joining built-in tasks with `+`
    (`mr+subj+spam`) is one multi-task run of them (`TrainConfig.tasks`, `childtune.multitask`)."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    if isinstance(tasks, Mapping):
        return {name: dict(over) for name, over in tasks.items()}
    return {name: {"tasks": name.replace("+", ",")} if "+" in name else {"task": name} for name in tasks}


def plan(study: StudyConfig) -> list[Cell]:
    """Every cell of the study in the order they run: seed by seed, so that a study stopped early has
    complete seeds, every method paired with the baseline on each, rather than some methods with none. A
    multi-task entry (`mr+subj`) gets the methods a multi-task run trains (`MULTITASK_METHODS`) only; the
    others run on its tasks alone, where the study names them."""
    if study.updates is not None and (not study.train_sizes or study.updates < 1):
        raise StudyError(f"updates={study.updates}: give a positive number of updates, with train_sizes")
    known = {f.name for f in fields(TrainConfig)}
    if unknown := [k for k in study.rows_by if k not in known]:
        raise StudyError(f"rows_by names {unknown[0]!r}, which is not a training setting")
    source = next(iter(task_overrides(study.transfer_source)))
    cells = []
    for seed in study.seeds:
        cells += [Cell("main", task, method, config, seed)
                  for task, over in study_tasks(study).items()
                  for method in study.methods if "tasks" not in over or method in MULTITASK_METHODS
                  for config in _for_task(configs(study.grid, method), "tasks" in over)]
        if study.transfer:
            cells += [Cell("transfer", source, method, config, seed)
                      for method in study.transfer_methods
                      for config in configs(study.grid, method)]
    return cells


def study_tasks(study: StudyConfig) -> dict[str, dict[str, Any]]:
    """The main experiment's tasks by name, each the `TrainConfig` fields that select it (and its train
    size on a low-resource curve)."""
    tasks = task_overrides(study.tasks)
    if not study.train_sizes:
        return tasks
    return {f"{name}-n{size}": {**over, "train_size": size, **_epochs(study, size)} for name, over in tasks.items()
            for size in study.train_sizes}


def epochs_for(size: int, batch_size: int, updates: int) -> int:
    """The epoch count that gives `size` examples closest to `updates` optimizer updates (at least one
    epoch), counted as the loop counts them (`updates_per_epoch`)."""
    return max(1, round(updates / updates_per_epoch(size, batch_size)))


def _epochs(study: StudyConfig, size: int) -> dict[str, int]:
    return {} if study.updates is None else {"epochs": epochs_for(size, study.base.batch_size, study.updates)}


def cell_config(study: StudyConfig, cell: Cell) -> TrainConfig:
    """The cell's full training config: base, then the task, then the method and its hyper-parameters."""
    tasks = study_tasks(study) if cell.experiment == "main" else task_overrides(study.transfer_source)
    settings = {"train_size": study.train_size, **tasks[cell.task], "method": cell.method, "seed": cell.seed,
                "output": str(cell.folder(Path(study.output))), "overwrite": False, **dict(cell.overrides)}
    return replace(study.base, **settings)


@dataclass
class Record:
    """A finished cell and its metrics (as `train` returned or wrote them)."""

    cell: Cell
    metrics: dict[str, Any]

    def score(self, split: str) -> float:
        """The task's primary metric on `split` (`dev`, `test`, or a transfer target's name)."""
        metric = self.metrics["primary_metric"]
        if split in ("dev", "test"):
            value = (self.metrics.get(split) or {}).get(metric)
        else:
            value = (self.metrics.get("transfer") or {}).get(split, {}).get(metric)
        return math.nan if value is None else float(value)


def describe(study: StudyConfig) -> dict[str, Any]:
    return {
        "tasks": task_overrides(study.tasks), "methods": list(study.methods), "seeds": list(study.seeds),
        "train_size": study.train_size, "grid": {m: _jsonable_grid(g) for m, g in study.grid.items()},
        "base": study.base.to_dict(), "baseline": study.baseline, "transfer": study.transfer,
        "transfer_source": study.transfer_source, "transfer_targets": list(study.transfer_targets),
        "transfer_methods": list(study.transfer_methods), "train_sizes": list(study.train_sizes),
        "updates": study.updates, "ledger": study.ledger, "name": study.name, "rows_by": list(study.rows_by),
    }


def _jsonable_grid(grid: MethodGrid | list[MethodGrid]) -> dict[str, list[Any]] | list[dict[str, list[Any]]]:
    if isinstance(grid, list):
        return [{k: list(v) for k, v in g.items()} for g in grid]
    return {k: list(v) for k, v in grid.items()}


def rows_apart(records: Sequence[Record], keys: Sequence[str]) -> list[Record]:
    """Records as the report's rows see them: the settings in `keys` that a cell sets move from its config
    into its method's name (`child-d (child_scope=vision)`), so the dev selection picks among the rest
    (the learning rate) within each, instead of one winner across them. The ledger keeps the cells as run."""
    out = []
    for r in records:
        named = [(k, v) for k, v in r.cell.overrides if k in keys]
        if not named:
            out.append(r)
            continue
        method = f"{r.cell.method} ({', '.join(f'{k}={v}' for k, v in named)})"
        rest = tuple((k, v) for k, v in r.cell.overrides if k not in keys)
        out.append(Record(replace(r.cell, method=method, overrides=rest), r.metrics))
    return out
