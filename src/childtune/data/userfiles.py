"""Tasks from the user's own CSV or JSONL files, checked so that a bad file fails in one clear line.

Training may run for hours; a file with a missing column, a stray label or a broken line should stop
it before it starts, with an error that names the file, the line and the problem, rather than
surface as a shape mismatch deep in the loop. Labels are inferred (regression or classes) the same
way for every split, and a dev or test label never seen in train is refused.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from childtune.data.images import read_folder
from childtune.data.types import DataError, Example, Kind, TaskData, TaskSpec


def load_files(
    train: str | Path,
    dev: str | Path,
    test: str | Path | None = None,
    *,
    text_col: str = "text",
    label_col: str = "label",
    kind: Kind | None = None,
    text_pair_col: str | None = None,
    prompt_col: str = "prompt",
    target_col: str = "target",
) -> TaskData:
    """A task from the user's CSV or JSONL files (chosen by suffix), validated with one-line errors; or, when
    `train` is a folder, an image task from folders with one sub-folder per class (`_image_folders`).

    `kind=None` infers generation when the train file has the prompt and target columns and no text column
    (nothing else could read it), and otherwise infers the kind from the train labels: classification when
    every label is a class name or a whole number, regression when most numeric labels are fractions;
    anything between (a stray 0.5 among 0/1 labels, fractions beside names) is refused with the rows that
    disagree, since either guess would silently train the wrong task. Pass `kind` to decide, e.g. for
    integer ratings as regression. Labels that are not finite (NaN, inf) are refused in either kind. Class
    labels map to ids in sorted order (numeric order when every label is an integer), recorded in
    `label_names`. `text_pair_col` makes every example a sentence pair (text, text pair), as NLI and
    paraphrase tasks are.
    """
    if text_pair_col is not None and text_pair_col in (text_col, label_col):
        raise DataError(f"text_pair_col {text_pair_col!r} must differ from the text and label columns")
    if kind not in (None, "classification", "regression", "generation"):
        raise DataError(f"kind must be 'classification', 'regression', 'generation' or None, got {kind!r}")
    if Path(train).is_dir():
        return _image_folders(train, dev, test, kind)
    if kind is None and generation_columns(train, text_col, prompt_col, target_col):
        kind = "generation"
    if kind == "generation":
        return _generation_files(train, dev, test, prompt_col, target_col)
    paths = {"train": Path(train), "dev": Path(dev)} | ({"test": Path(test)} if test is not None else {})
    rows = {role: _read_rows(role, path, text_col, label_col, text_pair_col) for role, path in paths.items()}
    if kind is None:
        kind = _infer_kind(paths["train"], rows["train"])
    splits: dict[str, list[Example]]
    if kind == "regression":
        splits = {
            role: [(text, _number(paths[role], line, raw)) for text, raw, line in r]
            for role, r in rows.items()
        }
        spec = TaskSpec(paths["train"].stem, "regression", 1, (), "pearson")
    else:
        keyed = {
            role: [(text, _class_key(paths[role], line, raw), line) for text, raw, line in r]
            for role, r in rows.items()
        }
        names = _class_names(paths["train"], keyed["train"])
        if len(names) < 2:
            raise DataError(f"{paths['train']}: classification needs at least 2 labels, found {names}")
        for role in ("dev", "test"):
            unseen = sorted({key for _text, key, _line in keyed.get(role, [])} - set(names))
            if unseen:
                raise DataError(f"{paths[role]}: labels not seen in train: {', '.join(map(repr, unseen))}")
        ids = {name: i for i, name in enumerate(names)}
        splits = {role: [(text, ids[key]) for text, key, _line in k] for role, k in keyed.items()}
        spec = TaskSpec(paths["train"].stem, "classification", len(names), tuple(names), "accuracy")
    return TaskData(spec, splits["train"], splits["dev"], splits.get("test", []))


def _image_folders(train: str | Path, dev: str | Path, test: str | Path | None, kind: Kind | None) -> TaskData:
    """An image classification task from folders of class sub-folders (`images.read_folder`): the train
    folder names the classes, dev and test may hold fewer of them but no others."""
    if kind not in (None, "classification"):
        raise DataError(f"{train} is a folder of images, which makes a classification task, not {kind}")
    paths = {"train": Path(train), "dev": Path(dev)} | ({"test": Path(test)} if test is not None else {})
    for role, path in paths.items():
        if not path.is_dir():
            raise DataError(f"the train data is a folder of images, so the {role} data must be one too: {path}")
    splits, names = {}, None
    for role, path in paths.items():
        splits[role], names = read_folder(path, names)
    assert names is not None
    spec = TaskSpec(paths["train"].name, "classification", len(names), names, "accuracy", inputs="image")
    return TaskData(spec, splits["train"], splits["dev"], splits.get("test", []))


def _generation_files(train: str | Path, dev: str | Path, test: str | Path | None, prompt_col: str,
                      target_col: str) -> TaskData:
    """Prompt -> target pairs for a causal LM; every target a non-empty text (numbers are read as text)."""
    paths = {"train": Path(train), "dev": Path(dev)} | ({"test": Path(test)} if test is not None else {})
    splits: dict[str, list[Example]] = {}
    for role, path in paths.items():
        examples: list[Example] = []
        for prompt, raw, line in _read_rows(role, path, prompt_col, target_col):
            target = raw if isinstance(raw, str) else json.dumps(raw) if not isinstance(raw, bool | type(None)) else ""
            if isinstance(raw, bool) or raw is None or not target.strip():
                raise DataError(f"{path} line {line}: target must be a non-empty text, got {raw!r}")
            examples.append((prompt, target.strip()))
        splits[role] = examples
    spec = TaskSpec(paths["train"].stem, "generation", 0, (), "exact_match")
    return TaskData(spec, splits["train"], splits["dev"], splits.get("test", []))


def _read_rows(role: str, path: Path, text_col: str, label_col: str,
               text_pair_col: str | None = None) -> list[tuple[Any, Any, int]]:
    """(text or text pair, raw label, line number) for every record of a CSV or JSONL file."""
    if not path.is_file():
        raise DataError(f"{role} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    data = path.read_bytes()
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} cannot be decoded"
        ) from None
    columns = (text_col, label_col) + ((text_pair_col,) if text_pair_col else ())
    if suffix == ".csv":
        header, records = _csv_records(path, content)
        _require_columns(path, "header", header, columns)
    else:
        records = _jsonl_records(path, content)
    rows = []
    for line, record in records:
        _require_columns(path, f"line {line}", list(record), columns)
        texts = [record[text_col]] + ([record[text_pair_col]] if text_pair_col else [])
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path} line {line}: text must be a non-empty string, got {text!r}")
        rows.append((tuple(texts) if text_pair_col else texts[0], record[label_col], line))
    if not rows:
        raise DataError(f"{path} has no examples")
    return rows


def generation_columns(train: str | Path, text_col: str, prompt_col: str, target_col: str) -> bool:
    """Whether `load_files` without a `kind` reads `train` as a generation task: it has the prompt and target
    columns and no text column. (`TrainConfig.resolved` asks it too: a causal LM's run settings differ.)"""
    columns = _columns(Path(train))
    return {prompt_col, target_col} <= columns and text_col not in columns


def _columns(path: Path) -> set[str]:
    """The columns of a CSV file's header or of a JSONL file's records; none when the file cannot be read
    (the full read then says why, in its own words)."""
    try:
        content = path.read_bytes().decode("utf-8-sig")
        if path.suffix.lower() == ".csv":
            return set(_csv_records(path, content)[0])
        return set().union(*(record for _line, record in _jsonl_records(path, content)))
    except (OSError, UnicodeDecodeError, DataError):
        return set()


def _require_columns(path: Path, where: str, available: list[str], needed: Sequence[str]) -> None:
    for col in needed:
        if col not in available:
            names = ", ".join(map(repr, available)) or "none"
            raise DataError(f"{path} {where}: no column {col!r}; available columns: {names}")


def _csv_records(path: Path, content: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and (line number, row) records; every row must have the header's field count."""
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    header: list[str] = []
    records = []
    try:
        header = next(reader, [])
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path} header: column {repeated[0]!r} appears more than once; which one is meant?")
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {reader.line_num}: malformed CSV, {len(row)} fields where the header has "
                    f"{len(header)}"
                )
            records.append((reader.line_num, dict(zip(header, row, strict=True))))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    return header, records


