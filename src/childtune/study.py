"""The study of issue 6: every method on every task over seeds, tested against full fine-tuning.

A grid of (task, method, hyper-parameters, seed) cells, each one ordinary `train.train` run in its own
folder `runs/<task>/<method>/<config>/seed<k>/`. A cell whose `metrics.json` exists is done and is read
back, never retrained, so a study killed after hours resumes where it stopped (a cell killed half way
left only a hidden `.partial` folder: the next attempt resumes it from its checkpoint if it has one,
else replaces it). This is `report.compare` made
resumable per cell and extended with hyper-parameter selection and paired tests; the tables, plots
and Markdown report are written by `childtune.study_report`.

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

import argparse
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from childtune.checkpoint import checkpoint_dir
from childtune.config import TrainConfig
from childtune.fileio import write_json
from childtune.report import partial_dir
from childtune.train import Callback

if TYPE_CHECKING:
    from childtune.study_report import StudyResult

Grid = dict[str, dict[str, tuple[Any, ...]]]

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


# ---------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    experiment: str  # "main" or "transfer"
    task: str
    method: str
    overrides: tuple[tuple[str, Any], ...]  # the hyper-parameters this cell sets, sorted by key
    seed: int

    @property
    def label(self) -> str:
        """The config's name, safe as a folder name: `p0.1-lr2e-05`, or `default`."""
        return "-".join(f"{_SHORT.get(k, k)}{v}" for k, v in self.overrides) or "default"

    def folder(self, output: Path) -> Path:
        return output / ("runs" if self.experiment == "main" else "transfer") / self.task / self.method / (
            self.label) / f"seed{self.seed}"


def configs(grid: Grid, method: str) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the method's grid values (one empty config when the grid has none)."""
    values = grid.get(method, {})
    keys = sorted(values)
    known = {f.name for f in fields(TrainConfig)}
    for key in keys:
        if key not in known:
            raise StudyError(f"grid for {method!r} sets {key!r}, which is not a training setting")
        if not values[key]:
            raise StudyError(f"grid for {method!r} gives no values for {key!r}")
    return [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*(values[k] for k in keys))]


