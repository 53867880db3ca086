"""DDP and FSDP2 on CPU (gloo): every rank trains the same child network, and matches a single process.

One `torchrun` job of two ranks (started through `childtune.training.launch.launch`, running this file as
its script) trains a tiny BERT with Child-Tuning_F, Child-Tuning_D and ID3 under DDP, once more through
Accelerate, then sharded by FSDP2 with both optimizers, with and without the step in backward, and tries
FSDP 1; each rank saves what it ended with. The tests compare the ranks with each other and with the same
loop run here in one process on the same global batches.
Starting the job costs most of its ~20 s (two interpreters importing transformers), so it runs once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from childtune import ID3, ChildOptimizer, ChildTuningD, ChildTuningF, shards
from childtune.fisher import fisher_information
from childtune.optim import SparseChildAdamW
from childtune.training import distributed as D
from childtune.training.launch import launch, strip_nproc

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the torchrun ranks run this file as a script
    sys.path.insert(0, str(HERE))
from conftest import tiny_bert_config  # noqa: E402
from test_resume import Final, write_task, write_tiny_model  # noqa: E402

METHODS = ("child-f", "child-d", "id3")
N, LENGTH, PER_RANK, WORLD, EPOCHS, LR, SEED = 32, 8, 4, 2, 2, 1e-2, 5
STEPS = EPOCHS * N // (PER_RANK * WORLD)
# Two half-batch gradients averaged against one whole-batch mean differ by rounding; Adam's step
# lr * m / (sqrt(v) + eps) turns that into a visible fraction of lr for a gradient near eps.
AVERAGED = dict(rtol=1e-4, atol=5e-3 * LR)


# ------------------------------------------------------------------------------ the loop, both sides


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(1, 64, (N, LENGTH), generator=g)
    labels = (ids[:, 0] > 32).long()  # learnable, so gradients carry signal
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def make_model():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def strategy(method: str):
    if method == "child-f":
        return ChildTuningF(0.4, seed=SEED)
    if method == "child-d":
        return ChildTuningD(0.3, per_example=True)
    return ID3(0.05, total_steps=STEPS)


def train(method: str, batch_size: int, world_size: int, rank: int, accelerate: bool = False) -> dict:
    """The minimal DDP loop a user would write with childtune: sharded sampler, wrap, ChildOptimizer."""
    data = dataset()
    sampler = D.ShardedSampler(len(data), seed=SEED, rank=rank, world_size=world_size)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    model = make_model()
    strat = strategy(method)
    fisher = None
    if method == "child-d":  # scored on this rank's shard; the Fisher pass all-reduces the sums
        sampler.set_epoch(0)
        fisher = fisher_information(model, loader, per_example=True, progress=False)
    optimizer = ChildOptimizer(model.named_parameters(), strat, lr=LR)
    if method == "child-d":
        sampler.set_epoch(0)
        strat.prepare(model, loader)
    if accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        D.check_accelerator(accelerator)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = D.wrap(model)
    model.train()
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            if accelerate:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    inner = D.unwrap(model)
    return {
        "params": {n: p.detach().clone() for n, p in inner.named_parameters()},
        "masks": strat.dense(getattr(strat, "chosen", None) or {}),
        "fisher": fisher,
        "steps": optimizer.steps if not accelerate else optimizer.optimizer.steps,
        "in_sync": D.in_sync(model),
    }


FSDP_RUNS = {  # name: (strategy, optimizer, step in backward, child-only weight gradients)
    "child-f": ("child-f", ChildOptimizer, False, False),
    "child-f-in-backward": ("child-f", ChildOptimizer, True, False),
    "child-d": ("child-d", SparseChildAdamW, False, False), "child-d-dense": ("child-d", ChildOptimizer, False, False),
    "child-d-in-backward": ("child-d", SparseChildAdamW, True, False),
    "child-d-child-only": ("child-d", SparseChildAdamW, False, True),
    "child-d-child-only-in-backward": ("child-d", SparseChildAdamW, True, True),
    "id3": ("id3", SparseChildAdamW, False, False), "id3-in-backward": ("id3", SparseChildAdamW, True, False),
    "id3-every-2-in-backward": ("id3-every-2", SparseChildAdamW, True, False),
    "id3-every-2-child-only-in-backward": ("id3-every-2", SparseChildAdamW, True, True),
}


def train_fsdp(run: str, world_size: int, rank: int) -> dict:
    """The loop sharded by FSDP2 (`world_size` > 1) or in one process: Child-Tuning_D scores per batch on the
    same whole batches on every rank (the Fisher pass's rule under FSDP); each rank trains on its share."""
    method, optimizer_class, in_backward, child_only = FSDP_RUNS[run]
    data = dataset()
    sampler = D.ShardedSampler(len(data), seed=SEED, rank=rank, world_size=world_size)
    loader = DataLoader(data, batch_size=PER_RANK * WORLD // world_size, sampler=sampler)
    model = make_model()
    if world_size > 1:
        D.shard(model)
    strat = (ChildTuningD(0.3, rest="freeze") if method == "child-d" else
             ID3(0.05, total_steps=STEPS, every=2) if method == "id3-every-2" else strategy(method))
    kwargs = {"strict": method != "child-f"} if optimizer_class is ChildOptimizer else {}
    optimizer = optimizer_class(model.named_parameters(), strat, lr=LR, in_backward=in_backward, **kwargs)
    if strat.needs_data:
        strat.prepare(model, DataLoader(data, batch_size=PER_RANK * WORLD))
    child = optimizer.child_only_grads(model) if child_only else None
    model.train()
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    params = dict(model.named_parameters())
    local = strat.dense(getattr(strat, "chosen", None) or {})
    return {"params": {n: (p.full_tensor() if shards.is_sharded(p) else p).detach().clone() for n, p in params.items()},
            "masks": shards.gather_masks(local, params), "local_masks": local,
            "sharded": all(shards.is_sharded(p) for p in params.values()), "steps": optimizer.steps,
            "child_only": sorted(child.sites) if child is not None else []}


def trainer_run(out: Path) -> dict:
    """Child-Tuning_D through the HF Trainer (Accelerate wraps it in DDP, shards its dataloader and the
    strategy scores Fisher on this rank's shard), as a user of `ChildTuningTrainer` runs it under torchrun."""
    from transformers import TrainingArguments

    from childtune.hf import ChildTuningTrainer

    model, strat = make_model(), ChildTuningD(0.3, rest="freeze")
    args = TrainingArguments(output_dir=str(out / "trainer"), use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=4, per_device_train_batch_size=PER_RANK, learning_rate=LR, seed=SEED,
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = ChildTuningTrainer(model=model, args=args, train_dataset=dataset(), strategy=strat, strict=True)
    D.check_accelerator(trainer.accelerator)
    trainer.train()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "masks": strat.dense(strat.chosen), "steps": trainer.state.global_step,
            "in_sync": D.in_sync(model), "world": trainer.accelerator.num_processes}


def worker(out: Path) -> None:
    """One rank of the torchrun job: train every method, save this rank's results."""
    torch.set_num_threads(1)
    me = D.init()
    results = {m: train(m, PER_RANK, me.world_size, me.rank) for m in METHODS}
    results["accelerate-child-f"] = train("child-f", PER_RANK, me.world_size, me.rank, accelerate=True)
    results["trainer-child-d"] = trainer_run(out)
    results["fsdp"] = {run: train_fsdp(run, me.world_size, me.rank) for run in FSDP_RUNS}
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        D.wrap(FullyShardedDataParallel(make_model(), device_id=torch.device("cpu")))
        results["fsdp1"] = "trained"
    except D.DistributedError as err:
        results["fsdp1"] = str(err)
    results["any_rank"] = (D.any_rank(me.rank == 1), D.any_rank(False))  # one rank's NaN stops every rank
    torch.save(results, out / f"rank{me.rank}.pt")
    D.main_only(lambda: (out / "written-by").write_text(str(me.rank)))()
    D.barrier()
    D.shutdown()


# ----------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    code = launch([str(out)], WORLD, script=Path(__file__), threads=1)
    assert code == 0, "the torchrun job failed; its output is above"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)] + [out]


