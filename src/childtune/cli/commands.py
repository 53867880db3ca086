"""What each `childtune` subcommand does once its options are parsed: build the config, call the
library, print one line (or a table) saying what was written."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from childtune.cli.options import ACT_OF_WRITING, config_from_args, flag, given_options, grid
from childtune.training.config import MULTITASK_FIELDS, TrainConfig

STUDY_OWN = ACT_OF_WRITING | MULTITASK_FIELDS | {"task", "train_file", "dev_file", "test_file", "method", "seed",
                                                 "train_size"}
"""`TrainConfig` fields the study sets per cell or takes as its own options."""

COMPARE_OWN = ACT_OF_WRITING | {"method", "seed"}
"""Config fields `compare` sets per cell or takes as its own options (with `--tasks`, each cell is a multi-task
run: `childtune.multitask`)."""


RESUME_SAFE = frozenset({"progress", "log_every", "report_to"})
"""Options `--resume` takes: how the run shows its progress and logs, never what it computes (the
checkpoint refuses any other change too, see `config.NOT_SETTINGS`)."""


def _resumed(args: argparse.Namespace) -> TrainConfig:
    """The interrupted run's own config, with the `RESUME_SAFE` options given applied: a resume continues
    that run, so any other option (or `--config`) is refused by name, never silently ignored."""
    from childtune.training.config import ConfigError
    from childtune.training.runfolder import partial_dir

    given = given_options(args)
    refused = [flag(key) for key in given if key not in RESUME_SAFE] + (["--config"] if args.config else [])
    if refused:
        raise ConfigError(f"--resume continues {args.resume} with its saved settings, which {', '.join(refused)} "
                          f"would change; with --resume give only {', '.join(flag(k) for k in sorted(RESUME_SAFE))}, "
                          "--checkpoint-every or --nproc")
    saved = partial_dir(args.resume) / "config.json"
    if not saved.is_file():
        finished = (Path(args.resume) / "metrics.json").is_file()
        raise FileNotFoundError(f"{args.resume} is a finished run: nothing to resume (train again with --overwrite "
                                "to replace it)" if finished else
                                f"no interrupted run to resume at {args.resume}: {saved} does not exist")
    return replace(TrainConfig.load_json(saved), **given)


def apart_from_config_file(args: argparse.Namespace, output: str) -> None:
    """The output rule (`childtune.outputs`) for the `--config` file, an input only the command line knows
    of (the library checks the model and data files the config names)."""
    from childtune.outputs import check_target

    if getattr(args, "config", None):
        check_target(output, reads=[args.config])


def cmd_train(args: argparse.Namespace) -> int:
    from childtune.training import distributed
    from childtune.training.checkpoint import Checkpointer
    from childtune.training.config import ConfigError
    from childtune.training.loop import train
    from childtune.training.runfolder import partial_dir

    config = _resumed(args) if args.resume else config_from_args(args)
    if config.tasks is not None:
        return _train_tasks(args, config)
    if args.checkpoint_every is None:
        args.checkpoint_every = 0 if config.fsdp else 200
    if (args.checkpoint_every or args.resume) and config.fsdp:
        raise ConfigError("--checkpoint-every / --resume with --fsdp: checkpoints save one process's state, and a "
                          "sharded run's is spread over all of them; run without checkpoints, or with DDP")
    if args.nproc > 1 and not distributed.info().distributed:  # re-run this command as N ranks under torchrun
        config.resolved(processes=args.nproc)  # a bad value fails here, once, before any rank starts
        from childtune.training.launch import launch

        return launch(args.argv, args.nproc)
    output = config.output
    if output is None:
        name = config.task or Path(config.train_file or "data").stem
        output = str(Path("runs") / f"{name}-{config.method}-seed{config.seed}")
        config = replace(config, output=output)
    apart_from_config_file(args, output)
    checkpoints = []
    if args.checkpoint_every or args.resume:
        checkpoints.append(Checkpointer(args.checkpoint_every or sys.maxsize, resume=bool(args.resume),
                                        directory=partial_dir(output)))
    try:
        metrics = train(config, checkpoints, resume=bool(args.resume))
        # no rank leaves while rank 0 still writes the run: a rank tearing its process group down meanwhile
        # was seen to abort ('terminate called without an active exception') in 1 of 6 CLI FSDP runs
        distributed.barrier()
    finally:
        distributed.shutdown()
    if not distributed.info().is_main:
        return 0
    split = "test" if metrics["test"] else "dev"
    primary = metrics["primary_metric"]
    dev = f", dev {primary} {metrics['dev'][primary]:.4f}" if split == "test" else ""
    print(f"{metrics['method']} on {metrics['task']}: {split} {primary} {metrics[split][primary]:.4f}{dev}; "
          + (f"changed {metrics['changed_params']:,} of {metrics['total_params']:,} weights"
             if metrics["changed_params"] is not None else
             f"trained {metrics['trainable_params']:,} adapter weights over the {config.base_bits}-bit base")
          + (f"; skipped {metrics['skipped_steps']} of {metrics['steps'] + metrics['skipped_steps']} steps "
             "(non-finite loss or gradient)" if metrics["skipped_steps"] else "")
          + f"; wrote {config.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from childtune.study.compare import compare

    config = config_from_args(args)
    output = args.output or str(Path("runs") / f"compare-{config.task or (config.tasks or 'data').replace(',', '+')}")
    apart_from_config_file(args, output)
    result = compare(config, args.methods, args.seeds, output, overwrite=args.overwrite)
    print(result.table)
    print(f"wrote {output}/summary.csv, {output}/summary.png, {output}/runs.csv")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from childtune.training.export import export_delta, export_shira

    if args.format == "delta":
        c = export_delta(args.run, args.output, overwrite=args.overwrite).config
        print(f"wrote {args.output}: {c.num_changed:,} of {c.num_elements:,} base weights changed "
              f"({100 * c.num_changed / max(1, c.num_elements):.3g}%), plus a {c.num_dense:,}-weight head")
    else:
        shira = export_shira(args.run, args.output, overwrite=args.overwrite)
        whole = ", ".join(shira.whole[:3]) + (f" and {len(shira.whole) - 3} more" if len(shira.whole) > 3 else "")
        print(f"wrote {args.output}: a peft SHiRA adapter (r={shira.r}) over {len(shira.targets)} Linear layers, "
              f"{shira.changed:,} changed weights in {shira.stored:,} stored values (zero padding: peft gives "
              f"every layer r*(in+out)); saved whole: {whole or 'nothing'}")
    return 0


def _train_tasks(args: argparse.Namespace, config) -> int:
    """`train --tasks`: the multi-task recipe (`childtune.multitask`), one process, checkpointed as a
    single-task run is (every 200 steps by default; none with --merge) and resumable."""
    from childtune.multitask.run import train_tasks
    from childtune.training.config import ConfigError

    if args.nproc > 1:
        raise ConfigError("--tasks runs one process: not with --nproc")
    output = config.output or str(Path("runs") / f"{'+'.join(config.task_names())}-{config.method}-seed{config.seed}")
    config = replace(config, output=output)
    apart_from_config_file(args, output)
    every = args.checkpoint_every if args.checkpoint_every is not None else 0 if config.merge else 200
    metrics = train_tasks(config, checkpoint_every=every, resume=bool(args.resume))
    for task, result in metrics["tasks"].items():
        split = "test" if result["test"] else "dev"
        primary = result["primary_metric"]
        print(f"{task}: {split} {primary} {result[split][primary]:.4f}")
    print(f"wrote {output}: shared/delta and tasks/<task>/delta, {metrics['stored_bytes']:,} bytes in all "
          f"(childtune apply {output} --task NAME makes a task's model)")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from childtune.training.export import apply_delta

    apply_delta(args.delta, args.output, model=args.model, overwrite=args.overwrite, task=args.task)
    print(f"wrote {args.output}: a Hugging Face model folder (base + delta)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from childtune.training.scoring import score, score_run

    config = config_from_args(args)
    if args.run:
        results = score_run(args.run, progress=config.progress, device=config.device)
    else:
        config.validate()
        result = score(config)
        results = {result["task"]: result}
    if args.json:
        print(json.dumps(results if args.run else result))
        return 0
    for task, result in results.items():
        metric = result["primary_metric"]
        test = f", test {metric} {result['test'][metric]:.4f}" if result["test"] else ""
        print(f"{args.run or result['model']} on {task}: dev {metric} {result['dev'][metric]:.4f}{test}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from childtune.training.export import merge_runs

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    merged = merge_runs(args.runs, args.output, how=args.how, density=args.density, weights=weights, seed=args.seed,
                        overwrite=args.overwrite)
    c = next(iter(merged.values())).config
    print(f"wrote {args.output}: {args.how} of {len(merged)} runs, {c.num_changed:,} of {c.num_elements:,} base "
          f"weights changed, one folder per task ({', '.join(merged)}) with its own head; "
          f"`childtune apply {Path(args.output) / next(iter(merged))}` makes that task's model")
    return 0


def study_from_args(args: argparse.Namespace, base: TrainConfig):
    """The study the parsed options describe, every cell starting from `base`.

    Per-run progress bars are off unless `--progress` was given: the study's own bar names the cell
    (and is off too with `--no-progress`, for logs).
    """
    from childtune.study.plan import StudyConfig

    if not hasattr(args, "progress"):
        base = replace(base, progress=False)
    return StudyConfig(
        tasks=args.tasks, methods=args.methods, seeds=args.seeds, train_size=args.train_size,
        grid=grid(args.grid) if isinstance(args.grid, str) else args.grid, base=base, output=args.output,
        transfer=not args.no_transfer, transfer_methods=args.transfer_methods, analysis=not args.no_analysis,
        train_sizes=tuple(args.train_sizes), updates=args.updates, ledger=args.ledger, name=args.name,
        baseline=args.baseline, rows_by=tuple(args.rows_by),
    )


REPORT_ONLY_FLAGS = ("--report-only", "--no-progress")
"""Study options that change how a run shows, not what it computes: the report's command leaves them out."""


