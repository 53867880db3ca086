"""`childtune`: a thin argparse layer over the library (train, compare, export, apply, analyze, study).

The options of `train` and `compare` are generated from `TrainConfig`'s fields, so the CLI, the config
file and the library can never disagree on a name or a default. A user error (bad data, unknown task or
method, existing output, unreachable registry, bad delta) is one line on stderr and exit status 2;
only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from childtune import openmp

openmp.choose_wait_policy()  # before the imports below load torch, and with it OpenMP
# models come from local folders only; bitsandbytes (imported by peft wherever it is installed) would otherwise
# ask the Hugging Face hub for a CPU kernel (models/quantized.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from childtune.cli.commands import (  # noqa: E402
    COMPARE_OWN,
    RESUME_SAFE,
    STUDY_OWN,
    cmd_analyze,
    cmd_apply,
    cmd_compare,
    cmd_evaluate,
    cmd_export,
    cmd_generate,
    cmd_merge,
    cmd_study,
    cmd_train,
)
from childtune.cli.options import add_config_options, at_least, comma_list, flag, grid, seed_list  # noqa: E402
from childtune.training.config import MULTITASK_FIELDS  # noqa: E402
from childtune.training.methods import METHODS  # noqa: E402

EXIT_USAGE = 2


def _list(text: str) -> list[str]:
    return list(comma_list(text))


def _ints(text: str) -> list[int]:
    return list(seed_list(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="childtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune one model with one method",
                           description="Fine-tune with one method; writes config.json, metrics.json, "
                                       "metrics.jsonl and the weights (delta/ or model/) into --output.")
    train.add_argument("--config", metavar="FILE", help="start from this config.json (options override it)")
    train.add_argument("--nproc", type=at_least(1), default=1, metavar="N",
                       help="train on N processes with DDP (gloo on CPU, nccl on GPUs); see docs/distributed.md [1]")
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue the interrupted run whose --output was RUN, from its last checkpoint, with its "
                            "saved settings: any other option is refused except those that change no result ("
                            + ", ".join(flag(key) for key in sorted(RESUME_SAFE))
                            + ", --checkpoint-every; --nproc as before)")
    train.add_argument("--checkpoint-every", type=at_least(0), default=None, metavar="N",
                       help="save a resumable checkpoint every N updates (0: never) [200; never with --fsdp]")
    add_config_options(train)
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="run a grid of methods x seeds and tabulate it",
                             description="Train every method with every seed; print mean ± std per method, "
                                         "write summary.csv, runs.csv and summary.png into --output.")
    compare.add_argument("--methods", type=_list, default=["full", "child-f", "child-d"],
                         metavar="A,B", help=f"methods to compare ({', '.join(METHODS)}) [full,child-f,child-d]")
    compare.add_argument("--seeds", type=_ints, default=[1], metavar="1,2,3", help="seeds [1]")
    compare.add_argument("--output", default=None, help="folder for the grid [runs/compare-TASK]")
    compare.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    compare.add_argument("--config", metavar="FILE", help="base config.json for every cell (options override it)")
    add_config_options(compare, skip=COMPARE_OWN)
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="save a run's change to its base model as a sparse delta")
    export.add_argument("run", help="a run folder written by `childtune train`")
    export.add_argument("--output", required=True, help="folder for delta_config.json + delta.safetensors")
    export.add_argument("--overwrite", action="store_true", help="replace a delta already in --output")
    export.add_argument("--format", choices=("delta", "shira"), default="delta",
                        help="childtune's sparse delta, or a peft SHiRA adapter for PeftModel.from_pretrained "
                             "(Linear weights sparse, other changed modules saved whole) [delta]")
    export.set_defaults(func=cmd_export)

    apply = sub.add_parser("apply", help="apply a sparse delta to its base model, writing a model folder")
    apply.add_argument("delta", help="a delta folder (or a run folder holding delta/)")
    apply.add_argument("--output", required=True, help="folder for the Hugging Face model")
    apply.add_argument("--model", default=None, help="base model folder or name [the delta's base model]")
    apply.add_argument("--overwrite", action="store_true", help="replace a model childtune wrote in --output")
    apply.add_argument("--task", default=None, help="a multi-task run (train --tasks): the task whose model to "
                       "write, its own delta applied after the shared one")
    apply.set_defaults(func=cmd_apply)

    evaluate = sub.add_parser("evaluate", help="score a model folder on a task without training it (e.g. one "
                              "`apply` or `merge` made)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.add_argument("--run", metavar="RUN", default=None,
                          help="score a finished run folder on its own task(s) as it would ship (base + delta; each "
                               "task of a multi-task run on its own); the other options are then ignored but "
                               "--no-progress and --device")
    add_config_options(evaluate, skip=MULTITASK_FIELDS)
    evaluate.set_defaults(func=cmd_evaluate)

    merge = sub.add_parser("merge", help="merge the sparse deltas of runs on one base, each its own task (TIES, "
                           "DARE or their sum), keeping each task's head")
    merge.add_argument("runs", nargs="+", help="run folders written by `childtune train` on the same base model")
    merge.add_argument("--output", required=True, help="folder for one merged delta per task (with its head)")
    merge.add_argument("--how", choices=("sum", "ties", "dare"), default="ties",
                       help="task arithmetic, TIES (trim, elect sign, disjoint mean) or DARE (drop and rescale), as "
                            "peft defines them [ties]")
    merge.add_argument("--density", type=float, default=1.0,
                       help="ties and dare: the share of each delta's changed elements kept (ties: the largest; "
                            "dare: at random, rescaled) [1.0]")
    merge.add_argument("--weights", default=None, help="comma-separated weight per run [1 each]")
    merge.add_argument("--seed", type=int, default=0, help="dare's draws [0]")
    merge.add_argument("--overwrite", action="store_true", help="replace a merge childtune wrote in --output")
    merge.set_defaults(func=cmd_merge)

    generate = sub.add_parser("generate", help="complete prompts with a tuned causal LM (a run) or any causal LM",
                              description="Greedy completions of prompts, by a generation run's model (its own "
                                          "chat template and max_length) or a causal-LM folder or pinned name.")
    generate.add_argument("source", help="a generation run folder, a causal-LM folder, or smollm2-135m")
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for several); with --image, the "
                                                            "question to ask (default: the run's task's)")
    generate.add_argument("--image", action="append", metavar="FILE",
                          help="ask a vision-language run (--model crnn-smollm2) about this PNG/JPEG (repeat)")
    generate.add_argument("--input", default=None, help="prompts: a text file (one a line) or JSONL with 'prompt'")
    generate.add_argument("--output", default=None, help="write JSONL {prompt, completion} here [print]")
    generate.add_argument("--overwrite", action="store_true", help="replace the file already at --output")
    generate.add_argument("--max-new-tokens", type=at_least(1), default=32, help="longest completion [32]")
    generate.add_argument("--batch-size", type=at_least(1), default=16, help="prompts decoded together [16]")
    generate.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=False,
                          help="wrap prompts in the tokenizer's chat template (a run's own setting wins if on)")
    generate.set_defaults(func=cmd_generate)

    analyze = sub.add_parser("analyze", help="where child networks sit (layers, parameter types) and how they overlap",
                             description="Which pretrained weights each child network uses (per layer, per "
                                         "parameter type) and how much two of them overlap, beside chance.")
    add_analyze_arguments(analyze)
    analyze.set_defaults(func=cmd_analyze)

    study = sub.add_parser("study", help="the resumable multi-task study behind docs/RESULTS.md",
                           description="Every method on every task over seeds, tested against full fine-tuning; "
                                       "resumable, with tables, plots and a Markdown report.")
    add_study_arguments(study)
    study.add_argument("--config", metavar="FILE", help="base config.json for every cell (options override it)")
    add_config_options(study, skip=STUDY_OWN)
    study.set_defaults(func=cmd_study)
    return parser


def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `childtune analyze`."""
    parser.add_argument("inputs", nargs="+", metavar="[NAME=]PATH",
                        help="child networks: run folders, delta folders or masks .safetensors files; NAME labels "
                             "it in the tables and plots [task method seed, read from the run]")
    parser.add_argument("--output", required=True, help="folder for the tables (CSV, Markdown) and PNGs")
    parser.add_argument("--overwrite", action="store_true", help="replace an analysis childtune wrote in --output")
    parser.add_argument("--include-head", action="store_true",
                        help="count the task head too (left out by default: it is new and trained whole)")
    return parser


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's own options (its base training config's options come from `add_config_options`)."""
    from childtune.study.plan import BASELINE, SEEDS, TASKS, TRANSFER_METHODS
    from childtune.study.plan import METHODS as STUDY_METHODS

    parser.add_argument("--tasks", type=comma_list, default=TASKS, help=f"comma-separated [{','.join(TASKS)}]")
    parser.add_argument("--methods", type=comma_list, default=STUDY_METHODS,
                        help=f"comma-separated [{','.join(STUDY_METHODS)}]")
    parser.add_argument("--seeds", type=seed_list, default=SEEDS, help="e.g. 1,2,3 or 1-5 [1-5]")
    parser.add_argument("--baseline", default=BASELINE, choices=sorted(METHODS), metavar="METHOD",
                        help=f"the method every other is paired with by seed in the tables [{BASELINE}]")
    parser.add_argument("--rows-by", type=comma_list, default=(), metavar="SETTING,...",
                        help="settings compared rather than tuned: cells differing in one are separate rows of the "
                             "tables (e.g. child_scope), where otherwise each method's best config on dev is its row")
    parser.add_argument("--train-size", type=int, default=1000, help="training examples per run [1000]")
    parser.add_argument("--train-sizes", type=_ints, default=(), metavar="100,300,...",
                        help="the low-resource curve: run every task at each of these training-set sizes")
    parser.add_argument("--updates", type=int, default=None, metavar="N",
                        help="with --train-sizes: set each size's epochs for about N optimizer updates, so small "
                             "sizes are not under-trained by a fixed epoch count [--epochs at every size]")
    parser.add_argument("--ledger", default=None, metavar="FILE",
                        help="JSON-lines ledger of finished cells: planned from (recorded cells are not rerun) "
                             "and appended to; commit it to keep results across machines")
    parser.add_argument("--name", default="", help="names this study's block in a shared --results file and "
                                                   "prefixes its figures")
    parser.add_argument("--grid", type=grid, default="paper", metavar="paper|defaults|JSON",
                        help="paper: the papers' p / lr sweep; defaults: one config per method; or a JSON object "
                             'like \'{"child-d": {"reserve_p": [0.1, 0.3]}}\' (methods absent from it use their '
                             "defaults) [paper]")
    parser.add_argument("--no-transfer", action="store_true", help="skip the domain-transfer experiment")
    parser.add_argument("--transfer-methods", type=comma_list, default=TRANSFER_METHODS,
                        help=f"[{','.join(TRANSFER_METHODS)}]")
    parser.add_argument("--no-analysis", action="store_true", help="skip the child-network analysis")
    parser.add_argument("--output", default="runs/study", help="study folder, resumed if it exists [runs/study]")
    parser.add_argument("--results", default=None, help="Markdown report to write [OUTPUT/RESULTS.md]")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the runs already done, the rest marked not yet run")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from childtune.data.assets import AssetError
    from childtune.training.loop import TrainError

    return ValueError, OSError, AssetError, TrainError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc re-runs under torchrun
    try:
        return args.func(args)
    except _user_errors() as err:
        from childtune.training.launch import report_error

        report_error(" ".join(str(err).split()) or type(err).__name__)
        return EXIT_USAGE
    except KeyboardInterrupt:
        from childtune.training.distributed import info

        if info().is_main:  # every rank of a --nproc job is interrupted; one says so
            print("childtune: interrupted; finished runs are kept, an unfinished one left no run folder "
                  "(run the same command again to resume)", file=sys.stderr)
        return 130

