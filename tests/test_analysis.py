"""Child-network analysis on hand-made masks whose shares and overlaps are known exactly."""

from __future__ import annotations

import csv

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy.spatial.distance import jaccard as scipy_jaccard_distance

from childtune.masks import save_masks
from childtune.study.analysis import (
    analyze,
    chance_jaccard,
    jaccard,
    layer_share,
    load_masks,
    overlap_matrix,
    part_share,
    type_share,
)

SHAPES = {
    "bert.embeddings.word_embeddings.weight": (2, 5),
    "bert.encoder.layer.0.attention.self.query.weight": (4, 5),
    "bert.encoder.layer.0.intermediate.dense.weight": (4, 5),
    "bert.encoder.layer.0.output.LayerNorm.weight": (5,),
    "bert.encoder.layer.1.attention.output.dense.weight": (4, 5),
    "bert.pooler.dense.weight": (2, 5),
    "classifier.weight": (2, 2),
}
CHOSEN = {  # how many leading elements of each tensor are in the child network
    "bert.embeddings.word_embeddings.weight": 2,
    "bert.encoder.layer.0.attention.self.query.weight": 10,
    "bert.encoder.layer.0.intermediate.dense.weight": 0,
    "bert.encoder.layer.0.output.LayerNorm.weight": 5,
    "bert.encoder.layer.1.attention.output.dense.weight": 3,
    "bert.pooler.dense.weight": 0,
    "classifier.weight": 4,
}


def leading(chosen: dict[str, int], offset: int = 0) -> dict[str, torch.Tensor]:
    """Masks choosing elements offset .. offset+k-1 (flattened) of each tensor."""
    out = {}
    for name, shape in SHAPES.items():
        flat = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
        flat[offset : offset + chosen[name]] = True
        out[name] = flat.view(shape)
    return out


def table(rows):
    return {s.group: (s.chosen, s.total, s.density, s.share) for s in rows}


def test_layer_share_counts_each_block_and_leaves_the_head_out():
    got = table(layer_share(leading(CHOSEN)))
    assert list(got) == ["embeddings", "layer 0", "layer 1", "top"]
    assert got["embeddings"] == (2, 10, 0.2, 0.1)
    assert got["layer 0"] == (15, 45, pytest.approx(1 / 3), 0.75)
    assert got["layer 1"] == (3, 20, 0.15, pytest.approx(0.15))
    assert got["top"] == (0, 10, 0.0, 0.0)


def test_layer_share_with_head_included_and_sorted_names():
    masks = dict(sorted(leading(CHOSEN).items(), reverse=True))  # order must not matter
    got = table(layer_share(masks, exclude=()))
    assert list(got) == ["embeddings", "layer 0", "layer 1", "top"]
    assert got["top"] == (4, 14, pytest.approx(4 / 14), pytest.approx(4 / 24))


def test_a_model_of_parts_is_analysed_part_by_part(tmp_path):
    """The vision-language model: its towers' blocks are labelled by part (their indices are different
    stacks), and a table says how much of the child network each tower holds; the connector is left out."""
    masks = {
        "vision.FeatureExtraction.ConvNet.0.weight": torch.tensor([True, True, False, False]),
        "vision.SequenceModeling.1.linear.weight": torch.tensor([True, False]),
        "connector.0.weight": torch.tensor([True, True]),
        "language.model.embed_tokens.weight": torch.tensor([False, False, False, False]),
        "language.model.layers.0.self_attn.q_proj.weight": torch.tensor([True, False, False, False, False, False]),
    }
    assert table(part_share(masks)) == {"vision": (3, 6, 0.5, 0.75), "language": (1, 10, 0.1, 0.25)}
    assert list(table(layer_share(masks))) == ["embeddings", "language.layers 0", "vision.ConvNet 0",
                                               "vision.SequenceModeling 1"]
    vision_only = {n: m for n, m in masks.items() if n.startswith("vision.")}
    assert list(table(layer_share(vision_only))) == ["layer 0", "layer 1"]  # alone: one part, plain labels
    paths = analyze({"joint": masks, "vision": vision_only}, tmp_path / "both")  # together: one labelling
    assert "| vision | 50.0 (100.0) |  |" in paths["analysis"].read_text()
    assert "vision.SequenceModeling 1" in paths["layer_share"].read_text() and ",layer 1," not in paths[
        "layer_share"].read_text()
    text = analyze({"joint": masks}, tmp_path)["analysis"].read_text()
    assert "## Per part" in text and "| joint | 50.0 (75.0) | 10.0 (25.0) |" in text
    assert "## Per part" not in analyze({"bert": leading(CHOSEN)}, tmp_path / "plain")["analysis"].read_text()


