"""The study: grid planning, selection by dev, paired tests against scipy, resuming, and a real tiny slice."""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from childtune.cli import add_analyze_arguments, add_study_arguments
from childtune.cli.commands import cmd_analyze, study_from_args
from childtune.fileio import write_json
from childtune.study import analysis
from childtune.study.plan import DEFAULT_GRID, PAPER_GRID, Cell, StudyConfig, StudyError, configs, plan
from childtune.study.report import results_table, select
from childtune.study.run import run_study
from childtune.study.stats import holm, paired_test
from childtune.study.transfer import target_examples
from childtune.training.config import TrainConfig
from childtune.training.runfolder import partial_dir

# ---------------------------------------------------------------------------------------------- statistics


def test_paired_test_matches_scipy_and_hand_values():
    a = [0.81, 0.84, 0.79, 0.86, 0.83]
    b = [0.80, 0.80, 0.80, 0.81, 0.80]
    got = paired_test(a, b)
    assert got.n == 5
    assert got.mean_diff == pytest.approx(np.mean(np.subtract(a, b)))
    assert got.t == pytest.approx(stats.ttest_rel(a, b).statistic)
    assert got.p_t == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert got.p_wilcoxon == pytest.approx(stats.wilcoxon(a, b).pvalue)
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3)
    assert paired_test([2, 4, 6], [1, 2, 3]).t == pytest.approx(2 * math.sqrt(3))
    # 5 pairs all in one direction: the exact Wilcoxon floor, 2 / 2^5
    assert paired_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]).p_wilcoxon == pytest.approx(0.0625)


def test_paired_test_degenerate_cases():
    assert math.isnan(paired_test([0.5], [0.4]).p_t)
    assert paired_test([0.5], [0.4]).mean_diff == pytest.approx(0.1)
    same = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same.mean_diff, same.p_t, same.p_wilcoxon) == (0.0, 1.0, 1.0)
    shift = paired_test([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])  # exactly 0.5 apart: no spread at all
    assert math.isnan(shift.p_t) and shift.t == math.inf and shift.p_wilcoxon == 0.25  # 3 pairs: exact minimum
    with pytest.raises(ValueError, match="one to one"):
        paired_test([1, 2], [1])


def test_holm_adjustment():
    got = holm([0.01, 0.04, 0.03, math.nan])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(got[3])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------------------------------------- planning


def test_grid_expands_to_every_combination_and_rejects_unknown_keys():
    child = configs(PAPER_GRID, "child-d")
    assert len(child) == 9
    assert (("lr", 2e-5), ("reserve_p", 0.1)) in child
    assert configs({}, "full") == [()]
    assert Cell("main", "mr", "child-d", (("lr", 2e-5), ("reserve_p", 0.1)), 3).label == "lr2e-05-p0.1"
    with pytest.raises(StudyError, match="not a training setting"):
        configs({"full": {"learning_rate": (1e-5,)}}, "full")
    with pytest.raises(StudyError, match="no values"):
        configs({"full": {"lr": ()}}, "full")


def test_plan_runs_seed_by_seed_with_transfer():
    study = StudyConfig(tasks=("a", "b"), methods=("full", "child-d"), seeds=(1, 2),
                        grid={"full": {}, "child-d": {"reserve_p": (0.1, 0.2)}},
                        transfer_source="src", transfer_methods=("full",))
    cells = plan(study)
    assert len(cells) == 2 * (2 * (1 + 2) + 1)
    assert [c.seed for c in cells[:7]] == [1] * 7
    assert cells[6] == Cell("transfer", "src", "full", (), 1)


# ---------------------------------------------------------------------------------------------- a fake grid

BEST_LR = 5e-5


def fake_scores(method: str, lr: float, seed: int) -> tuple[float, float]:
    """(dev, test): child-d is a bit better, one lr is best on dev, and seeds differ non-uniformly; every
    score a valid accuracy (at most 0.905), as the ledger checks."""
    dev = 0.70 + 0.01 * seed + (0.05 if lr == BEST_LR else 0.0) + (0.002 * seed**2 if method == "child-d" else 0.0)
    return dev, dev - 0.02 + (0.003 * seed**2 if method == "child-d" else 0.0)


