"""Multi-task runs (`childtune.multitask`): the shared and per-task child networks against hand-computed
choices, the task-value swap, the mixture's statistics, and a tiny two-task run whose per-task deltas apply
alone and together, bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from childtune.delta import DeltaError, SparseDelta
from childtune.multitask.choose import shared_network, task_networks
from childtune.multitask.model import TaskParts
from childtune.multitask.run import mixture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import write_tiny_model

# two tasks, one 2 x 3 tensor; each task's scores already sum to 1
A = {"w": torch.tensor([[0.40, 0.30, 0.10], [0.10, 0.05, 0.05]])}
B = {"w": torch.tensor([[0.00, 0.35, 0.05], [0.50, 0.05, 0.05]])}


def flat(index: torch.Tensor) -> list[int]:
    return index.tolist()


@pytest.mark.parametrize(("rule", "want"), [
    # sum: .40 .65 .15 / .60 .10 .10 -> top 2: positions 1 and 3
    ("fisher-sum", [1, 3]),
    # min: 0 .30 .05 / .10 .05 .05 -> top 2: 1, then 3 (.10)
    ("fisher-intersection", [1, 3]),
    # max: .40 .35 .10 / .50 .05 .05 -> top 2: 3 (.50) and 0 (.40)
    ("union", [0, 3]),
])
def test_the_shared_child_network_is_each_rules_exact_top_p(rule, want):
    assert flat(shared_network([A, B], 2 / 6, rule)["w"]) == want


def test_min_and_max_differ_where_one_task_alone_cares():
    """Position 0 matters to A alone (B scores 0): the union takes it, the intersection never does."""
    assert 0 in flat(shared_network([A, B], 3 / 6, "union")["w"])
    assert 0 not in flat(shared_network([A, B], 3 / 6, "fisher-intersection")["w"])


def test_scores_are_normalised_per_task_before_they_are_combined():
    """B scaled by 1000 (a larger loss) chooses the same: each task's scores are divided by their sum."""
    loud = {"w": B["w"] * 1000}
    for rule in ("fisher-sum", "fisher-intersection", "union"):
        assert torch.equal(shared_network([A, loud], 2 / 6, rule)["w"], shared_network([A, B], 2 / 6, rule)["w"])


def test_a_tasks_own_child_network_is_its_top_p_outside_the_shared_one():
    shared = shared_network([A, B], 2 / 6, "fisher-sum")  # {1, 3}
    own_a, own_b = task_networks([A, B], shared, 1 / 6)
    assert flat(own_a["w"]) == [0]  # A's best is 0 (.40); 1 is shared
    assert flat(own_b["w"]) == [2]  # B's best outside {1, 3}: 2 (.05; ties at .05 broken by position)
    assert all(len(n["w"]) == 0 for n in task_networks([A, B], shared, 0.0))


def test_bad_rules_and_single_tasks_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        shared_network([A, B], 0.5, "average")
    with pytest.raises(ValueError, match="two tasks or more"):
        shared_network([A], 0.5, "union")


def test_task_parts_swap_each_tasks_values_and_leave_the_rest():
    weight = torch.arange(6, dtype=torch.float32).view(2, 3)
    parts = TaskParts({"w": weight}, {"a": {"w": torch.tensor([0, 2])}, "b": {"w": torch.tensor([2, 5])}})
    parts.activate("a")
    weight.view(-1)[[0, 2]] += 10  # task a trains its elements, and position 1 (shared)
    weight.view(-1)[1] += 100
    parts.activate("b")  # a's change leaves; b starts from the base values at its own elements
    assert weight.view(-1).tolist() == [0, 101, 2, 3, 4, 5]
    weight.view(-1)[[2, 5]] -= 1
    parts.activate("a")
    assert weight.view(-1).tolist() == [10, 101, 12, 3, 4, 5]
    parts.activate(None)
    assert weight.view(-1).tolist() == [0, 101, 2, 3, 4, 5]
    parts.activate("b")
    assert weight.view(-1).tolist() == [0, 101, 1, 3, 4, 4]


def test_the_mixture_draws_tasks_in_proportion_or_flattened_by_temperature():
    sizes, steps = [100, 900], 20_000
    proportional = mixture(sizes, steps, "proportional", 2.0, seed=1)
    assert abs(proportional.count(0) / steps - 0.1) < 0.01
    flat_draw = mixture(sizes, steps, "temperature", 2.0, seed=1)
    assert abs(flat_draw.count(0) / steps - 10 / (10 + 30)) < 0.01  # sqrt(100) : sqrt(900)
    assert mixture(sizes, 50, "proportional", 2.0, seed=1) == proportional[:50]  # a function of the seed