def study_command(argv: list[str]) -> str:
    """The command a study report quotes: `argv` as a shell line, less `REPORT_ONLY_FLAGS`, so that
    rebuilding a report with `--report-only` quotes the command that makes (or resumes) its numbers."""
    return " ".join(["childtune", *(shlex.quote(a) for a in argv if a not in REPORT_ONLY_FLAGS)])


def cmd_study(args: argparse.Namespace) -> int:
    """Run or resume the study; print the selected rows and the report path."""
    from childtune.study.run import run_study
    from childtune.study.tables import fmt

    base = config_from_args(args, skip=STUDY_OWN)
    apart_from_config_file(args, args.output)
    command = study_command(sys.argv[1:])
    result = run_study(study_from_args(args, base), command=command, results=args.results,
                       train_missing=not args.report_only, progress=getattr(args, "progress", True))
    for row in result.main:
        print(f"{row.task:12s} {row.method:8s} {row.config:24s} n={len(row.scores)} {fmt(row.mean)} ± {fmt(row.std)}")
    print(f"report: {result.files['results']}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Write the child-network analysis of the given runs, deltas or mask files, as a folder built whole
    (`RunFolder`: apart from its inputs, replacing only an analysis childtune wrote)."""
    from childtune.study.analysis import EXCLUDE, analyze, parse_inputs
    from childtune.training.runfolder import RunFolder

    inputs = parse_inputs(args.inputs)
    with RunFolder(args.output, args.overwrite, kind="analysis", reads=inputs.values()) as work:
        paths = analyze(inputs, work, exclude=() if args.include_head else EXCLUDE)
    for path in paths.values():
        print(f"wrote {Path(args.output) / path.name}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print (or write as JSONL) the model's greedy completion of each prompt."""
    import json

    from childtune.fileio import atomic_write
    from childtune.outputs import check_output
    from childtune.training.generate import answer_images, complete

    if args.output:
        check_output(args.output, reads=[args.source, args.input, *(args.image or [])], overwrite=args.overwrite,
                     folder=False)
    prompts = list(args.prompt or [])
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first prompt
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded)") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number}: malformed JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path} line {number}: expected an object with a text 'prompt'")
                prompts.append(record["prompt"])
            else:
                prompts.append(line)
    settings = TrainConfig(max_new_tokens=args.max_new_tokens, eval_batch_size=args.batch_size,
                           chat_template=args.chat_template, progress=False)
    settings.resolved()
    if args.image:
        if len(prompts) > 1:
            raise ValueError("with --image, give at most one --prompt: the question asked of every image")
        answers = answer_images(args.source, [Path(p) for p in args.image], prompts[0] if prompts else None,
                                settings)
        prompts = list(args.image)
    else:
        answers = complete(args.source, prompts, settings)
    lines = [json.dumps({"prompt": p, "completion": a}) for p, a in zip(prompts, answers, strict=True)]
    if args.output:
        atomic_write(args.output, "\n".join(lines) + "\n")
        print(f"wrote {args.output}: {len(lines)} completions")
    else:
        for answer in answers:
            print(answer)
    return 0