def test_type_share_by_parameter_role():
    got = table(type_share(leading(CHOSEN)))
    assert list(got) == ["embedding", "attention", "ffn", "layernorm", "head"]
    assert got["embedding"][:2] == (2, 10)
    assert got["attention"][:2] == (13, 40)
    assert got["ffn"][:2] == (0, 20)
    assert got["layernorm"][:2] == (5, 5)
    assert got["head"][:2] == (0, 10)  # the pooler; the classifier is excluded
    assert sum(v[3] for v in got.values()) == pytest.approx(1.0)


def test_jaccard_exact_and_against_scipy():
    a = leading(CHOSEN)
    b = leading(CHOSEN, offset=1)  # each tensor's window shifted by one element
    # per tensor with k chosen (k >= 1, window fits): intersection k-1, union k+1
    inter = sum(k - 1 for n, k in CHOSEN.items() if k and n != "classifier.weight")
    union = sum(k + 1 for n, k in CHOSEN.items() if k and n != "classifier.weight")
    # the LayerNorm tensor has 5 elements and k=5: the shifted window is cut to 4, all inside a
    union -= 1
    assert jaccard(a, b) == pytest.approx(inter / union)
    kept = [n for n in SHAPES if n != "classifier.weight"]
    va = torch.cat([a[n].reshape(-1) for n in kept]).numpy()
    vb = torch.cat([b[n].reshape(-1) for n in kept]).numpy()
    assert jaccard(a, b) == pytest.approx(1 - scipy_jaccard_distance(va, vb))
    assert jaccard(a, a) == 1.0


def test_jaccard_missing_names_count_as_unchosen_and_empty_sets_are_identical():
    a = {"layer.0.w": torch.tensor([True, True, False, False])}
    b = {"layer.0.w": torch.tensor([True, False, False, False]), "layer.1.w": torch.tensor([True, True])}
    assert jaccard(a, b) == pytest.approx(1 / 4)
    empty = {"layer.0.w": torch.zeros(4, dtype=torch.bool)}
    assert jaccard(empty, empty) == 1.0
    assert jaccard(empty, a) == 0.0


def test_jaccard_refuses_masks_of_different_models():
    with pytest.raises(ValueError, match="different models"):
        jaccard({"layer.0.w": torch.ones(3, dtype=torch.bool)}, {"layer.0.w": torch.ones(4, dtype=torch.bool)})


def test_chance_jaccard_matches_random_child_networks():
    shapes = {"layer.0.w": 4000, "layer.1.w": 6000}
    a = {n: torch.arange(s) < s // 5 for n, s in shapes.items()}  # 20% of each tensor
    b = {"layer.0.w": torch.arange(4000) < 2000, "layer.1.w": torch.arange(6000) < 600}  # 50% and 10%
    inter = 800 * 2000 / 4000 + 1200 * 600 / 6000
    assert chance_jaccard(a, b) == pytest.approx(inter / (2000 + 2600 - inter))
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(200):
        ra = {n: m[torch.randperm(m.numel(), generator=g)] for n, m in a.items()}
        rb = {n: m[torch.randperm(m.numel(), generator=g)] for n, m in b.items()}
        draws.append(jaccard(ra, rb))
    assert np.mean(draws) == pytest.approx(chance_jaccard(a, b), abs=2e-3)


def test_overlap_matrix_is_symmetric_with_unit_diagonal():
    named = {"x": leading(CHOSEN), "y": leading(CHOSEN, offset=1), "z": leading(CHOSEN, offset=2)}
    overlap = overlap_matrix(named)
    assert overlap.labels == ("x", "y", "z")
    np.testing.assert_allclose(overlap.values, overlap.values.T)
    np.testing.assert_allclose(np.diag(overlap.values), 1.0)
    assert overlap.values[0, 1] == pytest.approx(jaccard(named["x"], named["y"]))
    assert overlap.values[0, 2] < overlap.values[0, 1]
    assert overlap.chance[1, 2] == pytest.approx(chance_jaccard(named["y"], named["z"]))


def test_masks_round_trip_and_are_validated(tmp_path):
    masks = leading(CHOSEN)
    path = save_masks(masks, tmp_path / "run" / "masks.safetensors")
    for source in (path, tmp_path / "run"):  # the file, or the run directory holding it
        loaded = load_masks(source)
        assert loaded.keys() == masks.keys()
        assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    from safetensors.torch import save_file

    save_file({"layer.0.w": torch.tensor([0, 1, 1], dtype=torch.uint8)}, str(tmp_path / "ints.safetensors"))
    assert load_masks(tmp_path / "ints.safetensors")["layer.0.w"].tolist() == [False, True, True]
    save_file({"layer.0.w": torch.tensor([0.2, 0.9])}, str(tmp_path / "scores.safetensors"))
    with pytest.raises(ValueError, match="not a mask"):
        load_masks(tmp_path / "scores.safetensors")
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "nothing")