def _jsonl_records(path: Path, content: str) -> list[tuple[int, dict[str, Any]]]:
    records = []
    # Split on "\n" only: str.splitlines() would also break inside JSON strings holding U+2028 and kin.
    for line, text in enumerate(content.split("\n"), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text, object_pairs_hook=partial(_unique_keys, path, line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line}: malformed JSON ({err.msg} at column {err.colno})") from None
        except ValueError as err:  # an integer literal past Python's digit limit for int(str)
            raise DataError(f"{path} line {line}: unreadable number ({str(err).split(';')[0]})") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {line}: malformed JSONL, expected an object, got {type(record).__name__}"
            )
        records.append((line, record))
    return records


def _unique_keys(path: Path, line: int, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise DataError(f"{path} line {line}: key {repeated[0]!r} appears more than once; which one is meant?")
    return dict(pairs)


def _as_float(raw: Any) -> float | None:
    """A number label as a float (an integer beyond float's range as +-inf, refused as not finite), else None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int) and abs(raw) > sys.float_info.max:
        return math.inf if raw > 0 else -math.inf
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return None
    return None


def _infer_kind(path: Path, rows: list[tuple[str, Any, int]]) -> Kind:
    """Classification or regression from the evidence of every label, refusing evidence that disagrees."""
    fractions, wholes, names = [], [], []
    for _text, raw, line in rows:
        value = _as_float(raw)
        if value is not None and not math.isfinite(value):
            raise DataError(f"{path} line {line}: label {_shown(raw)} is not a finite number or a class name")
        if value is None:
            names.append(line)
        elif value.is_integer():
            wholes.append(line)
        else:
            fractions.append(line)
    if not fractions:
        return "classification"
    if not names and len(fractions) >= len(wholes):
        return "regression"
    other, label = (names, "class names") if names else (wholes, "whole numbers")
    raise DataError(f"{path}: cannot tell the task kind: {len(fractions)} fractional labels (lines "
                    f"{_lines(fractions)}) but {len(other)} {label} (lines {_lines(other)}); fix the labels or "
                    "pass --kind classification or --kind regression")


def _lines(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:3])) + (", ..." if len(lines) > 3 else "")


def _shown(raw: Any) -> str:
    """A label as an error message quotes it: its repr, cut short (a 400-digit number stays one short line)."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(path: Path, line: int, raw: Any) -> float:
    value = _as_float(raw)
    if value is None or not math.isfinite(value):
        raise DataError(f"{path} line {line}: label {_shown(raw)} is not a finite number, as regression needs")
    return value


def _class_key(path: Path, line: int, raw: Any) -> str:
    """A class label as a string key: strings as written, whole numbers without a decimal point."""
    value = _as_float(raw)
    if value is not None and not math.isfinite(value):
        raise DataError(f"{path} line {line}: label {_shown(raw)} is not a finite number or a class name")
    if isinstance(raw, str) and raw.strip():
        return str(int(value)) if value is not None and value.is_integer() else raw.strip()
    if value is not None and value.is_integer():
        return str(int(raw))
    raise DataError(f"{path} line {line}: label {_shown(raw)} is not a class name or a whole number")


def _class_names(path: Path, keyed: list[tuple[Any, str, int]]) -> list[str]:
    """The train file's classes in id order: numeric order when all are whole numbers, else sorted. Numbers
    beside names (`0`, `1`, `neg`, `pos`) are refused: two labelling schemes mixed up, not four classes."""
    keys = {key for _text, key, _line in keyed}
    numbers = {k for k in keys if re.fullmatch(r"-?\d+", k)}
    if numbers == keys:
        return sorted(keys, key=int)
    if numbers:
        found = ", ".join(sorted(numbers, key=int) + sorted(keys - numbers))
        number_lines = _lines([line for _text, key, line in keyed if key in numbers])
        name_lines = _lines([line for _text, key, line in keyed if key not in numbers])
        raise DataError(f"{path}: {len(keys)} classes found ({found}): whole numbers (lines {number_lines}) "
                        f"beside names (lines {name_lines}); label every example the same way")
    return sorted(keys)


@dataclass(frozen=True)
class TaskFile:
    """One of your tasks in a multi-task run (`train --tasks mr,reviews.json`): a small JSON file naming the
    task's files and columns, e.g. `{"train": "reviews/train.csv", "dev": "reviews/dev.csv"}`, with
    optional `test`, `text_col`, `label_col`, `text_pair_col` and `name` (default: the file's stem).
    Relative paths are read from the JSON file's folder."""

    name: str
    train: str
    dev: str
    test: str | None = None
    text_col: str = "text"
    label_col: str = "label"
    text_pair_col: str | None = None


TASK_FILE_KEYS = {f.name for f in fields(TaskFile)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def read_task_file(path: str | Path) -> TaskFile:
    """A `TaskFile` from its JSON, every problem one line naming the file. Read once per version of the file
    (a run asks for its tasks' names and settings many times; an edited file is read again)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"task file {path}: {str(err).splitlines()[0]}") from None
    return _task_file(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _task_file(path: Path, mtime_ns: int, size: int) -> TaskFile:
    """`read_task_file`'s work, cached by the file's path, modification time and size."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"task file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not {"train", "dev"} <= raw.keys():
        raise DataError(f"task file {path} must be a JSON object with at least \"train\" and \"dev\" files")
    if unknown := sorted(raw.keys() - TASK_FILE_KEYS):
        raise DataError(f"task file {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TASK_FILE_KEYS))})")
    if bad := [k for k, v in raw.items() if not (isinstance(v, str) and v) and not (v is None and k in (
            "test", "text_pair_col"))]:
        raise DataError(f"task file {path}: {bad[0]!r} must be a non-empty text")
    name = raw.get("name", path.stem)
    if not _NAME.fullmatch(name):
        raise DataError(f"task file {path}: the task name {name!r} must be letters, digits, '.', '_' or '-' (it "
                        "names the task's folder in the run)")
    files = {k: str((path.parent / raw[k]).resolve()) for k in ("train", "dev", "test") if raw.get(k)}
    return TaskFile(**{**raw, **files, "name": name})
