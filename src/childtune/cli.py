"""`childtune`: a thin argparse layer over the library (train, compare, export, apply, analyze, study).

The options of `train` and `compare` are generated from `TrainConfig`'s fields, so the CLI, the config
file and the library can never disagree on a name or a default. A user error (bad data, unknown task or
method, existing output, unreachable registry, bad delta) is one line on stderr and exit status 2;
only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import types
import typing
from dataclasses import MISSING, fields, replace
from pathlib import Path

from childtune.config import METHODS, TrainConfig

EXIT_USAGE = 2

_OWN = {"method", "seed", "output", "overwrite"}
"""Config fields `compare` sets per cell or takes as its own options."""


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _add_config_options(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """One option per TrainConfig field; unset options stay out of the namespace (they don't override)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(
            hint, types.UnionType) else [hint]
        kind = options[0]
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = _METHOD_DEFAULTS[f.name]() if f.name in _METHOD_DEFAULTS else default
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{f.metadata['help']} [{shown}]"}
        if kind is bool:
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(_flag(f), type=_comma_list, metavar="A,B", **common)
        else:
            parser.add_argument(_flag(f), type=kind, metavar=f.name.upper(), **common)


_METHOD_DEFAULTS = {
    "lr": lambda: ", ".join(f"{name} {m.lr:g}" for name, m in METHODS.items()),
    "reserve_p": lambda: ", ".join(f"{name} {m.reserve_p:g}" for name, m in METHODS.items() if m.reserve_p),
    "strict": lambda: "on for " + ", ".join(name for name, m in METHODS.items() if m.strict),
}


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _method_list(text: str) -> list[str]:
    return list(_comma_list(text))


def _config(args: argparse.Namespace, skip: set[str] = frozenset()) -> TrainConfig:
    """The config file (if any) with every option given on the command line applied on top."""
    base = TrainConfig.load_json(args.config) if getattr(args, "config", None) else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in skip and hasattr(args, f.name)}
    if given.keys() & {"train_file", "dev_file", "test_file"}:
        given.setdefault("task", None)  # own files replace the default task
    return replace(base, **given)


# ------------------------------------------------------------------------------------------- commands


def _resumed(run: str) -> TrainConfig:
    """The interrupted run's own config: a resume continues that run, whatever the command line says."""
    from childtune.report import partial_dir

    saved = partial_dir(run) / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"no interrupted run to resume at {run}: {saved} does not exist")
    return TrainConfig.load_json(saved)


