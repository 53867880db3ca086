"""Merging independently trained sparse deltas (`delta.task_merge`, `childtune merge`): each rule against
its definition written out element by element, and the command end to end on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import write_tiny_task

from childtune.cli import main
from childtune.delta import DeltaError, SparseDelta
from childtune.delta.task_merge import merge_tasks


def task_deltas(n: int = 3, seed: int = 0) -> tuple[dict, list[dict], list[SparseDelta]]:
    """A base and `n` tuned copies, each changing its own random 40% of a body tensor (overlapping), with
    values of both signs, and its own head."""
    g = torch.Generator().manual_seed(seed)
    base = {"layer.0.w": torch.randn(6, 7, generator=g), "classifier.weight": torch.randn(2, 7, generator=g)}
    diffs, deltas = [], []
    for _ in range(n):
        chosen = torch.rand(6, 7, generator=g) < 0.4
        diff = torch.where(chosen, torch.randn(6, 7, generator=g), torch.zeros(6, 7))
        tuned = {"layer.0.w": base["layer.0.w"] + diff, "classifier.weight": torch.randn(2, 7, generator=g)}
        diffs.append({"layer.0.w": tuned["layer.0.w"] - base["layer.0.w"]})
        deltas.append(SparseDelta.from_training(base, tuned, method="child-d"))
    return base, diffs, deltas


def as_dense(entries, name, shape) -> torch.Tensor:
    out = torch.zeros(shape).reshape(-1)
    entry = entries.get(name)
    if entry is not None:
        out[entry.indices] = entry.values
    return out.reshape(shape)


def trimmed(diff: torch.Tensor, density: float) -> torch.Tensor:
    """The `density` share (rounded down) of a task vector's nonzero elements of largest magnitude."""
    flat = diff.reshape(-1)
    nonzero = flat.nonzero().view(-1).tolist()
    keep = sorted(nonzero, key=lambda i: -abs(float(flat[i])))[:int(density * len(nonzero))]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(diff.shape)


