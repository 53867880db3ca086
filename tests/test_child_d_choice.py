"""Child-Tuning_D's child network against a Fisher computed here by hand: exactly its top p, element for element.

`test_fisher.py` checks the scores and `test_strategies.py` the sizes; this file checks the link between
them, for every option that changes the scores (per_example, train_mode, clip) or the cut (per_layer,
scope, rest). The reference is plain autograd on a tiny BERT whose scores have no ties near the cut, and
each option is first shown to change the reference's choice, so a strategy that ignored it would fail.
Every test runs with the scores in one pass and in three (a group of blocks per pass, `passes=3`), whose
choice must be the same.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from childtune import ChildOptimizer, ChildTuningD
from childtune.fisher import PerExampleFallbackWarning
from childtune.masks import top_fraction, top_fraction_in_parts

P = 0.3
CLIP = 0.5  # the model's per-tensor gradient norms run from 0 to about 3: this clip bites on about half
SEED = 7  # dropout's draws, the same for the reference and the strategy
BLOCK = re.compile(r"\.layer\.(\d+)\.")


def model() -> BertForSequenceClassification:
    """Four blocks, dropout to switch on, weights large enough (init 0.5) that clip=1.0 bites too."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2,
        initializer_range=0.5))


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 64, (5, 8), generator=g),
             "attention_mask": torch.ones(5, 8, dtype=torch.long),
             "labels": torch.randint(0, 3, (5,), generator=g)} for _ in range(4)]


def scored_names(net, scope: str) -> list[str]:
    """The authors' `'layer' in name` for scope="layers"; every weight but the task head for "all"."""
    return [n for n, _ in net.named_parameters() if (BLOCK.search(n) if scope == "layers" else "classifier" not in n)]


def reference_fisher(net, data, names, *, per_example=False, train_mode=False, clip=None) -> dict[str, torch.Tensor]:
    """Fisher as documented, by plain autograd: the squared gradient of the batch-mean -log p(y|x) averaged
    over batches, or of each example's own averaged over examples; in train mode (dropout on) if asked;
    each tensor's gradient scaled to norm at most `clip` (clip_grad_norm_'s factor) before squaring."""
    params = dict(net.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    net.train(train_mode)
    torch.manual_seed(SEED)
    for batch in data:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        nll = F.cross_entropy(net(**inputs).logits, batch["labels"], reduction="none")
        for loss in (nll if per_example else [nll.mean()]):
            grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True)
            for n, g in zip(names, grads, strict=True):
                if clip is not None:
                    g = g * min(1.0, clip / (float(g.norm()) + 1e-6))
                total[n] += g**2
            count += 1
    net.eval()
    return {n: t / count for n, t in total.items()}


