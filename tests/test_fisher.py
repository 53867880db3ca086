"""Fisher information checked against brute force: every estimate is recomputed here the slow, obvious way."""

from __future__ import annotations

import multiprocessing
import os
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_bert_config
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from childtune.fisher import (
    PerExampleFallbackWarning,
    VmapFallbackWarning,
    fisher_in_passes,
    fisher_information,
    per_example,
)
from childtune.layers import in_layer, layer_index

LENGTHS = [5, 2, 7, 3, 3, 6, 4, 1]  # batches of 3 pad to 7, 6 and 4 tokens


def make_examples(regression: bool = False, lengths=LENGTHS, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        label = torch.randn((), generator=g) if regression else torch.randint(0, 2, (), generator=g)
        out.append({"input_ids": torch.randint(1, 64, (n,), generator=g), "labels": label})
    return out


def pad_collate(examples: list[dict]) -> dict:
    """Dynamic padding to the longest example of the batch, as HF's DataCollatorWithPadding does."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = e["input_ids"]
        mask[i, : len(e["input_ids"])] = 1
    labels = torch.stack([e["labels"] for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


def loader(examples: list[dict], batch_size: int = 3) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, collate_fn=pad_collate)


def scored_params(model, scored=in_layer) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if scored(n)}


def neg_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example -log p(y|x), written out independently of the module under test."""
    if logits.shape[-1] == 1:
        return 0.5 * (labels.float() - logits[:, 0]) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def brute_force_per_example(model, examples, params) -> dict[str, torch.Tensor]:
    """Each example alone, unpadded and without any mask: mean of squared gradients."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for e in examples:
        logits = model(input_ids=e["input_ids"][None]).logits
        grads = torch.autograd.grad(neg_log_likelihood(logits, e["labels"][None])[0], list(params.values()))
        for n, g in zip(params, grads, strict=True):
            total[n] += g**2
    return {n: t / len(examples) for n, t in total.items()}


def brute_force_batches(model, batches, params) -> dict[str, torch.Tensor]:
    """The authors' estimate by hand: mean over batches of the squared gradient of the batch-mean loss."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        loss = neg_log_likelihood(model(**inputs).logits, b["labels"]).mean()
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            total[n] += g**2
    return {n: t / len(batches) for n, t in total.items()}


def assert_scores_close(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    scale = max(float(e.abs().max()) for e in expected.values())
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-6 * scale, msg=n)


class Fussy(nn.Module):
    """Wraps a model with data-dependent control flow, which torch.func.vmap cannot trace."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kwargs):
        if bool((input_ids < 0).any()):
            raise ValueError("negative token ids")
        return self.inner(input_ids=input_ids, **kwargs)


class MaskedMeanPool(nn.Module):
    """A model vmap can vectorise that still depends on the attention mask (padding must be excluded)."""

    def __init__(self, num_labels: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, num_labels)

    def forward(self, input_ids, attention_mask=None, **unused):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if attention_mask is None:
            return self.head(h.mean(1))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))  # plain tensor output: no `.logits`


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerExampleFallbackWarning)
        return fn(*args, progress=False, **kwargs)


def test_per_example_equals_each_example_alone_unpadded(tiny_bert, way):
    examples = make_examples()
    scores = fisher_information(tiny_bert, loader(examples), per_example=True, progress=False)
    assert_scores_close(scores, brute_force_per_example(tiny_bert, examples, scored_params(tiny_bert)))


def test_authors_estimate_is_mean_of_squared_batch_gradients(tiny_bert):
    data = loader(make_examples())
    scores = fisher_information(tiny_bert, data, progress=False)
    expected = brute_force_batches(tiny_bert, list(data), scored_params(tiny_bert))
    assert_scores_close(scores, expected)
    # Squaring a batch mean is not the mean of squares: the two estimates genuinely differ.
    per_example = quiet(fisher_information, tiny_bert, data, per_example=True)
    assert not torch.allclose(scores["bert.encoder.layer.0.output.dense.weight"],
                              per_example["bert.encoder.layer.0.output.dense.weight"])


def test_vectorised_ways_respect_padding(way):
    model = MaskedMeanPool()
    examples = make_examples()
    scores = fisher_information(model, loader(examples), per_example=True, progress=False)
    params = scored_params(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for e in examples:
        loss = F.cross_entropy(model(e["input_ids"][None]), e["labels"][None])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            expected[n] += g**2 / len(examples)
    assert_scores_close(scores, expected)


def test_padded_hf_bert_is_vectorised_and_exact(tiny_bert, way):
    """Padded batches through HF BERT take each vectorised way (layer by layer; vmap with a 4D mask built
    inside it) and equal each example run alone."""
    examples = make_examples()
    scores = fisher_information(tiny_bert, loader(examples), per_example=True, progress=False)
    assert_scores_close(scores, brute_force_per_example(tiny_bert, examples, scored_params(tiny_bert)))


def test_the_probe_finds_each_models_own_mask(tiny_bert):
    from childtune.fisher.per_example import _probe_mask

    rows = pad_collate(make_examples(lengths=[5, 2, 7]))
    labels = rows.pop("labels")
    assert _probe_mask(tiny_bert.eval(), rows, labels) is False  # bidirectional
    llama = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, pad_token_id=0)).eval()
    assert _probe_mask(llama, {k: v for k, v in rows.items() if k != "token_type_ids"}, labels) is True  # causal
    assert _probe_mask(MaskedMeanPool(), rows, labels) is None  # reads the 2D mask itself


def test_vmap_and_loop_fallback_agree_on_bert(tiny_bert, monkeypatch):
    monkeypatch.setattr(per_example, "ORDER", ("vmap", "loop"))
    # Without an attention mask HF BERT vectorises; the wrapper's `if` forces the per-example loop.
    batches = [{k: v for k, v in pad_collate(make_examples(lengths=[6] * 4, seed=s)).items()
                if k != "attention_mask"} for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmapFallbackWarning)
        vmapped = fisher_information(tiny_bert, batches, per_example=True, progress=False)
    with pytest.warns(VmapFallbackWarning, match="one example at a time"):
        looped = fisher_information(Fussy(tiny_bert), batches, per_example=True, progress=False)
    assert_scores_close({n.removeprefix("inner."): s for n, s in looped.items()}, vmapped)


def test_loop_fallback_on_masked_model_matches_vmap(monkeypatch):
    monkeypatch.setattr(per_example, "ORDER", ("vmap", "loop"))
    data = loader(make_examples())
    vmapped = fisher_information(MaskedMeanPool(), data, per_example=True, progress=False)
    with pytest.warns(VmapFallbackWarning):
        looped = fisher_information(Fussy(MaskedMeanPool()), data, per_example=True, progress=False)
    assert_scores_close({n.removeprefix("inner."): s for n, s in looped.items()}, vmapped)


def test_num_samples_truncates_and_stops_reading(tiny_bert):
    examples = make_examples()
    batches = list(loader(examples))

    def only_two_batches():
        yield batches[0]
        yield batches[1]
        raise AssertionError("read past the examples asked for")

    params = scored_params(tiny_bert)
    per_example = quiet(fisher_information, tiny_bert, only_two_batches(), num_samples=4, per_example=True)
    assert_scores_close(per_example, brute_force_per_example(tiny_bert, examples[:4], params))
    authors = fisher_information(tiny_bert, only_two_batches(), num_samples=4, progress=False)
    truncated = {k: v[:1] for k, v in batches[1].items()}
    assert_scores_close(authors, brute_force_batches(tiny_bert, [batches[0], truncated], params))
    # Exactly one full batch: the second is never requested.
    fisher_information(tiny_bert, iter([batches[0]]), num_samples=3, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        fisher_information(tiny_bert, batches, num_samples=0, progress=False)


def test_default_scores_only_encoder_layers(tiny_bert):
    scores = fisher_information(tiny_bert, loader(make_examples()), progress=False)
    names = [n for n, _ in tiny_bert.named_parameters()]
    assert list(scores) == [n for n in names if ".encoder.layer." in n]
    assert not [n for n in scores if "embeddings" in n or "pooler" in n or "classifier" in n]
    params = dict(tiny_bert.named_parameters())
    for n, s in scores.items():
        assert s.dtype == torch.float32 and s.shape == params[n].shape and s.device == params[n].device
        assert (s >= 0).all()
    assert any(s.sum() > 0 for s in scores.values())


def test_scored_by_names_or_predicate(tiny_bert):
    data = loader(make_examples())
    chosen = ["classifier.weight", "bert.encoder.layer.1.attention.self.query.weight"]
    by_name = fisher_information(tiny_bert, data, scored=chosen, progress=False)
    assert list(by_name) == ["bert.encoder.layer.1.attention.self.query.weight", "classifier.weight"]
    by_predicate = fisher_information(tiny_bert, data, scored=lambda n: n in chosen, progress=False)
    assert_scores_close(by_predicate, by_name)
    # Fisher scores of a parameter do not depend on which other parameters are scored alongside it.
    full = fisher_information(tiny_bert, data, scored=lambda n: True, progress=False)
    assert_scores_close(by_name, {n: full[n] for n in by_name})
    with pytest.raises(ValueError, match="not parameters"):
        fisher_information(tiny_bert, data, scored=["no.such.weight"], progress=False)


def test_frozen_parameters_are_not_scored(tiny_bert):
    frozen = "bert.encoder.layer.0.attention.self.query.weight"
    tiny_bert.get_parameter(frozen).requires_grad_(False)
    scores = fisher_information(tiny_bert, loader(make_examples()), progress=False)
    assert frozen not in scores and "bert.encoder.layer.0.attention.self.key.weight" in scores
    with pytest.raises(ValueError, match="do not require grad"):
        fisher_information(tiny_bert, loader(make_examples()), scored=[frozen], progress=False)


@pytest.mark.parametrize("by_example", [False, True])
def test_regression_uses_gaussian_log_likelihood(by_example):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=1))
    examples = make_examples(regression=True)
    data = loader(examples)
    scores = quiet(fisher_information, model, data, per_example=by_example)
    params = scored_params(model)
    if by_example:
        expected = brute_force_per_example(model, examples, params)
    else:
        expected = brute_force_batches(model, list(data), params)
    assert_scores_close(scores, expected)


@pytest.mark.parametrize("by_example", [False, True])
def test_grads_and_training_modes_untouched(by_example):
    torch.manual_seed(0)
    config = tiny_bert_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.5
    model = BertForSequenceClassification(config)
    data = loader(make_examples())
    expected = quiet(fisher_information, model.eval(), data, per_example=by_example)

    model.train()
    model.bert.pooler.eval()  # a mixed state must come back exactly, not as a blanket train()/eval()
    before = {m: m.training for m in model.modules()}
    params = dict(model.named_parameters())
    params["bert.encoder.layer.0.output.dense.weight"].grad = torch.full_like(
        params["bert.encoder.layer.0.output.dense.weight"], 3.0)
    params["classifier.bias"].grad = torch.ones(2)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}

    # Dropout at 0.5 would change every score if estimation ran in training mode.
    assert_scores_close(quiet(fisher_information, model, data, per_example=by_example), expected)
    assert {m: m.training for m in model.modules()} == before
    for n, p in params.items():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n


def test_missing_labels_is_an_error(tiny_bert):
    batch = pad_collate(make_examples())
    del batch["labels"]
    with pytest.raises(ValueError, match="yields no labels; Fisher information needs them"):
        fisher_information(tiny_bert, [batch], progress=False)


def test_empty_data_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match="no examples"):
        fisher_information(tiny_bert, [], progress=False)


@pytest.mark.parametrize("scored", [lambda n: False, []], ids=["predicate", "names"])
def test_nothing_scored_is_an_error(tiny_bert, scored):
    with pytest.raises(ValueError, match="no parameter elements to score"):
        fisher_information(tiny_bert, loader(make_examples()), scored=scored, progress=False)


def test_all_frozen_model_scores_nothing(tiny_bert):
    for p in tiny_bert.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter elements to score"):
        fisher_information(tiny_bert, loader(make_examples()), progress=False)


def test_progress_bar_can_be_silenced(tiny_bert, capsys):
    data = loader(make_examples())
    fisher_information(tiny_bert, data, progress=False)
    assert capsys.readouterr().err == ""
    fisher_information(tiny_bert, data, progress=True)
    assert "8/8" in capsys.readouterr().err


def _rank_main(rank: int, store: str, model, shards, out: str) -> None:
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerExampleFallbackWarning)
            result = {
                mode: fisher_information(model, shards[rank], per_example=mode, progress=False)
                for mode in (False, True)
            }
        torch.save(result, out)
        torch.distributed.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


@pytest.mark.skipif(not torch.distributed.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed and fork-started processes")
def test_distributed_ranks_agree_with_one_process_on_all_data(tiny_bert, tmp_path):
    batches = list(loader(make_examples()))
    shards = [[batches[0], batches[2]], [batches[1]]]  # uneven on purpose: 5 and 3 examples
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, tmp_path / "store", tiny_bert, shards, tmp_path / f"{r}.pt"))
             for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, "a rank failed or hung (its traceback is in the captured stderr)"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for by_example in (False, True):
        single = quiet(fisher_information, tiny_bert, batches, per_example=by_example)
        for r in range(2):
            assert_scores_close(torch.load(tmp_path / f"{r}.pt")[by_example], single)


def test_per_example_clip_bounds_each_examples_tensor_gradient(tiny_bert, way):
    examples = make_examples()
    params = scored_params(tiny_bert)
    each = []
    for e in examples:
        logits = tiny_bert(input_ids=e["input_ids"][None]).logits
        each.append(torch.autograd.grad(neg_log_likelihood(logits, e["labels"][None])[0], list(params.values())))
    clip = float(torch.tensor([float(g.norm()) for grads in each for g in grads]).median())  # half of them bite
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for grads in each:
        for n, g in zip(params, grads, strict=True):
            expected[n] += (g * min(1.0, clip / (float(g.norm()) + 1e-6))) ** 2 / len(examples)
    got = fisher_information(tiny_bert, loader(examples), per_example=True, clip=clip, progress=False)
    assert_scores_close(got, expected)
    unclipped = fisher_information(tiny_bert, loader(examples), per_example=True, progress=False)
    assert any(not torch.allclose(got[n], unclipped[n]) for n in got)


class Pooled(nn.Module):
    """A small model whose layers can be arranged to defeat the by-layer way, or to test its edge cases."""

    def __init__(self, arrangement: str):
        super().__init__()
        torch.manual_seed(0)
        self.arrangement = arrangement
        self.embed = nn.Embedding(64, 8)
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)
        if arrangement == "tied":
            self.second.weight = self.first.weight
        if arrangement == "two inputs":
            self.gate = Gate()

    def forward(self, input_ids, attention_mask, **unused):
        h = torch.tanh(self.first(self.embed(input_ids)))
        if self.arrangement == "reused":  # one module called twice: its per-example gradient sums both calls
            h = torch.tanh(self.first(h))
        if self.arrangement == "mixing":  # examples interact: each sees the batch's mean
            h = h + h.mean(0, keepdim=True)
        if self.arrangement == "two inputs":
            h = self.gate(h, attention_mask)
        h = self.norm(torch.tanh(self.second(h)))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


class Gate(nn.Module):
    """A module holding a parameter and called with two tensors, which the by-layer way cannot take."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, h, mask):
        return h * self.scale * mask.unsqueeze(-1)


def each_alone(model, examples) -> dict[str, torch.Tensor]:
    """Each example as a batch of its own (its own length, no padding): mean of squared gradients."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for e in examples:
        ids = e["input_ids"][None]
        logits = model(ids, torch.ones_like(ids))
        grads = torch.autograd.grad(neg_log_likelihood(logits, e["labels"][None])[0], list(params.values()),
                                    allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                total[n] += g**2 / len(examples)
    return total


def test_by_layer_way_sums_a_reused_modules_calls_and_takes_any_small_module(way):
    model, examples = Pooled("reused"), make_examples()
    got = fisher_information(model, loader(examples), scored=lambda n: True, per_example=True, progress=False)
    assert_scores_close(got, each_alone(model, examples))


@pytest.mark.parametrize("arrangement,why", [("tied", "shared by"), ("mixing", "differs from its examples. own"),
                                             ("two inputs", "other than one tensor")])
def test_models_the_by_layer_way_cannot_take_fall_back_exactly(arrangement, why):
    model, examples = Pooled(arrangement), make_examples()
    with pytest.warns(PerExampleFallbackWarning, match=why) as caught:
        got = fisher_information(model, loader(examples), scored=lambda n: True, per_example=True, progress=False)
    assert not [w for w in caught if issubclass(w.category, VmapFallbackWarning)]  # vmap took them
    assert_scores_close(got, each_alone(model, examples))


def test_each_gradient_is_squared_and_freed_before_the_next_is_accumulated(tiny_bert):
    """The per-batch pass never holds the scored weights' dense gradients together: when backward has
    accumulated any one of them, no other scored weight has a gradient."""
    params = scored_params(tiny_bert)
    alive = []
    for p in params.values():  # registered first, so each runs before the pass's own hook frees the gradient
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params.values())))
    fisher_information(tiny_bert, loader(make_examples()), progress=False)
    assert len(alive) == 3 * len(params) and set(alive) == {1}  # 3 batches, each weight's gradient alone


def dropout_bert(layers: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_bert_config()
    config.num_hidden_layers, config.hidden_dropout_prob = layers, 0.3
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("by_example", [False, True])
def test_passes_score_groups_of_whole_blocks_as_one_pass_does(by_example):
    """Three passes over a shuffling DataLoader in train mode: each group is whole blocks, and every score
    is the one pass's, because each pass starts from the same random state (dropout, the shuffle). Per
    example the blocks alone are scored: embeddings leave the by-layer way, and the slower ways draw dropout
    per example, so a group without them would not draw as a pass with them does."""
    model = dropout_bert()
    data = DataLoader(make_examples(), batch_size=3, shuffle=True, collate_fn=pad_collate)
    # per batch, everything but the head's bias: the embeddings and pooler are a block of their own
    scored = in_layer if by_example else (lambda n: n != "classifier.bias")
    torch.manual_seed(5)
    one = quiet(fisher_information, model, data, scored=scored, per_example=by_example, train_mode=True)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerExampleFallbackWarning)
        parts = list(fisher_in_passes(model, data, 3, scored=scored, per_example=by_example, train_mode=True,
                                      progress=False))
    assert len(parts) == 3
    blocks = [{layer_index(n) for n in part} for part in parts]
    assert sorted(b for bs in blocks for b in bs if b is not None) == [0, 1, 2, 3]  # each block in one part
    assert all(blocks)
    merged = {n: s for part in parts for n, s in part.items()}
    assert sorted(merged) == sorted(one)
    assert_scores_close({n: merged[n] for n in one}, one)


def test_passes_refuse_batches_that_do_not_repeat(tiny_bert):
    examples = make_examples()
    with pytest.raises(ValueError, match="one-shot iterator"):
        list(fisher_in_passes(tiny_bert, iter(loader(examples)), 2, progress=False))
    reshuffled = DataLoader(examples, batch_size=3, shuffle=True, collate_fn=pad_collate,
                            generator=torch.Generator().manual_seed(0))  # its own generator: a new order each pass
    with pytest.raises(ValueError, match="read different batches"):
        list(fisher_in_passes(tiny_bert, reshuffled, 2, progress=False))
    for passes in (0, 3, 1.0):  # tiny_bert scores two blocks
        with pytest.raises(ValueError, match="passes must be"):
            list(fisher_in_passes(tiny_bert, loader(examples), passes, progress=False))