def ties_by_hand(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Per element: the sign of the sum of the (unweighted) values, then the weighted values of that sign,
    summed and divided by how many there are."""
    flat = [v.reshape(-1) for v in vectors]
    out = torch.zeros_like(flat[0])
    for e in range(len(out)):
        values = [float(v[e]) for v in flat]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [(w * x) for w, x in zip(weights, values, strict=True) if x != 0 and (x > 0) == (sign > 0)]
        out[e] = sum(agree) / max(1, len(agree))
    return out.reshape(vectors[0].shape)


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_ties_is_trim_elect_and_disjoint_mean(density):
    _, diffs, deltas = task_deltas()
    weights = [1.0, 0.5, 2.0]
    merged = merge_tasks(deltas, "ties", density=density, weights=weights)
    want = ties_by_hand([trimmed(d["layer.0.w"], density) for d in diffs], weights)
    torch.testing.assert_close(as_dense(merged, "layer.0.w", (6, 7)), want, rtol=1e-6, atol=1e-6)
    assert "classifier.weight" not in merged  # heads stay per task


def test_sum_is_task_arithmetic():
    _, diffs, deltas = task_deltas()
    merged = merge_tasks(deltas, "sum", weights=[1.0, -1.0, 0.5])
    want = diffs[0]["layer.0.w"] - diffs[1]["layer.0.w"] + 0.5 * diffs[2]["layer.0.w"]
    torch.testing.assert_close(as_dense(merged, "layer.0.w", (6, 7)), want, rtol=1e-6, atol=1e-6)


def test_dare_keeps_a_density_share_rescaled_and_is_seeded():
    _, diffs, deltas = task_deltas(n=2, seed=1)
    one = merge_tasks(deltas[:1] * 2, "dare", density=0.5, weights=[1.0, 0.0], seed=3)  # the first delta alone
    again = merge_tasks(deltas[:1] * 2, "dare", density=0.5, weights=[1.0, 0.0], seed=3)
    other = merge_tasks(deltas[:1] * 2, "dare", density=0.5, weights=[1.0, 0.0], seed=4)
    diff = diffs[0]["layer.0.w"]
    got = as_dense(one, "layer.0.w", (6, 7))
    kept = got != 0
    assert torch.equal(got, as_dense(again, "layer.0.w", (6, 7)))
    assert not torch.equal(got, as_dense(other, "layer.0.w", (6, 7)))
    torch.testing.assert_close(got[kept], 2 * diff[kept])  # kept values rescaled by 1 / density
    assert kept.sum() < (diff != 0).sum()  # some dropped
    shares = []
    for seed in range(200):
        dense = as_dense(merge_tasks(deltas[:1] * 2, "dare", density=0.3, weights=[1.0, 0.0], seed=seed),
                         "layer.0.w", (6, 7))
        shares.append(float((dense != 0).sum() / (diff != 0).sum()))
    assert abs(sum(shares) / len(shares) - 0.3) < 0.02  # each changed element kept with probability 0.3


def test_bad_merges_are_refused():
    _, _, deltas = task_deltas()
    _, _, strangers = task_deltas(seed=9)
    with pytest.raises(DeltaError, match="different bases"):
        merge_tasks([deltas[0], strangers[0]], "sum")
    with pytest.raises(DeltaError, match="at least two"):
        merge_tasks(deltas[:1], "ties")
    with pytest.raises(DeltaError, match="density"):
        merge_tasks(deltas, "dare", density=0.0)
    with pytest.raises(DeltaError, match="2 weights for 3"):
        merge_tasks(deltas, "sum", weights=[1.0, 2.0])


def test_merge_command_writes_a_delta_per_task_that_applies(tmp_path, capsys):
    """Two child-d runs of different seeds on one base; their sum applied for either run is the base plus
    both changes in the body, with that run's own head."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    tiny = write_tiny_task(tmp_path / "tiny")
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        assert main(["train", "--model", str(tiny), "--train", str(tiny / "train.csv"), "--dev", str(tiny / "dev.csv"),
                     "--method", "child-d", "--reserve-p", "0.2", "--lr", "3e-3", "--epochs", "2", "--seed", str(seed),
                     "--no-progress", "--output", str(run)]) == 0
        runs.append(run)
    out = tmp_path / "merged"
    assert main(["merge", *map(str, runs), "--how", "sum", "--output", str(out)]) == 0
    assert "one folder per task (run1, run2)" in capsys.readouterr().out
    assert json.loads((out / "merge.json").read_text())["how"] == "sum"
    base = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2).state_dict()
    first, second = (SparseDelta.load(r / "delta") for r in runs)
    assert main(["apply", str(out / "run2"), "--output", str(tmp_path / "model2")]) == 0
    tuned = load_file(tmp_path / "model2" / "model.safetensors")
    for name in first.entries.keys() | second.entries.keys():
        want = base[name].clone()
        for delta in (first, second):
            if name in delta.entries:
                want.view(-1)[delta.entries[name].indices] += delta.entries[name].values
        torch.testing.assert_close(tuned[name], want, rtol=0, atol=1e-6)
    for name, head in second.dense.items():
        assert torch.equal(tuned[name], head)


def test_evaluate_scores_an_applied_delta_as_its_run_scored_itself(tmp_path, capsys):
    """`childtune evaluate` on the model `apply` made from a run's delta gives the run's own dev and test
    metrics: the same loading, batching and scoring as the run's end."""
    tiny = write_tiny_task(tmp_path / "tiny")
    files = ["--train", str(tiny / "train.csv"), "--dev", str(tiny / "dev.csv"), "--test", str(tiny / "test.csv")]
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny), *files, "--method", "child-d", "--reserve-p", "0.2", "--lr", "3e-3",
                 "--epochs", "2", "--no-progress", "--output", str(run)]) == 0
    assert main(["apply", str(run), "--output", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "model"), *files, "--no-progress", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (scored["dev"], scored["test"]) == (metrics["dev"], metrics["test"])
    assert scored["primary_metric"] == "accuracy"