def task_overrides(tasks: str | Sequence[str] | Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Task name -> the `TrainConfig` fields that select it."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    if isinstance(tasks, Mapping):
        return {name: dict(over) for name, over in tasks.items()}
    return {name: {"task": name} for name in tasks}


def plan(study: StudyConfig) -> list[Cell]:
    """Every cell of the study in the order they run: seed by seed, so that a study stopped early has
    complete seeds, every method paired with the baseline on each, rather than some methods with none."""
    source = next(iter(task_overrides(study.transfer_source)))
    cells = []
    for seed in study.seeds:
        cells += [Cell("main", task, method, config, seed)
                  for task in task_overrides(study.tasks)
                  for method in study.methods
                  for config in configs(study.grid, method)]
        if study.transfer:
            cells += [Cell("transfer", source, method, config, seed)
                      for method in study.transfer_methods
                      for config in configs(study.grid, method)]
    return cells


def cell_config(study: StudyConfig, cell: Cell) -> TrainConfig:
    """The cell's full training config: base, then the task, then the method and its hyper-parameters."""
    tasks = study.tasks if cell.experiment == "main" else study.transfer_source
    return replace(study.base, **task_overrides(tasks)[cell.task], method=cell.method, seed=cell.seed,
                   train_size=study.train_size, output=str(cell.folder(Path(study.output))), overwrite=False,
                   **dict(cell.overrides))


# ---------------------------------------------------------------------------------------------- running


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

        from childtune.data import make_collate
        from childtune.tasks import TASKS
        from childtune.train import evaluate, model_folder

        config = state.config
        source = TASKS.get(metrics["task"]) or _file_spec(config)
        tokenizer = AutoTokenizer.from_pretrained(model_folder(config.model))
        results = {}
        for target in self.targets:
            spec, examples = _target(target, source)
            collate = make_collate(tokenizer, config.max_length, spec.kind)
            results[target] = evaluate(state.model, examples, spec, collate, config, f"eval {target}")
        metrics["transfer"] = results
        if state.workdir is not None:
            write_json(Path(state.workdir) / "transfer.json", results)


def _file_spec(config: TrainConfig):
    from childtune.train import load_data

    return load_data(config).spec


def _target(target: str, source) -> tuple[Any, list]:
    """The target's test examples and the spec to score them with (the source's, checked compatible)."""
    from childtune.tasks import TASKS, load_task
    from childtune.userfiles import load_files

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


def run_cells(study: StudyConfig, run: Callable[..., dict[str, Any]] | None = None,
              progress: bool = True, train_missing: bool = True) -> list[Record]:
    """Train every cell not yet done (in plan order), read back the done ones; return all records.

    `train_missing=False` only reads back what is done, to report a study that is still under way.
    """
    from childtune.train import train

    run = run or train
    cells = plan(study)
    if not cells:
        raise StudyError("the study has no cells: give at least one task, method and seed")
    config_of = {cell: cell_config(study, cell) for cell in cells}
    for config in config_of.values():
        config.resolved()  # every cell is checked before the first one trains
    output = Path(study.output)
    write_json(output / "study.json", _describe(study))
    records = []
    bar = tqdm(cells, desc="study", unit="run", disable=not progress)
    done = 0
    for cell in bar:
        folder = cell.folder(output)
        bar.set_postfix_str(f"{cell.task} {cell.method} {cell.label} seed{cell.seed}")
        if _finished(folder, cell):
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            if cell.experiment == "transfer":
                metrics["transfer"] = json.loads((folder / "transfer.json").read_text(encoding="utf-8"))
            done += 1
        elif not train_missing:
            continue
        else:
            callbacks = [TransferEval(study.transfer_targets)] if cell.experiment == "transfer" else []
            config = config_of[cell]
            if folder.exists():  # metrics.json missing: not a finished run of ours (e.g. no transfer.json)
                config = replace(config, overwrite=True)
            if checkpoint_dir(partial_dir(folder)) is not None:  # killed after a checkpoint: go on from there
                metrics = run(config, callbacks, resume=True)
            else:
                metrics = run(config, callbacks)
        records.append(Record(cell, metrics))
    bar.close()
    if progress and done:
        print(f"study: {done} of {len(cells)} runs were already done and were read back", file=sys.stderr)
    return records


def _finished(folder: Path, cell: Cell) -> bool:
    needed = ["metrics.json"] + (["transfer.json"] if cell.experiment == "transfer" else [])
    return all((folder / name).is_file() for name in needed)


def _describe(study: StudyConfig) -> dict[str, Any]:
    return {
        "tasks": task_overrides(study.tasks), "methods": list(study.methods), "seeds": list(study.seeds),
        "train_size": study.train_size, "grid": {m: {k: list(v) for k, v in g.items()} for m, g in study.grid.items()},
        "base": study.base.to_dict(), "baseline": study.baseline, "transfer": study.transfer,
        "transfer_source": study.transfer_source, "transfer_targets": list(study.transfer_targets),
        "transfer_methods": list(study.transfer_methods),
    }


def run_study(study: StudyConfig, *, run: Callable[..., dict[str, Any]] | None = None, command: str | None = None,
              results: str | Path | None = None, progress: bool = True, train_missing: bool = True) -> StudyResult:
    """Run (or resume) every cell of `study`, then write its tables, plots, analysis and report.

    `run` is the training function, `train.train` by default (called as `run(config, callbacks)`).
    With `train_missing=False` nothing is trained: the report covers the cells already done and lists
    the rest as not yet run.
    """
    from childtune.study_report import report

    records = run_cells(study, run, progress, train_missing)
    return report(study, records, command, results)


# ---------------------------------------------------------------------------------------------- command line


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _grid(text: str) -> Grid:
    """`paper`, `defaults`, or a JSON object {method: {setting: [values]}}."""
    if text in ("paper", "defaults"):
        return dict(PAPER_GRID if text == "paper" else DEFAULT_GRID)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--grid must be paper, defaults or a JSON object ({err})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(g, dict) and all(isinstance(v, list) for v in g.values()) for g in raw.values()
    ):
        raise argparse.ArgumentTypeError('--grid JSON must look like {"method": {"setting": [values]}}')
    return {method: {k: tuple(v) for k, v in g.items()} for method, g in raw.items()}