def top(scores: dict[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """The round(p * n) highest scores as masks, after checking that no near-tie sits at the cut (so the
    choice does not hang on rounding between two ways of computing the same scores)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = round(p * flat.numel())
    ordered = flat.sort(descending=True).values
    assert ordered[k - 1] > ordered[k] * (1 + 1e-5), "a near-tie at the cut: pick another seed or p"
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(k).indices] = True
    masks, start = {}, 0
    for n, s in scores.items():
        masks[n], start = chosen[start : start + s.numel()].view(s.shape), start + s.numel()
    return masks


def reference_choice(net, data, *, p=P, scope="layers", rest="train", per_layer=False, **fisher) -> dict:
    """The child network by hand: top p of the reference Fisher (within each block with `per_layer`, the
    unscored weights as one group), plus all-False masks for unscored weights with rest="freeze"."""
    scores = reference_fisher(net, data, scored_names(net, scope), **fisher)
    if not per_layer:
        chosen = top(scores, p)
    else:
        blocks: dict[str | None, dict] = {}
        for n, s in scores.items():
            match = BLOCK.search(n)
            blocks.setdefault(match and match.group(1), {})[n] = s
        chosen = {n: m for block in blocks.values() for n, m in top(block, p).items()}
    if rest == "freeze":
        for n, param in net.named_parameters():
            if n not in chosen and "classifier" not in n:
                chosen[n] = torch.zeros_like(param, dtype=torch.bool)
    return chosen


def strategy_choice(net, data, strategy: ChildTuningD) -> dict:
    ChildOptimizer(net.named_parameters(), strategy)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerExampleFallbackWarning)  # the by-layer way, whose dropout is the batch's
        strategy.prepare(net, data, progress=False)
    return strategy.final_masks(0)


def assert_same_masks(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n].cpu(), want[n]), f"{n}: {int((got[n].cpu() != want[n]).sum())} elements differ"


OPTIONS = {
    "per_example": {"per_example": True},
    "train_mode": {"train_mode": True},
    "clip": {"clip": CLIP},
    "per_layer": {"per_layer": True},
    "scope_all": {"scope": "all"},
    "rest_freeze": {"rest": "freeze"},
    # (scope="all" is left out here: embeddings cannot be split by example in one batch's backward, and the
    # slower ways draw dropout per example, not the batch's draw the reference differentiates)
    "all_at_once": {"per_example": True, "train_mode": True, "clip": CLIP, "per_layer": True, "rest": "freeze"},
}


PASSES = pytest.mark.parametrize("passes", [1, 3])  # three groups of the four blocks: {0, 3}, {1}, {2}


@PASSES
def test_default_choice_is_exactly_the_top_p_of_per_batch_fisher(passes):
    net, data = model(), batches()
    want = reference_choice(net, data)
    assert_same_masks(strategy_choice(net, data, ChildTuningD(P, passes=passes)), want)


@PASSES
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_chooses_exactly_the_top_p_of_its_reference(option, passes):
    net, data = model(), batches()
    settings = OPTIONS[option]
    want = reference_choice(net, data, **settings)
    plain = reference_choice(net, data)
    assert sorted(want) != sorted(plain) or any(not torch.equal(want[n], plain[n]) for n in want), \
        "the option does not change the reference's choice, so this test could not see it ignored"
    assert_same_masks(strategy_choice(net, data, ChildTuningD(P, passes=passes, **settings)), want)


@PASSES
def test_authors_choose_exactly_the_top_p_of_train_mode_fisher_clipped_at_one(passes):
    net, data = model(), batches()
    want = reference_choice(net, data, train_mode=True, clip=1.0)
    for partial in ({"train_mode": True}, {"clip": 1.0}):  # both parts of the authors' pass move the choice
        other = reference_choice(net, data, **partial)
        assert any(not torch.equal(want[n], other[n]) for n in want), partial
    assert_same_masks(strategy_choice(net, data, ChildTuningD.authors(P, passes=passes)), want)


def test_the_cut_in_parts_is_the_cut_of_all_the_scores_ties_included():
    """Scores a part at a time, in any grouping of blocks and in any order, keep the exact top p of them
    all, ties at the threshold broken by position as one cut over everything breaks them."""
    g = torch.Generator().manual_seed(0)
    scores = {f"h.{b}.{t}": torch.randint(0, 4, (5, 3), generator=g).float() for b in range(4) for t in "wv"}
    scores["embed"] = torch.randint(0, 4, (7,), generator=g).float()  # outside the blocks: a block of its own
    sizes = {n: s.numel() for n, s in scores.items()}
    blocks = {n: n.split(".")[1] if "." in n else None for n in scores}
    groupings = [[None, "0"], ["1", "2", "3"]], [["3"], ["1"], [None, "2", "0"]], [["2"], ["0"], ["1"], ["3", None]]
    for grouping in groupings:
        parts = [{n: s for n, s in scores.items() if blocks[n] in group} for group in grouping]
        for p in (0.05, 0.3, 0.5, 1.0):
            for per_layer in (False, True):
                want = top_fraction(scores, p, per_layer)
                assert_same_masks(top_fraction_in_parts(iter(parts), sizes, p, per_layer), want)


def test_fisher_passes_reach_the_strategy_and_are_not_a_setting():
    """`--fisher-passes` builds ChildTuningD(passes=...); the child network does not depend on it, so it is
    not part of what a run computes: a resumed run or a ledger cell may differ in it."""
    from childtune.training.config import NOT_SETTINGS, ConfigError, TrainConfig, build_strategy

    names = [n for n, _ in model().named_parameters()]
    assert build_strategy(TrainConfig(method="child-d").resolved(), 10, names).passes == 1
    assert build_strategy(TrainConfig(method="child-d-random", fisher_passes=3).resolved(), 10, names).passes == 3
    assert "fisher_passes" in NOT_SETTINGS
    with pytest.raises(ConfigError, match="fisher_passes"):
        TrainConfig(method="child-d", fisher_passes=0).resolved()


def test_a_run_with_fisher_passes_chooses_the_child_network_of_one_pass(tmp_path):
    """Through the CLI (the training loop's Fisher loader, dropout on in the authors' preset), two passes
    save the same masks as one."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_resume import write_task, write_tiny_model

    from childtune.cli import main
    from childtune.study.analysis import load_masks

    train_file, dev_file = write_task(tmp_path)
    tiny = write_tiny_model(tmp_path / "model", dropout=0.1)
    masks = []
    for passes in ("1", "2"):
        out = tmp_path / f"run{passes}"
        assert main(["train", "--model", str(tiny), "--train", str(train_file), "--dev", str(dev_file),
                     "--epochs", "1", "--batch-size", "4", "--method", "child-d", "--preset", "authors",
                     "--fisher-passes", passes, "--no-progress", "--checkpoint-every", "0", "--output", str(out)]) == 0
        masks.append(load_masks(out))
    assert_same_masks(masks[1], masks[0])