# --------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    from childtune.cli import main

    root = tmp_path_factory.mktemp("multitask")
    model = write_tiny_model(root / "model", dropout=0.0)
    out = root / "run"
    assert main(["train", "--tasks", "mr,spam", "--model", str(model), "--train-size", "48", "--eval-size", "24",
                 "--epochs", "1", "--batch-size", "8", "--reserve-p", "0.1", "--task-child", "0.05", "--lr", "1e-2",
                 "--shared-child", "union", "--no-progress", "--output", str(out)]) == 0
    return model, out


def test_a_multi_task_run_writes_a_shared_delta_and_one_per_task(run):
    _, out = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"mr", "spam"}
    assert sum(t["steps"] for t in metrics["tasks"].values()) == metrics["steps"] == 2 * 6
    assert metrics["shared_params"] == round(0.1 * metrics["scored_params"])
    for task in ("mr", "spam"):
        assert metrics["tasks"][task]["dev"]["accuracy"] >= 0 and (out / "tasks" / task / "delta").is_dir()
        assert 0 < metrics["tasks"][task]["own_params"] <= round(0.05 * metrics["scored_params"])
    shared = SparseDelta.load(out / "shared" / "delta")
    assert not shared.dense and shared.config.num_changed == metrics["shared_params"]  # no head, every element moved
    by_part = metrics["stored_bytes_by_part"]
    assert metrics["stored_bytes"] == by_part["shared"] + sum(by_part["tasks"].values()) > 0
    assert int(sum(m.sum() for m in load_file(out / "masks.safetensors").values())) == metrics["shared_params"]


def test_each_tasks_delta_changes_only_its_own_elements_and_head(run):
    _, out = run
    shared = SparseDelta.load(out / "shared" / "delta").masks()
    own = {t: SparseDelta.load(out / "tasks" / t / "delta") for t in ("mr", "spam")}
    for delta in own.values():
        assert delta.dense and all("classifier" in name for name in delta.dense)  # its head
        for name, mask in delta.masks().items():
            assert not (mask & shared.get(name, torch.zeros_like(mask))).any(), name  # never a shared element


def test_a_tasks_model_is_base_plus_shared_plus_its_own_and_scores_as_the_run(run, tmp_path):
    """`apply --task`: the task delta refuses the bare base (its base is base + shared change), applies
    on top of the shared one, reverts back to it bit for bit, and the model scores as the run did."""
    from transformers import AutoModelForSequenceClassification

    from childtune.cli import main
    from childtune.training.config import TrainConfig
    from childtune.training.scoring import score

    model, out = run
    shared = SparseDelta.load(out / "shared" / "delta")
    mr = SparseDelta.load(out / "tasks" / "mr" / "delta")
    tuned = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    base = {n: t.clone() for n, t in tuned.state_dict().items()}
    with pytest.raises(DeltaError, match="wrong base model"):
        mr.apply(tuned)
    shared.apply(tuned)
    with_shared = {n: t.clone() for n, t in tuned.state_dict().items()}
    mr.apply(tuned)
    mr.revert(tuned)
    assert all(torch.equal(tuned.state_dict()[n], with_shared[n]) for n in base if "classifier" not in n)
    shared.revert(tuned)
    assert all(torch.equal(tuned.state_dict()[n], base[n]) for n in base if "classifier" not in n)

    assert main(["apply", str(out), "--task", "mr", "--output", str(tmp_path / "mr")]) == 0
    scored = score(TrainConfig(model=str(tmp_path / "mr"), task="mr", eval_size=24, progress=False).resolved())
    assert scored["dev"] == json.loads((out / "metrics.json").read_text())["tasks"]["mr"]["dev"]
    assert main(["apply", str(out), "--output", str(tmp_path / "none")]) == 2  # which task? said, not guessed


def test_evaluate_scores_each_task_of_a_multi_task_run_as_it_ships(run, capsys):
    from childtune.cli import main

    _, out = run
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--no-progress", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    recorded = json.loads((out / "metrics.json").read_text())["tasks"]
    assert set(scored) == {"mr", "spam"}
    for task in scored:  # base + shared delta + the task's own and its head: the run's own end-of-run scores
        assert scored[task]["dev"] == recorded[task]["dev"] and scored[task]["test"] == recorded[task]["test"]
    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count(f"{out} on ") == 2