@pytest.fixture(scope="module")
def single() -> dict:
    """The same loop in one process, with a batch as large as both ranks' together."""
    return {m: train(m, PER_RANK * WORLD, 1, 0) for m in METHODS}


def assert_equal_params(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if tol:
            torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", [*METHODS, "accelerate-child-f", "trainer-child-d"])
def test_ranks_end_bit_identical(ranks, method):
    r0, r1 = ranks[0][method], ranks[1][method]
    assert r0["steps"] == r1["steps"] == (4 if method.startswith("trainer") else STEPS)
    assert r0["in_sync"] and r1["in_sync"]
    assert_equal_params(r0["params"], r1["params"])
    assert r0["masks"].keys() == r1["masks"].keys()
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    start = dict(make_model().named_parameters())
    moved = sum(int((r0["params"][n] != start[n]).sum()) for n in start)
    assert moved > 0.01 * sum(p.numel() for p in start.values())  # it trained


@pytest.mark.parametrize("method", METHODS)
def test_ddp_equals_single_process_with_same_global_batch(ranks, single, method):
    """DDP averages the two half-batch gradients, the single process takes the whole batch's mean:
    equal up to float rounding (`AVERAGED`), with identical child networks."""
    ddp, one = ranks[0][method], single[method]
    for name in one["masks"]:
        assert torch.equal(ddp["masks"][name], one["masks"][name]), name
    assert_equal_params(ddp["params"], one["params"], **AVERAGED)


def test_fisher_is_all_reduced_across_ranks(ranks, single):
    """Each rank scored only its own half of the data, yet both hold the scores of all of it."""
    f0, f1, full = ranks[0]["child-d"]["fisher"], ranks[1]["child-d"]["fisher"], single["child-d"]["fisher"]
    for name in full:
        assert torch.equal(f0[name], f1[name]), name
        torch.testing.assert_close(f0[name], full[name], rtol=1e-4, atol=1e-12)


def test_accelerate_trains_like_plain_ddp(ranks):
    assert_equal_params(ranks[0]["accelerate-child-f"]["params"], ranks[0]["child-f"]["params"])


def test_trainer_ran_as_two_processes(ranks):
    assert ranks[0]["trainer-child-d"]["world"] == ranks[1]["trainer-child-d"]["world"] == WORLD


@pytest.mark.parametrize("run", FSDP_RUNS)
def test_fsdp2_equals_single_process_with_same_global_batch(ranks, run):
    """Sharded by FSDP2, each rank holds rows of every parameter, masks and optimizer state; the child
    network gathered from the two ranks' rows is the single process's, element for element, and so are
    the final parameters (to float rounding: FSDP averages the two half-batch gradients)."""
    one = train_fsdp(run, 1, 0)
    for rank in ranks[:WORLD]:
        mine = rank["fsdp"][run]
        assert mine["sharded"] and mine["steps"] == STEPS
        assert mine["masks"].keys() == one["masks"].keys()
        for name, mask in one["masks"].items():
            assert torch.equal(mine["masks"][name], mask), name
            assert mine["local_masks"][name].numel() < mask.numel() or mask.shape[0] == 1  # its rows alone
        assert_equal_params(mine["params"], one["params"], **AVERAGED)
    start = dict(make_model().named_parameters())
    moved = sum(int((one["params"][n] != start[n]).sum()) for n in start)
    assert moved > 0.01 * sum(p.numel() for p in start.values())  # it trained


@pytest.mark.parametrize("run", [r for r, (*_, child_only) in FSDP_RUNS.items() if child_only])
def test_fsdp2_child_only_gradients_equal_the_dense_path(ranks, run):
    """Child-only weight gradients on FSDP2 shards (each rank's rows of the child index, the whole weight's
    gradient at every rank's elements averaged over the ranks, each rank keeping its rows', the in-backward
    step run from the gathered weight's hook): the final weights are those of one process with dense
    gradients, to float rounding."""
    dense = next(r for r, spec in FSDP_RUNS.items() if spec == (*FSDP_RUNS[run][:3], False))
    one = train_fsdp(dense, 1, 0)
    linear = {f"{n}.weight" for n, m in make_model().named_modules() if isinstance(m, torch.nn.Linear)}
    for rank in ranks[:WORLD]:
        mine = rank["fsdp"][run]
        assert mine["child_only"] and set(mine["child_only"]) <= linear  # it ran child-only, on Linear weights
        assert_equal_params(mine["params"], one["params"], **AVERAGED)


def test_fsdp2_rows_are_split_as_fully_shard_splits_them(ranks):
    """Rank 0 holds the first ceil(rows / 2) rows of each tensor, rank 1 the rest (the classifier's 2 rows:
    one each), which is what lets ties be broken in single-process order."""
    for name, mask in ranks[0]["fsdp"]["child-d"]["masks"].items():
        first = -(-mask.shape[0] // WORLD)
        assert torch.equal(ranks[0]["fsdp"]["child-d"]["local_masks"][name], mask[:first]), name
        assert torch.equal(ranks[1]["fsdp"]["child-d"]["local_masks"][name], mask[first:]), name


def test_fsdp1_is_refused_naming_fsdp2_and_ddp(ranks):
    for rank in ranks[:WORLD]:
        assert "FSDP 1" in rank["fsdp1"] and "--fsdp" in rank["fsdp1"] and "DDP" in rank["fsdp1"]


def test_ranks_agree_when_one_sees_a_problem(ranks):
    assert [r["any_rank"] for r in ranks[:WORLD]] == [(True, False)] * WORLD


def test_only_rank_zero_writes(ranks):
    out = ranks[-1]
    assert (out / "written-by").read_text() == "0"


# --------------------------------------------------------------------- pieces, without a process group


def test_sampler_shards_are_the_single_process_batches():
    """Per-rank batch k of all ranks together is exactly single-process batch k at world_size x size."""
    one = list(D.ShardedSampler(30, seed=3, rank=0, world_size=1))
    shards = [list(D.ShardedSampler(30, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert sorted(one) == list(range(30))
    for k in range(5):
        together = sorted(i for s in shards for i in s[2 * k : 2 * k + 2])
        assert together == sorted(one[6 * k : 6 * k + 6])


def test_sampler_order_depends_on_seed_and_epoch_and_resumes_mid_epoch():
    s = D.ShardedSampler(20, seed=1, rank=1, world_size=2)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert first != second and len(first) == len(s) == 10
    s.set_epoch(1, start=4)
    assert list(s) == second[4:] and len(s) == 6
    assert list(D.ShardedSampler(20, seed=2, rank=1, world_size=2)) != first
    with pytest.raises(ValueError, match="start"):
        s.set_epoch(0, start=11)


@pytest.mark.parametrize(("size", "drop_last", "per_rank"), [(7, False, 4), (7, True, 3), (0, False, 0)])
def test_sampler_gives_every_rank_the_same_number_of_steps(size, drop_last, per_rank):
    shards = [list(D.ShardedSampler(size, seed=0, rank=r, world_size=2, drop_last=drop_last)) for r in range(2)]
    assert [len(s) for s in shards] == [per_rank, per_rank]
    assert set(shards[0]) | set(shards[1]) == (set(range(size)) if not drop_last else set(shards[0] + shards[1]))


def test_dist_info_from_env():
    me = D.DistInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (me.rank, me.world_size, me.local_rank, me.is_main, me.distributed) == (3, 4, 1, False, True)
    assert D.DistInfo.from_env({}) == D.DistInfo(0, 1, 0)
    with pytest.raises(D.DistributedError, match="WORLD_SIZE"):
        D.DistInfo.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(D.DistributedError, match="rank 4"):
        D.DistInfo.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_single_process_helpers_are_no_ops(tiny_bert):
    assert D.init() == D.DistInfo()
    assert D.wrap(tiny_bert) is tiny_bert
    assert D.main_only(lambda: 7)() == 7
    assert D.any_rank(True) and not D.any_rank(False)
    assert D.gather("x") == ["x"]
    assert D.in_sync(tiny_bert)


def test_check_accelerator_refuses_sharding_and_lone_ranks(monkeypatch):
    from types import SimpleNamespace

    for kind in ("DistributedType.FSDP", "DistributedType.DEEPSPEED"):
        with pytest.raises(D.DistributedError, match="DDP"):
            D.check_accelerator(SimpleNamespace(distributed_type=kind, num_processes=2))
    D.check_accelerator(SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", num_processes=1))
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")  # `accelerate launch --multi_gpu` on a CPU-only machine
    with pytest.raises(D.DistributedError, match="cpu=True"):
        D.check_accelerator(SimpleNamespace(distributed_type="DistributedType.NO", num_processes=1))
    D.check_accelerator(SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", num_processes=2))


def test_launch_arguments():
    assert strip_nproc(["train", "--nproc", "2", "--task", "mr", "--nproc=3"]) == ["train", "--task", "mr"]
    with pytest.raises(ValueError, match="nproc"):
        launch(["train"], 0)


def test_launch_refuses_to_nest(monkeypatch):
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    with pytest.raises(D.DistributedError, match="already running"):
        launch(["train"], 2)


# -------------------------------------------------------------------------------- through the CLI


def test_cli_nproc_2_trains_like_one_process(tmp_path, capfd):
    """`childtune train --nproc 2` re-runs itself under torchrun: DDP over the same global batches as one
    process, rank 0 alone writing the run folder and printing the result."""
    import safetensors.torch

    from childtune.cli import main
    from childtune.training.config import TrainConfig
    from childtune.training.loop import train

    train_file, dev_file = write_task(tmp_path)
    files = {"model": str(write_tiny_model(tmp_path / "model", dropout=0.0)), "train_file": str(train_file),
             "dev_file": str(dev_file)}
    argv = ["train", "--nproc", "2", "--model", files["model"], "--train", files["train_file"],
            "--dev", files["dev_file"], "--method", "child-d", "--fisher-per-example", "--epochs", "2",
            "--batch-size", "4", "--lr", "0.01", "--seed", "3", "--save", "model", "--no-progress",
            "--output", str(tmp_path / "run")]
    assert main(argv) == 0
    assert capfd.readouterr().out.count("wrote") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    one = Final()
    train(TrainConfig(task=None, **files, method="child-d", fisher_per_example=True, epochs=2, batch_size=4,
                      lr=1e-2, seed=3, progress=False), [one])
    ddp = safetensors.torch.load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == one.metrics["steps"] == 10
    for name, value in one.params.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_cli_fsdp_trains_like_one_process_with_state_sharded(tmp_path, capfd):
    """`childtune train --nproc 2 --fsdp`: Fisher on every rank's same batches, each rank's rows of the masks
    and sparse state, the child network and weights gathered on rank 0 and saved: the one-process run's."""
    from safetensors.torch import load_file

    from childtune.cli import main
    from childtune.delta import SparseDelta

    train_file, dev_file = write_task(tmp_path)
    model = str(write_tiny_model(tmp_path / "model", dropout=0.0))
    runs = {}
    for name, more in (("fsdp", ["--nproc", "2", "--fsdp"]), ("one", [])):
        argv = ["train", *more, "--model", model, "--train", str(train_file), "--dev", str(dev_file),
                "--method", "child-d", "--strict", "--epochs", "2", "--batch-size", "4", "--lr", "0.01",
                "--seed", "3", "--no-progress", "--output", str(tmp_path / name)]
        assert main(argv) == 0, name
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert capfd.readouterr().out.count("wrote") == 2
    assert runs["fsdp"]["steps"] == runs["one"]["steps"] == 10
    assert runs["fsdp"]["child_params"] == runs["one"]["child_params"] > 0
    assert runs["fsdp"]["changed_outside_child"] == 0
    assert runs["fsdp"]["optimizer_state_bytes"] < 0.6 * runs["one"]["optimizer_state_bytes"]  # rank 0's half
    masks = [load_file(tmp_path / name / "masks.safetensors") for name in runs]
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    weights = []
    for name in runs:
        from transformers import AutoModelForSequenceClassification

        tuned = AutoModelForSequenceClassification.from_pretrained(model)
        SparseDelta.load(tmp_path / name / "delta").apply(tuned)
        weights.append(dict(tuned.named_parameters()))
    # the ranks' gradients are averaged in another order than one process sums them, and Adam's 1/sqrt(v) grows
    # that rounding on elements with small second moments: 10 steps at lr 0.01 reached 1.3e-5 on one element
    assert_equal_params(weights[0], weights[1], rtol=1e-4, atol=5e-5)


def test_cli_fsdp_causal_lm_default_takes_child_only_gradients_like_one_process(tmp_path, capfd):
    """child-d's causal-LM default (fp32, child-only gradients, step after backward with clipping) now holds
    under --fsdp too: the clipped norm counts every rank's child vectors once, and the tuned weights are the
    one-process run's (which has them whole)."""
    from safetensors.torch import load_file
    from test_causal import write_generation_task
    from test_families import write_tiny_llama

    from childtune.cli import main

    train, dev = write_generation_task(tmp_path, n_train=24, n_dev=4)
    model = str(write_tiny_llama(tmp_path / "model"))
    for name, more in (("fsdp", ["--nproc", "2", "--fsdp"]), ("one", [])):
        argv = ["train", *more, "--model", model, "--train", str(train), "--dev", str(dev), "--method", "child-d",
                "--reserve-p", "0.3", "--lr", "1e-2", "--max-grad-norm", "0.05", "--epochs", "2", "--batch-size",
                "8", "--eval-batch-size", "4", "--max-new-tokens", "2", "--no-progress", "--save", "model",
                "--output", str(tmp_path / name)]
        assert main(argv) == 0, capfd.readouterr().err
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert (saved["child_only_grads"], saved["optimizer_in_backward"], saved["max_grad_norm"]) == (
            True, False, 0.05)
    fsdp, one = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("fsdp", "one"))
    assert_equal_params(fsdp, one, rtol=1e-4, atol=5e-5)
    base = load_file(Path(model) / "model.safetensors")
    assert sum(int((one[n] != base[n]).sum()) for n in base) > 0  # it trained


def test_cli_fsdp_with_bf16_weights_saves_its_delta(tmp_path, capfd):
    """docs/distributed.md's recipe (`--fsdp --dtype bf16 --optimizer-in-backward`): the gathered weights are
    bf16 like the base's, so the run saves its delta (it used to train to the end, then fail to save)."""
    from safetensors.torch import load_file

    from childtune.cli import main

    train_file, dev_file = write_task(tmp_path)
    argv = ["train", "--nproc", "2", "--fsdp", "--dtype", "bf16", "--optimizer-in-backward", "--model",
            str(write_tiny_model(tmp_path / "model", dropout=0.0)), "--train", str(train_file), "--dev",
            str(dev_file), "--method", "id3", "--epochs", "1", "--batch-size", "4", "--no-progress", "--output",
            str(tmp_path / "run")]
    assert main(argv) == 0, capfd.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["changed_params"] > 0
    assert {t.dtype for t in load_file(tmp_path / "run" / "delta" / "delta.safetensors").values()
            if t.is_floating_point()} == {torch.bfloat16}


def test_cli_fsdp_refuses_what_it_cannot_shard(tmp_path, capfd):
    from childtune.cli import main

    base = ["train", "--nproc", "2", "--fsdp", "--task", "mr", "--output", str(tmp_path / "run")]
    for more, said in ((["--method", "lora"], "peft adapters"), (["--checkpoint-every", "5"], "--checkpoint-every"),
                       (["--method", "child-d", "--fisher-per-example"], "per-example")):
        capfd.readouterr()
        assert main(base + more) == 2
        assert said in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_nproc_needs_a_batch_that_splits_evenly(tmp_path, capfd):
    """Found by both ranks before any work, said once: one `childtune: error:` line, exit 2, none of
    torchrun's SIGTERM notices, tracebacks or ChildFailedError report."""
    from childtune.cli import main

    train_file, dev_file = write_task(tmp_path)
    argv = ["train", "--nproc", "2", "--model", str(write_tiny_model(tmp_path / "model")), "--train",
            str(train_file), "--dev", str(dev_file), "--batch-size", "5", "--output", str(tmp_path / "run")]
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.strip() == "childtune: error: batch_size 5 must be a multiple of the 2 processes", err
    assert not (tmp_path / "run").exists()


def test_cli_nproc_bad_value_fails_before_any_rank_starts(tmp_path, capfd):
    from childtune.cli import main

    argv = ["train", "--nproc", "2", "--task", "mr", "--id3-exp", "nan", "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    assert capfd.readouterr().err.strip() == "childtune: error: id3_exp must be a finite number, got nan"


def test_a_crashing_rank_is_named_in_one_line(tmp_path, capfd):
    """A rank that dies of something that is not a user error keeps its own output; the launcher adds
    one line naming it, and returns its exit code, instead of torchrun's report."""
    script = tmp_path / "crash.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    assert launch([], 2, script=script, threads=1) == 3
    assert capfd.readouterr().err.strip() == "childtune: rank 1 failed with exit code 3 (its output is above)"


def test_user_errors_of_ranks_are_printed_once_each(tmp_path, capfd):
    """Ranks that report different messages are all heard, each distinct message once, in rank order."""
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nfrom childtune.training.launch import report_error\n"
                      "report_error('bad shard' if os.environ['RANK'] == '1' else 'bad batch')\nsys.exit(2)\n")
    assert launch([], 3, script=script, threads=1) == 2
    assert capfd.readouterr().err.splitlines() == ["childtune: error: bad batch", "childtune: error: bad shard"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