def test_analyze_writes_tables_and_readable_pngs(tmp_path, tiny_bert):
    names = [n for n, _ in tiny_bert.named_parameters()]
    params = dict(tiny_bert.named_parameters())
    g = torch.Generator().manual_seed(1)
    top_heavy = {n: torch.rand(params[n].shape, generator=g) < (0.6 if ".layer.1." in n else 0.05) for n in names}
    uniform = {n: torch.rand(params[n].shape, generator=g) < 0.2 for n in names}
    save_masks(uniform, tmp_path / "uniform.safetensors")
    paths = analyze({"top-heavy": top_heavy, "uniform": tmp_path / "uniform.safetensors"}, tmp_path / "out")
    assert set(paths) == {"layer_share", "type_share", "overlap", "layer_share_png", "overlap_png", "analysis"}
    assert all(p.is_file() for p in paths.values())
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind
    with paths["layer_share"].open() as f:
        rows = {(r["child_network"], r["group"]): float(r["density"]) for r in csv.DictReader(f)}
    assert rows[("top-heavy", "layer 1")] == pytest.approx(0.6, abs=0.1)
    assert rows[("top-heavy", "layer 0")] == pytest.approx(0.05, abs=0.05)
    with paths["overlap"].open() as f:
        (pair,) = list(csv.DictReader(f))
    assert float(pair["jaccard"]) == pytest.approx(jaccard(top_heavy, uniform))
    for key in ("layer_share_png", "overlap_png"):
        image = matplotlib.image.imread(paths[key])
        assert image.shape[0] > 200 and image.shape[1] > 300
    text = paths["analysis"].read_text()
    assert "| top-heavy |" in text and "layer 1" in text and "chance" in text


def test_analyze_single_network_has_no_overlap(tmp_path):
    paths = analyze({"only": leading(CHOSEN)}, tmp_path)
    assert "overlap" not in paths and "overlap_png" not in paths
    assert "## Overlap" not in paths["analysis"].read_text()


def test_masks_from_a_sparse_delta_are_the_changed_elements_in_the_whole_model(tmp_path, tiny_bert):
    from childtune.delta import SparseDelta

    tiny_bert.save_pretrained(tmp_path / "base")  # the base model, so unchanged tensors can be counted
    base = {n: t.detach().clone() for n, t in tiny_bert.state_dict().items()}
    name = "bert.encoder.layer.1.attention.self.query.weight"
    changed = torch.zeros_like(base[name], dtype=torch.bool)
    changed[0, :3] = True
    changed[5, 7] = True
    with torch.no_grad():
        tiny_bert.get_parameter(name).add_(changed.float() * 0.5)
        tiny_bert.classifier.weight.add_(1.0)  # the head is stored dense and left out of the child network
    delta = SparseDelta.from_training(base, tiny_bert, method="child-d", base_model=str(tmp_path / "base"))
    delta.save(tmp_path / "run" / "delta")
    for source in (tmp_path / "run", tmp_path / "run" / "delta", tmp_path / "run" / "delta" / "delta.safetensors"):
        masks = load_masks(source)
        assert set(masks) == {n for n in base if not n.startswith("classifier")}
        assert torch.equal(masks[name], changed)
        assert sum(int(m.sum()) for m in masks.values()) == 4
    shares = {s.group: s for s in layer_share(masks)}
    layer_size = sum(p.numel() for n, p in tiny_bert.named_parameters() if ".layer.1." in n)
    assert (shares["layer 1"].chosen, shares["layer 1"].total) == (4, layer_size)
    assert shares["layer 0"].chosen == 0 and shares["embeddings"].total > 0


def test_delta_without_its_base_model_warns_and_counts_changed_tensors_only(tmp_path, tiny_bert):
    from childtune.delta import SparseDelta

    base = {n: t.detach().clone() for n, t in tiny_bert.state_dict().items()}
    with torch.no_grad():
        tiny_bert.bert.pooler.dense.bias.add_(1.0)
    SparseDelta.from_training(base, tiny_bert, method="x", base_model=str(tmp_path / "gone")).save(tmp_path / "d")
    with pytest.warns(UserWarning, match="not found"):
        masks = load_masks(tmp_path / "d")
    assert list(masks) == ["bert.pooler.dense.bias"] and bool(masks["bert.pooler.dense.bias"].all())