class FakeTrain:
    """Stands in for `train`: writes a run folder with its resolved config.json and metrics.json (and
    transfer.json when asked), as the real loop does."""

    def __init__(self):
        self.calls: list[TrainConfig] = []
        self.resumed: list[str] = []

    def __call__(self, config: TrainConfig, callbacks=(), resume: bool = False):
        self.calls.append(config)
        if resume:
            self.resumed.append(config.output)
        dev, test = fake_scores(config.method, config.lr, config.seed)
        metrics = {"task": config.task, "method": config.method, "seed": config.seed, "kind": "classification",
                   "primary_metric": "accuracy", "dev": {"accuracy": dev}, "test": {"accuracy": test},
                   "changed_params": 30 if config.method == "child-d" else 100, "total_params": 100,
                   "train_time_s": 1.0}
        folder = Path(config.output)
        folder.mkdir(parents=True, exist_ok=True)
        config.resolved().save_json(folder / "config.json")
        write_json(folder / "metrics.json", metrics)
        if callbacks:
            metrics["transfer"] = {"other": {"accuracy": test - 0.1}}
            write_json(folder / "transfer.json", metrics["transfer"])
        return metrics


def fake_study(tmp_path: Path, **kw) -> StudyConfig:
    grid = {"full": {"lr": (2e-5, BEST_LR)}, "child-d": {"lr": (2e-5, BEST_LR), "reserve_p": (0.2,)}}
    defaults = dict(tasks=("t1", "t2"), methods=("full", "child-d"), seeds=(1, 2, 3, 4, 5), grid=grid,
                    output=str(tmp_path / "study"), transfer_source="t1", transfer_targets=("other",),
                    transfer_methods=("full", "child-d"), analysis=False)
    return StudyConfig(**{**defaults, **kw})


def test_study_selects_by_dev_and_tests_against_full(tmp_path):
    fake = FakeTrain()
    result = run_study(fake_study(tmp_path), run=fake, command="childtune study --fake",
                       results=tmp_path / "docs" / "RESULTS.md", progress=False)
    assert len(fake.calls) == 5 * (2 * (2 + 2) + (2 + 2))
    rows = {(r.task, r.method): r for r in result.main}
    child = rows[("t1", "child-d")]
    assert child.config == "lr5e-05-p0.2" and child.configs_tried == 2
    assert rows[("t1", "full")].config == "lr5e-05"
    expected_child = [fake_scores("child-d", BEST_LR, s)[1] for s in range(1, 6)]
    expected_full = [fake_scores("full", BEST_LR, s)[1] for s in range(1, 6)]
    assert child.scores == pytest.approx(expected_child)
    assert child.mean == pytest.approx(np.mean(expected_child))
    assert child.std == pytest.approx(np.std(expected_child, ddof=1))
    assert child.paired.p_t == pytest.approx(stats.ttest_rel(expected_child, expected_full).pvalue)
    assert child.paired.p_wilcoxon == pytest.approx(stats.wilcoxon(expected_child, expected_full).pvalue)
    assert child.p_holm == pytest.approx(min(1.0, 2 * child.paired.p_t))  # two comparisons, same p
    assert child.changed_share == pytest.approx(0.3)
    assert rows[("t1", "full")].paired is None

    files = result.files
    with files["runs_csv"].open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(fake.calls)
    assert {r["experiment"] for r in runs} == {"main", "transfer"}
    with files["summary_csv"].open() as f:
        summary = {(r["task"], r["method"]): r for r in csv.DictReader(f)}
    assert float(summary[("t2", "child-d")]["p_ttest"]) == pytest.approx(child.paired.p_t, rel=1e-3)
    transfer = {r.task: r for r in result.transfer if r.method == "child-d"}
    assert transfer["t1 → other"].scores == pytest.approx([s - 0.1 for s in expected_child])
    assert transfer["t1"].scores == pytest.approx(expected_child)

    text = files["results"].read_text()
    assert "childtune study --fake" in text
    assert "| t1 | child-d | lr5e-05-p0.2 (2) | 5 |" in text
    assert "t1 → other" in text
    assert "10 / 10" in text and "not yet run" not in text
    assert "With 5 seeds a two-sided exact Wilcoxon test cannot go below p = 0.0625." in text
    for key in ("study_png", "transfer_png"):
        assert files[key].parent == tmp_path / "docs" and files[key].stat().st_size > 10_000