def test_multi_task_settings_are_checked_before_any_work(tmp_path, capsys):
    from childtune.cli import main

    for more, said in ((["--tasks", "mr"], "two different tasks"), (["--tasks", "mr,nope"], "no built-in task"),
                       (["--tasks", "mr,spam", "--method", "id3"], "child-d"),
                       (["--tasks", "mr,spam", "--task-child", "1.5"], "task_child"),
                       (["--tasks", "mr,spam", "--dtype", "bf16"], "fp32"),
                       (["--tasks", "mr,spam", "--shared-child", "mean"], "shared_child"),
                       (["--tasks", "mr,spam", "--merge", "ties", "--merge-density", "0"], "merge_density"),
                       (["--merge", "ties"], "give them with --tasks")):
        assert main(["train", *more, "--output", str(tmp_path / "run")]) == 2, more
        assert said in capsys.readouterr().err, more
    assert not (tmp_path / "run").exists()


def test_real_model_learns_two_tasks_at_once(tmp_path, capsys):
    """The offline MiniLM on subj and mr (128 examples each, 2 epochs): subj, the easier, is learnt through
    the shared and its own child network, and the model `apply --task subj` writes scores as the run did."""
    from childtune.cli import main
    from childtune.training.config import TrainConfig
    from childtune.training.scoring import score

    out = tmp_path / "run"
    assert main(["train", "--tasks", "subj,mr", "--train-size", "128", "--eval-size", "100", "--epochs", "2",
                 "--batch-size", "16", "--reserve-p", "0.05", "--task-child", "0.01", "--lr", "1e-3",
                 "--max-length", "32", "--no-progress", "--output", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["subj"]["dev"]["accuracy"] >= 0.8, metrics["tasks"]["subj"]  # half are each class
    assert main(["apply", str(out), "--task", "subj", "--output", str(tmp_path / "subj")]) == 0
    scored = score(TrainConfig(model=str(tmp_path / "subj"), task="subj", eval_size=100, max_length=32,
                               progress=False).resolved())
    assert scored["dev"] == metrics["tasks"]["subj"]["dev"]


def test_a_study_runs_only_multi_task_methods_on_a_multi_task_entry():
    """`--tasks mr+spam,mr --methods child-d,full`: full fine-tuning cannot train a multi-task run, so it runs on
    mr alone, where child-d runs both ways (the Makefile's multitask study planned `full` on the four tasks at
    once, which every such cell refused)."""
    from childtune.study.plan import StudyConfig, plan

    study = StudyConfig(tasks=("mr+spam", "mr"), methods=("child-d", "full"), seeds=(1, 2), name="mt", transfer=False)
    cells = {(c.task, c.method) for c in plan(study)}
    assert cells == {("mr+spam", "child-d"), ("mr", "child-d"), ("mr", "full")}


def test_a_study_runs_a_multi_task_cell_into_its_ledger_and_report(run, tmp_path):
    """`childtune study --tasks mr+spam`: one multi-task run per cell, recorded in the ledger with every task's
    scores, scored in the report by the mean of the tasks' primary metrics."""
    from childtune.study.ledger import Ledger
    from childtune.study.plan import StudyConfig, task_overrides
    from childtune.study.run import run_study
    from childtune.training.config import TrainConfig

    assert task_overrides(("mr+spam", "subj")) == {"mr+spam": {"tasks": "mr,spam"}, "subj": {"task": "subj"}}
    model, _ = run
    study = StudyConfig(tasks=("mr+spam", "mr", "spam"), methods=("child-d",), seeds=(1,), train_size=16,
                        grid={"child-d": {"shared_child": ["fisher-sum", "union"]}},
                        base=TrainConfig(model=str(model), progress=False, eval_size=8, batch_size=8, epochs=1),
                        output=str(tmp_path / "study"), transfer=False, analysis=False,
                        ledger=str(tmp_path / "ledger.jsonl"), name="mt")
    run_study(study, results=str(tmp_path / "RESULTS.md"), progress=False)
    records = list(Ledger(tmp_path / "ledger.jsonl").records.values())
    assert len(records) == 4  # two rules at once, and each task alone once (the rules do not apply to it)
    records = [r for r in records if "tasks" in r["metrics"]]
    assert len(records) == 2 and all(set(r["metrics"]["tasks"]) == {"mr", "spam"} for r in records)
    for record in records:
        tasks = record["metrics"]["tasks"]
        mean = sum(t["dev"][t["primary_metric"]] for t in tasks.values()) / 2
        assert record["metrics"]["dev"] == {"mean": mean}
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| mr+spam | child-d |" in report
    for task in ("mr", "spam"):  # each task's own row for the multi-task run, beside its single-task one
        assert f"| {task} | child-d in mr+spam (shared_childunion) |" in report
        assert f"| {task} | child-d |" in report
    assert "| child-d at once (shared_childfisher-sum) |" in report
    assert "| child-d, one run per task |" in report
    assert (tmp_path / "mt-bytes.png").stat().st_size > 0


def test_your_own_task_joins_a_built_in_one_through_a_task_file(run, tmp_path, capsys, monkeypatch):
    """`--tasks mr,reviews.json`: the file names a task's CSV files (relative to itself) and columns; the run
    trains, scores and stores it by its name as it does a built-in task."""
    from test_resume import write_task

    from childtune.cli import main
    from childtune.data.userfiles import read_task_file

    model, _ = run
    (tmp_path / "reviews").mkdir()
    write_task(tmp_path / "reviews", n_train=32, n_dev=8)
    (tmp_path / "reviews" / "train.csv").rename(tmp_path / "reviews" / "t.csv")
    spec = tmp_path / "reviews.json"
    spec.write_text(json.dumps({"train": "reviews/t.csv", "dev": "reviews/dev.csv", "name": "mine"}))
    assert read_task_file(spec).train == str((tmp_path / "reviews" / "t.csv").resolve())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--tasks", "mr,reviews.json", "--model", str(model), "--train-size", "16", "--eval-size",
                 "8", "--epochs", "1", "--batch-size", "8", "--reserve-p", "0.1", "--no-progress",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"mr", "mine"} and metrics["tasks"]["mine"]["train_examples"] == 16
    assert metrics["tasks"]["mine"]["dev_examples"] == 8 and (out / "tasks" / "mine" / "delta").is_dir()
    saved = json.loads((out / "config.json").read_text())["tasks"]
    assert saved.split(",")[1] == str(spec.resolve())  # absolute: the run reruns from anywhere
    for bad, message in [({"train": "x.csv"}, 'at least "train" and "dev"'), ({"train": "a", "dev": "b", "cols": 1},
                         "unknown key 'cols'"), ({"train": "a", "dev": "b", "name": "../up"}, "letters, digits")]:
        spec.write_text(json.dumps(bad))
        assert main(["train", "--tasks", "mr,reviews.json", "--model", str(model), "--output",
                     str(tmp_path / "no")]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--tasks", "mr,nope", "--output", str(tmp_path / "no")]) == 2
    assert "name your own as a task file" in capsys.readouterr().err


def test_an_interrupted_multi_task_run_resumes_to_the_uninterrupted_result(run, tmp_path, capsys, monkeypatch):
    """Checkpoints every 3 steps; a run stopped at step 8 (after the checkpoint at 6) and resumed writes the
    same shared and per-task deltas, bit for bit, and the same scores as a run never stopped; the partial
    folder holds the checkpoint meanwhile, and a finished run keeps none."""
    from childtune.cli import main
    from childtune.optim import SparseChildAdamW
    from childtune.training.runfolder import partial_dir

    model, _ = run
    args = ["train", "--tasks", "mr,spam", "--model", str(model), "--train-size", "24", "--eval-size", "8",
            "--epochs", "2", "--batch-size", "8", "--reserve-p", "0.1", "--task-child", "0.05", "--lr", "1e-2",
            "--no-progress", "--checkpoint-every", "3"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main([*args, "--output", str(whole)]) == 0, capsys.readouterr().err
    assert not (whole / "checkpoint").exists()

    calls = {"n": 0}
    step = SparseChildAdamW.step

    def failing(self, *a, **kw):  # two optimizers step per update (the shared one, the task's): stop in update 8
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return step(self, *a, **kw)

    monkeypatch.setattr(SparseChildAdamW, "step", failing)
    assert main([*args, "--output", str(stopped)]) == 130  # Ctrl-C, as the CLI reports it
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert (partial_dir(stopped) / "checkpoint").is_dir() and not stopped.exists()
    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 0, capsys.readouterr().err
    assert not (stopped / "checkpoint").exists() and not partial_dir(stopped).exists()
    for part in ("shared", "tasks/mr", "tasks/spam"):
        a, b = (SparseDelta.load(folder / part / "delta") for folder in (whole, stopped))
        assert a.entries.keys() == b.entries.keys() and a.dense.keys() == b.dense.keys(), part
        for name in a.entries:
            assert torch.equal(a.entries[name].indices, b.entries[name].indices), (part, name)
            assert torch.equal(a.entries[name].values, b.entries[name].values), (part, name)
        for name in a.dense:
            assert torch.equal(a.dense[name], b.dense[name]), (part, name)
    first, second = (json.loads((f / "metrics.json").read_text()) for f in (whole, stopped))
    assert first["tasks"]["mr"]["test"] == second["tasks"]["mr"]["test"] and first["steps"] == second["steps"]


def test_compare_runs_multi_task_cells_and_reports_every_task(run, tmp_path, capsys):
    """`childtune compare --tasks mr,spam`: each cell one multi-task run; the table, summary and runs files
    give each task's primary metric beside the tasks' mean."""
    import csv

    from childtune.cli import main

    model, _ = run
    out = tmp_path / "compare"
    assert main(["compare", "--tasks", "mr,spam", "--model", str(model), "--methods", "child-d", "--seeds", "1,2",
                 "--train-size", "16", "--eval-size", "8", "--epochs", "1", "--batch-size", "8", "--reserve-p", "0.1",
                 "--no-progress", "--output", str(out)]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "test mean" in table and "test mr:accuracy" in table and "test spam:f1" in table
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    for row in runs:
        metrics = json.loads((out / "runs" / f"child-d-seed{row['seed']}" / "metrics.json").read_text())
        assert float(row["test_mr:accuracy"]) == metrics["tasks"]["mr"]["test"]["accuracy"]
        assert float(row["test_mean"]) == pytest.approx((metrics["tasks"]["mr"]["test"]["accuracy"]
                                                         + metrics["tasks"]["spam"]["test"]["f1"]) / 2)
    with (out / "summary.csv").open() as f:
        assert "test_spam:f1_mean" in next(csv.reader(f))


@pytest.mark.parametrize("how", ["sum", "dare"])
def test_merge_trains_each_task_alone_and_serves_them_from_one_merged_change(run, tmp_path, how):
    """`train --tasks mr,spam --merge HOW`: the shared delta is exactly `merge_tasks` of the two single-task
    runs' deltas (kept in single/), each task's own delta is its head alone, made on base + merged change,
    and `apply --task` gives the model the run scored."""
    from childtune.cli import main
    from childtune.delta.task_merge import merge_tasks
    from childtune.training.config import TrainConfig
    from childtune.training.scoring import score

    model, _ = run
    out = tmp_path / "merged"
    assert main(["train", "--tasks", "mr,spam", "--merge", how, "--merge-density", "0.5", "--model", str(model),
                 "--train-size", "32", "--eval-size", "16", "--epochs", "1", "--batch-size", "8", "--lr", "1e-2",
                 "--no-progress", "--seed", "4", "--output", str(out)]) == 0
    singles = [SparseDelta.load(out / "single" / t / "delta") for t in ("mr", "spam")]
    want = merge_tasks(singles, how, density=0.5, seed=4)
    shared = SparseDelta.load(out / "shared" / "delta")
    assert shared.entries.keys() == want.keys() and want and not shared.dense
    for name, entry in want.items():
        assert torch.equal(shared.entries[name].indices, entry.indices), name
        assert torch.equal(shared.entries[name].values, entry.values), name
    for task in ("mr", "spam"):
        head = SparseDelta.load(out / "tasks" / task / "delta")
        assert not head.entries and head.dense.keys() == singles[0].dense.keys()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["merge"] == how and set(metrics["tasks"]["mr"]["alone"]) == {"dev", "test"}
    assert main(["apply", str(out), "--task", "spam", "--output", str(tmp_path / "spam")]) == 0
    scored = score(TrainConfig(model=str(tmp_path / "spam"), task="spam", eval_size=16, progress=False).resolved())
    assert scored["dev"] == metrics["tasks"]["spam"]["dev"]


def test_a_task_file_is_read_once_per_version(tmp_path):
    import os

    from childtune.data.userfiles import read_task_file

    spec = tmp_path / "reviews.json"
    spec.write_text(json.dumps({"train": "a.csv", "dev": "b.csv"}))
    first = read_task_file(spec)
    assert read_task_file(spec) is first  # asked again (a run asks many times): not read again
    spec.write_text(json.dumps({"train": "a.csv", "dev": "c.csv", "name": "edited"}))
    os.utime(spec, ns=(spec.stat().st_atime_ns, spec.stat().st_mtime_ns + 1_000_000))  # (a coarse clock)
    assert read_task_file(spec).name == "edited" and read_task_file(spec).dev.endswith("c.csv")