def cmd_train(args: argparse.Namespace) -> int:
    from childtune import distributed
    from childtune.checkpoint import Checkpointer
    from childtune.report import partial_dir
    from childtune.train import train

    if args.nproc > 1 and not distributed.info().distributed:  # re-run this command as N ranks under torchrun
        return distributed.launch(args.argv, args.nproc)
    config = _resumed(args.resume) if args.resume else _config(args)
    if config.output is None:
        name = config.task or Path(config.train_file or "data").stem
        config = replace(config, output=str(Path("runs") / f"{name}-{config.method}-seed{config.seed}"))
    checkpoints = []
    if args.checkpoint_every or args.resume:
        checkpoints.append(Checkpointer(args.checkpoint_every or sys.maxsize, resume=bool(args.resume),
                                        directory=partial_dir(config.output)))
    try:
        metrics = train(config, checkpoints, resume=bool(args.resume))
    finally:
        distributed.shutdown()
    if not distributed.info().is_main:
        return 0
    split = "test" if metrics["test"] else "dev"
    primary = metrics["primary_metric"]
    print(f"{metrics['method']} on {metrics['task']}: {split} {primary} {metrics[split][primary]:.4f}, "
          f"dev {primary} {metrics['dev'][primary]:.4f}; changed {metrics['changed_params']:,} of "
          f"{metrics['total_params']:,} weights; wrote {config.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from childtune.report import compare

    config = _config(args)
    output = args.output or str(Path("runs") / f"compare-{config.task or 'data'}")
    result = compare(config, args.methods, args.seeds, output, overwrite=args.overwrite)
    print(result.table)
    print(f"wrote {output}/summary.csv, {output}/summary.png, {output}/runs.csv")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from childtune.train import export_delta

    delta = export_delta(args.run, args.output, overwrite=args.overwrite)
    c = delta.config
    print(f"wrote {args.output}: {c.num_changed:,} of {c.num_elements:,} base weights changed "
          f"({100 * c.num_changed / max(1, c.num_elements):.3g}%), plus a {c.num_dense:,}-weight head")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from childtune.train import apply_delta

    apply_delta(args.delta, args.output, model=args.model, overwrite=args.overwrite)
    print(f"wrote {args.output}: a Hugging Face model folder (base + delta)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from childtune import study

    base = _config(args, skip=set(study.SKIP_CONFIG_OPTIONS))
    command = " ".join(["childtune", *map(shlex.quote, sys.argv[1:])])
    return study.run_from_args(args, base, command)


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="childtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune one model with one method",
                           description="Fine-tune with one method; writes config.json, metrics.json, "
                                       "metrics.jsonl and the weights (delta/ or model/) into --output.")
    train.add_argument("--config", metavar="FILE", help="start from this config.json (options override it)")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train on N processes with DDP (gloo on CPU, nccl on GPUs); see docs/distributed.md [1]")
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue the interrupted run whose --output was RUN, from its last checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=200, metavar="N",
                       help="save a resumable checkpoint every N updates (0: never) [200]")
    _add_config_options(train)
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="run a grid of methods x seeds and tabulate it",
                             description="Train every method with every seed; print mean ± std per method, "
                                         "write summary.csv, runs.csv and summary.png into --output.")
    compare.add_argument("--methods", type=_method_list, default=["full", "child-f", "child-d"],
                         metavar="A,B", help=f"methods to compare ({', '.join(METHODS)}) [full,child-f,child-d]")
    compare.add_argument("--seeds", type=_int_list, default=[1], metavar="1,2,3", help="seeds [1]")
    compare.add_argument("--output", default=None, help="folder for the grid [runs/compare-TASK]")
    compare.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    compare.add_argument("--config", metavar="FILE", help="base config.json for every cell (options override it)")
    _add_config_options(compare, skip=_OWN)
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="save a run's change to its base model as a sparse delta")
    export.add_argument("run", help="a run folder written by `childtune train`")
    export.add_argument("--output", required=True, help="folder for delta_config.json + delta.safetensors")
    export.add_argument("--overwrite", action="store_true", help="replace a delta already in --output")
    export.set_defaults(func=cmd_export)

    apply = sub.add_parser("apply", help="apply a sparse delta to its base model, writing a model folder")
    apply.add_argument("delta", help="a delta folder (or a run folder holding delta/)")
    apply.add_argument("--output", required=True, help="folder for the Hugging Face model")
    apply.add_argument("--model", default=None, help="base model folder or name [the delta's base model]")
    apply.add_argument("--overwrite", action="store_true", help="replace a model childtune wrote in --output")
    apply.set_defaults(func=cmd_apply)

    from childtune import analysis, study

    analyze = sub.add_parser("analyze", help="where child networks sit (layers, parameter types) and how they overlap",
                             description=analysis.__doc__.splitlines()[0])
    analysis.add_arguments(analyze)
    analyze.set_defaults(func=analysis.run_from_args)

    grid = sub.add_parser("study", help="the resumable multi-task study behind docs/RESULTS.md",
                          description=study.__doc__.splitlines()[0])
    study.add_arguments(grid)
    grid.add_argument("--config", metavar="FILE", help="base config.json for every cell (options override it)")
    _add_config_options(grid, skip=set(study.SKIP_CONFIG_OPTIONS))
    grid.set_defaults(func=cmd_study)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from childtune.assets import AssetError
    from childtune.train import TrainError

    return ValueError, OSError, AssetError, TrainError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc re-runs under torchrun
    try:
        return args.func(args)
    except _user_errors() as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"childtune: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("childtune: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