def test_settings_compared_rather_than_tuned_are_rows_of_their_own(tmp_path):
    """--rows-by: child-d's two p values are two rows, each with its best lr on dev, paired with full by
    seed; without it the two compete on dev for one row. The ledger and folders keep the cells as run."""
    grid = {"full": {"lr": (2e-5, BEST_LR)}, "child-d": {"lr": (2e-5, BEST_LR), "reserve_p": (0.1, 0.2)}}
    fake = FakeTrain()
    result = run_study(fake_study(tmp_path, grid=grid, transfer=False, rows_by=("reserve_p",)), run=fake,
                       progress=False)
    rows = {(r.task, r.method): r for r in result.main}
    assert {m for t, m in rows if t == "t1"} == {"full", "child-d (reserve_p=0.1)", "child-d (reserve_p=0.2)"}
    for p in (0.1, 0.2):
        row = rows[("t1", f"child-d (reserve_p={p})")]
        assert row.config == "lr5e-05" and row.configs_tried == 2  # its lr chosen on dev among its own
        assert row.paired is not None and row.paired.n == 5
    assert len(fake.calls) == 5 * 2 * (2 + 4)
    plain = run_study(fake_study(tmp_path / "plain", grid=grid, transfer=False), run=FakeTrain(), progress=False)
    assert {r.method for r in plain.main} == {"full", "child-d"}
    with pytest.raises(StudyError, match="rows_by names 'p'"):
        plan(fake_study(tmp_path, rows_by=("p",)))


def test_study_resumes_and_keeps_hand_written_findings(tmp_path):
    study = fake_study(tmp_path, transfer=False)
    results = tmp_path / "RESULTS.md"
    nothing = run_study(study, run=FakeTrain(), results=results, progress=False, train_missing=False)
    assert nothing.records == [] and "0 / 10 (**rest not yet run**)" in results.read_text()
    first = FakeTrain()
    run_study(study, run=first, results=results, progress=False)
    results.write_text("# Findings\n\nWritten by hand.\n\n" + results.read_text() + "\nMore by hand.\n")

    def refuse(config, callbacks=()):
        raise AssertionError(f"retrained a finished cell: {config.output}")

    again = run_study(study, run=refuse, results=results, progress=False)
    assert len(again.records) == len(first.calls)
    text = results.read_text()
    assert text.startswith("# Findings\n\nWritten by hand.") and text.rstrip().endswith("More by hand.")
    assert text.count("<!-- study:begin") == 1

    # a cell that died half way (folder without metrics.json) is the only one retrained
    lost = Path(first.calls[3].output)
    (lost / "metrics.json").unlink()
    third = FakeTrain()
    run_study(study, run=third, results=results, progress=False)
    assert [c.output for c in third.calls] == [str(lost)]
    assert third.calls[0].overwrite
    assert third.resumed == []
    three = tmp_path / "three.md"
    run_study(replace(study, seeds=(1, 2, 3)), run=refuse, results=three, progress=False, train_missing=False)
    assert "With 3 seeds a two-sided exact Wilcoxon test cannot go below p = 0.25." in three.read_text()

    # a cell killed after writing a checkpoint goes on from it instead of starting over
    lost = Path(first.calls[5].output)
    (lost / "metrics.json").unlink()
    (partial_dir(lost) / "checkpoint").mkdir(parents=True)
    (partial_dir(lost) / "checkpoint" / "meta.json").write_text("{}")
    fourth = FakeTrain()
    run_study(study, run=fourth, results=results, progress=False)
    assert fourth.resumed == [str(lost)]


def test_partial_study_reports_what_is_not_yet_run(tmp_path):
    study = fake_study(tmp_path, transfer=False, seeds=(1, 2))
    fake = FakeTrain()
    run_study(replace(study, seeds=(1,)), run=fake, progress=False)
    from childtune.study.plan import Record, plan
    from childtune.study.report import coverage

    records = [Record(c, fake(replace(TrainConfig(task=c.task), method=c.method, seed=c.seed, lr=dict(c.overrides)
                                      ["lr"], output=str(tmp_path / "x" / str(i)))))
               for i, c in enumerate(plan(study)) if c.seed == 1]
    text = coverage(study, records)
    assert "| main | t1 | child-d | 2 | 2 | 2 / 4 (**rest not yet run**) |" in text
    rows = results_table(records)
    assert all(len(r.scores) == 1 and (r.paired is None or math.isnan(r.paired.p_t)) for r in rows)
    assert select(records)[("t1", "full")][0] == "lr5e-05"


