"""Child networks held as indices while a run trains: the shared helpers, what strategies and
SparseChildAdamW keep alive, and the same weights as a run whose child network is built from masks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config
from test_resume import run_config, write_task, write_tiny_model
from transformers import BertForSequenceClassification

from childtune.masks import check_index, index_dtype, to_index, to_indices, to_mask, union
from childtune.optim.sparse import SparseChildAdamW
from childtune.strategies import ID3, BitFit, GradualUnfreezing, PaFi, RandomMasking

LR, WD = 1e-2, 0.1
RUNS = {
    "random": lambda: RandomMasking(0.1, seed=1),
    "pafi": lambda: PaFi(0.05),
    "bitfit": lambda: BitFit(),
    "id3": lambda: ID3(0.05, total_steps=3),
    "gradual": lambda: GradualUnfreezing(1),
}


def tiny_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def set_grads(named: dict[str, torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in named.values():
        p.grad = torch.randn(p.shape, generator=g)


def reachable_tensors(root: object, skip: set[int]) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through attributes, dicts and sequences (not through modules or
    the tensors in `skip`: the parameters themselves)."""
    seen, stack, found = set(skip), [root], []
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list | tuple | set):
            stack += list(x)
        elif hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module | type):
            stack += list(vars(x).values())
    return found


def test_index_helpers_round_trip_and_grow_sorted():
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(0)) < 0.3
    index = to_index(mask)
    assert index.dtype == torch.int32 and torch.equal(to_mask(index, mask), mask)
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    grown = union(index, torch.tensor([62, 0, 5], dtype=torch.int64))
    assert grown.dtype == torch.int32 and bool((grown[1:] > grown[:-1]).all())
    assert set(grown.tolist()) == set(index.tolist()) | {0, 5, 62}
    param = torch.zeros(7, 9)
    assert torch.equal(check_index("w", param, mask), index)  # a saved bool mask (an old checkpoint) converts
    for bad in (torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([63]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="sorted, distinct"):
            check_index("w", param, bad)


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_no_byte_per_weight_mask_is_held_while_training(run, in_backward):
    """After the first steps of a fixed or growing run, strategy and optimizer hold the child network as
    sorted, distinct int32 indices and no bool tensor at all."""
    model = tiny_model()
    named = dict(model.named_parameters())
    strategy = RUNS[run]()
    opt = SparseChildAdamW(named, strategy, lr=LR, in_backward=in_backward)
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "labels": torch.tensor([0, 1])}
    for step in range(2):
        if in_backward:
            model(**batch).loss.backward()
        else:
            set_grads(named, step)
        opt.step()
        opt.zero_grad()
    held = reachable_tensors(opt, skip={id(p) for p in named.values()})
    assert not [t for t in held if t.dtype == torch.bool]
    network = strategy.network(2)
    assert network or run == "gradual"
    for name, index in network.items():
        assert index.dtype == torch.int32 and index.dim() == 1, name
        assert bool((index[1:] > index[:-1]).all()), name
        assert not len(index) or (int(index[0]) >= 0 and int(index[-1]) < named[name].numel())


def adamw_on_masks(named: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor], steps: int) -> None:
    """The reference: torch's AdamW on each child network's elements, picked and put back by bool masks
    (parameters without a mask whole, frozen ones untouched), with `set_grads`' gradients."""
    picked = {n: torch.nn.Parameter(p.detach()[masks[n]].clone() if n in masks else p.detach().clone())
              for n, p in named.items() if n not in masks or masks[n].any()}
    opt = torch.optim.AdamW(picked.values(), lr=LR, weight_decay=WD, foreach=True)
    for step in range(steps):
        set_grads(named, step)
        for n, v in picked.items():
            v.grad = named[n].grad[masks[n]].clone() if n in masks else named[n].grad.clone()
        opt.step()
    with torch.no_grad():
        for n, v in picked.items():
            if n in masks:
                named[n][masks[n]] = v
            else:
                named[n].copy_(v)


@pytest.mark.parametrize("run", ["random", "pafi"])
def test_a_run_on_indices_gives_the_weights_of_one_on_masks_bit_for_bit(run):
    model, reference = tiny_model(), tiny_model()
    named, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    strategy = RUNS[run]()
    opt = SparseChildAdamW(named, strategy, lr=LR, weight_decay=WD)
    masks = strategy.final_masks(0)  # the same network, built as masks for the reference
    assert to_indices(masks).keys() == strategy.chosen.keys()
    for step in range(3):
        set_grads(named, step)
        opt.step()
    adamw_on_masks(ref, masks, steps=3)
    for n in named:
        assert torch.equal(named[n], ref[n]), n


def test_checkpoints_hold_indices_and_old_ones_with_masks_still_load():
    model = tiny_model()
    named = dict(model.named_parameters())
    strategy = RandomMasking(0.1, seed=1)
    SparseChildAdamW(named, strategy, lr=LR)
    saved = strategy.state_dict()["chosen"]
    assert all(i.dtype == torch.int32 for i in saved.values())
    again = RandomMasking(0.1, seed=2)
    SparseChildAdamW(named, again, lr=LR)
    again.load_state_dict({"chosen": strategy.final_masks(0)})  # as a checkpoint from before indices saved it
    assert again.chosen.keys() == saved.keys()
    assert all(torch.equal(again.chosen[n], saved[n]) for n in saved)


class NoMasksHeld:
    """A training-loop callback that looks, after every step, for bool tensors the strategy or the
    optimizer holds (the loop's own state: parameters and their gradients left out)."""

    def __init__(self) -> None:
        self.steps = 0
        self.found: list[tuple[int, ...]] = []

    def on_start(self, state) -> None: ...

    def on_step(self, state) -> None:
        self.steps += 1
        params = {id(p) for p in state.model.parameters()}
        held = reachable_tensors(state.optimizer, params) + reachable_tensors(state.strategy, params)
        self.found += [tuple(t.shape) for t in held if t.dtype == torch.bool]

    def on_end(self, state, metrics) -> None: ...


@pytest.mark.parametrize("method", ["child-d", "random", "id3", "pafi", "gradual"])
def test_a_strict_training_run_holds_no_mask_while_it_trains(tmp_path, method):
    from childtune.training.loop import train

    train_file, dev_file = write_task(tmp_path)
    files = {"model": str(write_tiny_model(tmp_path / "model")), "train_file": str(train_file),
             "dev_file": str(dev_file)}
    watch = NoMasksHeld()
    train(run_config(files, method, epochs=1, strict=True), [watch])
    assert watch.steps and not watch.found