def _seeds(text: str) -> tuple[int, ...]:
    """`1,2,3` or `1-5` (inclusive)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if match:
        return tuple(range(int(match.group(1)), int(match.group(2)) + 1))
    return tuple(int(x) for x in _csv(text))


SKIP_CONFIG_OPTIONS = frozenset({"task", "train_file", "dev_file", "test_file", "method", "seed", "train_size",
                                  "output", "overwrite"})
"""`TrainConfig` fields the study sets per cell or takes as its own options: a CLI that offers every other
training option for the study's base config must leave these out."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's own options (the base training config's options are the caller's business)."""
    parser.add_argument("--tasks", type=_csv, default=TASKS, help=f"comma-separated [{','.join(TASKS)}]")
    parser.add_argument("--methods", type=_csv, default=METHODS, help=f"comma-separated [{','.join(METHODS)}]")
    parser.add_argument("--seeds", type=_seeds, default=SEEDS, help="e.g. 1,2,3 or 1-5 [1-5]")
    parser.add_argument("--train-size", type=int, default=1000, help="training examples per run [1000]")
    parser.add_argument("--grid", type=_grid, default="paper", metavar="paper|defaults|JSON",
                        help="paper: the papers' p / lr sweep; defaults: one config per method; or a JSON object "
                             'like \'{"child-d": {"reserve_p": [0.1, 0.3]}}\' (methods absent from it use their '
                             "defaults) [paper]")
    parser.add_argument("--no-transfer", action="store_true", help="skip the domain-transfer experiment")
    parser.add_argument("--transfer-methods", type=_csv, default=TRANSFER_METHODS,
                        help=f"[{','.join(TRANSFER_METHODS)}]")
    parser.add_argument("--no-analysis", action="store_true", help="skip the child-network analysis")
    parser.add_argument("--output", default="runs/study", help="study folder, resumed if it exists [runs/study]")
    parser.add_argument("--results", default=None, help="Markdown report to write [OUTPUT/RESULTS.md]")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the runs already done, the rest marked not yet run")
    return parser


def from_args(args: argparse.Namespace, base: TrainConfig) -> StudyConfig:
    """The study the parsed options describe, every cell starting from `base`.

    Per-run progress bars are off unless `--progress` was given: the study's own bar names the cell.
    """
    if not hasattr(args, "progress"):
        base = replace(base, progress=False)
    return StudyConfig(
        tasks=args.tasks, methods=args.methods, seeds=args.seeds, train_size=args.train_size,
        grid=_grid(args.grid) if isinstance(args.grid, str) else args.grid, base=base, output=args.output,
        transfer=not args.no_transfer, transfer_methods=args.transfer_methods, analysis=not args.no_analysis,
    )


def run_from_args(args: argparse.Namespace, base: TrainConfig, command: str) -> int:
    """What `childtune study` does once its options are parsed; prints the selected rows and the report path.

    The report quotes the command without `--report-only`: that is the command that makes (or resumes)
    the numbers it shows.
    """
    from childtune.study_report import fmt

    command = " ".join(part for part in command.split(" ") if part != "--report-only")
    result = run_study(from_args(args, base), command=command, results=args.results,
                       train_missing=not args.report_only)
    for row in result.main:
        print(f"{row.task:12s} {row.method:8s} {row.config:24s} n={len(row.scores)} {fmt(row.mean)} ± {fmt(row.std)}")
    print(f"report: {result.files['results']}")
    return 0