# ---------------------------------------------------------------------------------------------- a real slice

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "book", "the", "a", "was", "is", "very"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with a word-level tokenizer, saved like a pretrained model folder."""
    import torch
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    config = tiny_bert_config()
    config.vocab_size = len(vocab)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def write_task(path: Path, n: int, subject: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = int(rng.integers(2))
        word = rng.choice(["good", "great", "fine"] if label else ["bad", "awful", "poor"])
        lines.append(f"the {subject} was {'very ' * int(rng.integers(2))}{word},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tiny_slice_trains_resumes_transfers_and_analyses(tmp_path, tiny_model_dir):
    data = {name: write_task(tmp_path / f"{name}.csv", n, "movie", i)
            for i, (name, n) in enumerate([("train", 48), ("dev", 16), ("test", 16)])}
    other = write_task(tmp_path / "books.csv", 16, "book", 7)
    task = {"movies": {"task": None, "train_file": str(data["train"]), "dev_file": str(data["dev"]),
                       "test_file": str(data["test"])}}
    study = StudyConfig(
        tasks=task, methods=("full", "child-d"), seeds=(1, 2), train_size=None,
        grid={"full": {}, "child-d": {"reserve_p": (0.3,)}},
        base=TrainConfig(model=str(tiny_model_dir), epochs=1, batch_size=16, eval_batch_size=16, progress=False),
        output=str(tmp_path / "study"), transfer_source=task, transfer_targets=(str(other),),
        transfer_methods=("full", "child-d"),
    )
    result = run_study(study, command="childtune study --tiny", progress=False)
    assert len(result.records) == 8
    folder = tmp_path / "study" / "runs" / "movies" / "child-d" / "p0.3" / "seed1"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["train_examples"] == 48 and metrics["steps"] == 3
    assert (folder / "delta" / "delta_config.json").is_file()
    transfer = json.loads((tmp_path / "study" / "transfer" / "movies" / "full" / "default" / "seed2"
                           / "transfer.json").read_text())
    assert set(transfer) == {str(other)} and 0.0 <= transfer[str(other)]["accuracy"] <= 1.0
    assert {(r.task, r.method) for r in result.transfer} == {
        (t, m) for t in ("movies", "movies → books") for m in ("full", "child-d")}

    files = result.files
    assert {"study_png", "transfer_png", "layer_share_png", "overlap_png", "results"} <= set(files)
    text = files["results"].read_text()
    assert "| movies | child-d | p0.3 (1) | 2 |" in text
    assert "movies child-d s1" in text and "movies child-d s2" in text  # two seeds' child networks compared
    with (tmp_path / "study" / "analysis" / "layer_share.csv").open() as f:
        shares = [r for r in csv.DictReader(f) if r["child_network"] == "movies child-d s1"]
    chosen = sum(int(r["chosen"]) for r in shares if r["group"].startswith("layer"))
    total = sum(int(r["total"]) for r in shares if r["group"].startswith("layer"))
    assert chosen / total == pytest.approx(0.3, abs=0.01)  # strict Child-Tuning_D changes its 30% only

    def refuse(config, callbacks=()):
        raise AssertionError("a finished cell was retrained")

    again = run_study(study, run=refuse, progress=False)
    assert [r.metrics["dev"] for r in again.records] == [r.metrics["dev"] for r in result.records]

    # the same runs through the entry point of `childtune analyze`
    runs = tmp_path / "study" / "runs" / "movies"
    parser = add_analyze_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(runs / "child-d" / "p0.3" / "seed1"), f"other={runs / 'child-d' / 'p0.3' / 'seed2'}",
                              "--output", str(tmp_path / "cli-analysis")])
    assert list(analysis.parse_inputs(args.inputs)) == ["train child-d s1", "other"]
    assert cmd_analyze(args) == 0
    assert "| train child-d s1 |" in (tmp_path / "cli-analysis" / "analysis.md").read_text()


def test_study_options_build_the_study(tmp_path):
    parser = add_study_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--tasks", "mr,subj", "--methods", "full,child-d", "--seeds", "1-3", "--grid",
                              "defaults", "--no-transfer", "--output", str(tmp_path / "s")])
    study = study_from_args(args, TrainConfig(epochs=2))
    assert (study.tasks, study.methods, study.seeds) == (("mr", "subj"), ("full", "child-d"), (1, 2, 3))
    assert study.grid == DEFAULT_GRID and not study.transfer and study.train_size == 1000
    assert study.base.epochs == 2 and study.base.progress is False
    assert len(plan(study)) == 2 * 2 * 3


def test_a_methods_grid_may_be_a_union_of_grids():
    """Settings that only make sense together: a per-part budget only for the two-part scope."""
    parser = add_study_arguments(argparse.ArgumentParser())
    text = ('{"child-d": [{"child_scope": ["vision", "language"]}, {"child_scope": ["vision,language"], '
            '"child_budget": ["joint", "per-part"]}, {"child_scope": ["vision"]}]}')
    args = parser.parse_args(["--grid", text, "--methods", "child-d", "--tasks", "mr", "--seeds", "1",
                              "--no-transfer", "--output", "s"])
    study = study_from_args(args, TrainConfig())
    assert [c.overrides for c in plan(study)] == [
        (("child_scope", "vision"),), (("child_scope", "language"),),
        (("child_budget", "joint"), ("child_scope", "vision,language")),
        (("child_budget", "per-part"), ("child_scope", "vision,language"))]  # the repeated vision once
    with pytest.raises(SystemExit):
        parser.parse_args(["--grid", '{"child-d": [{"lr": 0.1}]}'])


def test_grid_option_takes_a_json_subset_of_the_paper_grid():
    parser = add_study_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--grid", '{"child-d": {"reserve_p": [0.3], "lr": [0.0001]}}', "--methods",
                              "full,child-d", "--tasks", "mr", "--seeds", "1", "--no-transfer"])
    cells = plan(study_from_args(args, TrainConfig()))
    assert [c.label for c in cells] == ["default", "lr0.0001-p0.3"]
    assert cells[1].label in {Cell("main", "mr", "child-d", c, 1).label for c in configs(PAPER_GRID, "child-d")}
    with pytest.raises(SystemExit):
        parser.parse_args(["--grid", '{"child-d": {"reserve_p": 0.3}}'])


def test_transfer_targets_must_share_the_source_labels(tmp_path):
    from childtune.data.types import TaskSpec

    source = TaskSpec("src", "classification", 2, ("0", "1"), "accuracy")
    good = write_task(tmp_path / "good.csv", 6, "book", 1)
    spec, examples = target_examples(str(good), source)
    assert (spec.name, spec.metric, len(examples)) == ("good", "accuracy", 6)
    (tmp_path / "words.csv").write_text("text,label\nthe book,neg\nthe film,pos\n")
    with pytest.raises(StudyError, match="labels"):
        target_examples(str(tmp_path / "words.csv"), source)
    with pytest.raises(StudyError, match="neither a built-in task nor a file"):
        target_examples(str(tmp_path / "missing.csv"), source)


def test_fisher_against_id3_is_one_markdown_table(tmp_path):
    """A blank line inside a Markdown table ends it: the rows would render as loose text."""
    from childtune.study.report import _analysis_section

    (tmp_path / "analysis.md").write_text("# Analysis\n\n## Per layer\n\n| a |\n|---|\n| 1 |\n")
    text = _analysis_section({"analysis": tmp_path / "analysis.md"}, [["mr", "1", "0.0152", "0.0074"],
                                                                      ["mr", "2", "0.0160", "0.0074"]])
    table = text.split("### Fisher (Child-Tuning_D) against ID3's final child network\n\n", 1)[1]
    assert table.splitlines() == ["| task | seed | Jaccard | chance |", "|---|---|---|---|",
                                  "| mr | 1 | 0.0152 | 0.0074 |", "| mr | 2 | 0.0160 | 0.0074 |"]
    assert "### Per layer" in text
