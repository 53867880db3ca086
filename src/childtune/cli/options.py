"""Command-line options generated from `TrainConfig`, and the parsers for list-valued options.

The options of `train`, `compare` and `study` are generated from `TrainConfig`'s fields, so the CLI,
the config file and the library can never disagree on a name or a default.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from dataclasses import MISSING, fields, replace
from typing import Any

from childtune.training.config import ConfigError, TrainConfig, unique_keys
from childtune.training.methods import METHODS, PRESET_FIELDS, PRESETS

ACT_OF_WRITING = frozenset({"output", "overwrite"})
"""Options about where and whether a run is written, which `compare` and `study` set per cell."""


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def flag(name: str) -> str:
    """The command-line option of the TrainConfig field `name`."""
    return next(_flag(f) for f in fields(TrainConfig) if f.name == name)


def _preset_default(key: str) -> str:
    """`key`'s default per preset: one value where every method agrees, else method by method."""
    parts = []
    for preset in PRESETS:
        values = {name: m.defaults(preset)[key] for name, m in METHODS.items()}
        if key == "reserve_p":
            values = {n: v for n, v in values.items() if v is not None}
        shown = {f"{v:g}" if isinstance(v, float) else str(v) for v in values.values()}
        text = next(iter(shown)) if len(shown) == 1 else ", ".join(
            f"{n} {v:g}" if isinstance(v, float) else f"{n} {v}" for n, v in values.items())
        parts.append(f"{preset}: {text}")
    return "; ".join(parts)


_METHOD_DEFAULTS = {key: (lambda key=key: _preset_default(key)) for key in PRESET_FIELDS}


def add_config_options(parser: argparse.ArgumentParser, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """One option per TrainConfig field; unset options stay out of the namespace (they don't override)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        hint = hints[f.name]
        options = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(
            hint, types.UnionType) else [hint]
        kind = options[0]
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"TrainConfig.{f.name} needs a default: an option left unset takes it")
        shown = _METHOD_DEFAULTS[f.name]() if f.name in _METHOD_DEFAULTS else default
        # an unset default (None: the method's, or nothing) is said by the help text itself, not as "[None]"
        common: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f.metadata["help"] if shown is None else f"{f.metadata['help']} [{shown}]"}
        if kind is bool:
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(_flag(f), type=comma_list, metavar="A,B", **common)
        else:
            parser.add_argument(_flag(f), type=kind, metavar=f.name.upper(), **common)


def config_from_args(args: argparse.Namespace, skip: frozenset[str] | set[str] = frozenset()) -> TrainConfig:
    """The config file (if any) with every option given on the command line applied on top.

    A saved config says what a run computed; where it was written and whether that replaced something
    (`output`, `overwrite`) are acts of that run and are never replayed from the file.
    """
    base = TrainConfig.load_json(args.config) if getattr(args, "config", None) else TrainConfig()
    base = replace(base, **{key: getattr(TrainConfig(), key) for key in ACT_OF_WRITING})
    given = given_options(args, skip)
    if given.keys() & {"train_file", "dev_file", "test_file"}:
        given.setdefault("task", None)  # own files replace the default task
    return replace(base, **given)


def given_options(args: argparse.Namespace, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The TrainConfig fields set on the command line (an option not given is absent from `args`)."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in skip and hasattr(args, f.name)}


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, else a usage error naming the bound (`--nproc 0`
    would otherwise run as one process, `--checkpoint-every -1` as never)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


# ------------------------------------------------------------------------------------------ list values


def comma_list(text: str) -> tuple[str, ...]:
    """`a, b,c` -> ("a", "b", "c"); empty parts dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def seed_list(text: str) -> tuple[int, ...]:
    """`1,2,3` or `1-5` (inclusive)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if match:
        return tuple(range(int(match.group(1)), int(match.group(2)) + 1))
    try:
        return tuple(int(part) for part in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or A-B, got {text!r}") from None


def grid(text: str) -> dict[str, Any]:
    """`paper`, `defaults`, or a JSON object {method: {setting: [values]}} (or a list of such objects per
    method: the union of their combinations)."""
    from childtune.study.plan import DEFAULT_GRID, PAPER_GRID

    if text in ("paper", "defaults"):
        return dict(PAPER_GRID if text == "paper" else DEFAULT_GRID)
    try:
        raw = json.loads(text, object_pairs_hook=unique_keys("--grid"))
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--grid must be paper, defaults or a JSON object ({err})") from None
    def one(g: Any) -> bool:
        return isinstance(g, dict) and all(isinstance(v, list) for v in g.values())

    if not isinstance(raw, dict) or not all(one(g) or (isinstance(g, list) and g and all(map(one, g)))
                                            for g in raw.values()):
        raise argparse.ArgumentTypeError('--grid JSON must look like {"method": {"setting": [values]}}, or '
                                         'a list of such {"setting": [values]} objects for a method')
    return {method: [{k: tuple(v) for k, v in alt.items()} for alt in g] if isinstance(g, list)
            else {k: tuple(v) for k, v in g.items()} for method, g in raw.items()}
