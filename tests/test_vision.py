"""The pretrained CRNN (`childtune.models.crnn`): CTC decoding by hand, an image classifier on it that a
strict child network trains like a text classifier, and the real checkpoint reading MNIST digits."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from childtune import ChildTuningD
from childtune.models.crnn import CHARACTERS, CRNNClassifier, greedy_ctc, load_crnn
from childtune.optim import SparseChildAdamW


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    def column(c: str | None) -> torch.Tensor:
        logits = torch.zeros(len(CHARACTERS) + 1)
        logits[0 if c is None else CHARACTERS.index(c) + 1] = 5.0
        return logits

    path = ["7", "7", None, "7", "a", None, None]  # 7 7 _ 7 a _ _ -> "77a"
    logits = torch.stack([column(c) for c in path])[None]
    assert greedy_ctc(logits) == ["77a"]
    assert greedy_ctc(logits, "0123456789") == ["77"]  # "a" not allowed: its column is blank among the rest


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is which half is darker: learnable from the pixels alone."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 48, generator=g) * 2 - 1
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 1, :, :, :24] -= 0.8
    x[y == 0, :, :, 24:] -= 0.8
    return x.clamp(-1, 1), y


def test_a_strict_child_network_trains_the_image_classifier_and_nothing_else():
    torch.manual_seed(0)
    model = CRNNClassifier(2)  # random weights: the same module the checkpoint loads into
    x, y = images(32, 0)
    batches = [{"pixel_values": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 32, 8)]
    strategy = ChildTuningD(0.05, rest="freeze")
    optimizer = SparseChildAdamW(model.named_parameters(), strategy, lr=3e-3)
    strategy.prepare(model, batches, progress=False)
    chosen = strategy.dense(strategy.chosen)
    scored = {n for n in chosen if chosen[n].numel()}
    assert any(".ConvNet." in n for n in scored) and any(".SequenceModeling." in n for n in scored)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    losses = []
    for _ in range(6):
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses  # it learns
    for name, param in model.named_parameters():
        moved = param.detach() != before[name]
        if name.startswith("classifier"):
            assert moved.any(), name  # the new head trains whole
        else:
            assert not (moved & ~chosen[name]).any(), name  # nothing outside the child network moves


def mnist(n: int) -> tuple[torch.Tensor, list[int]]:
    from childtune.data.assets import file_path

    with gzip.open(file_path("mnist-5k")) as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    rows = rows[np.random.RandomState(0).permutation(len(rows))[:n]]  # the file is sorted by class
    return torch.tensor(rows[:, :-1]).view(-1, 1, 28, 28) / 255.0, rows[:, -1].astype(int).tolist()


def test_the_pretrained_recogniser_reads_mnist_digits_untrained():
    """The pinned checkpoint loads into the module with every key matched (strict), and reads handwritten
    digits it was never trained on: dark on white at its 64-pixel height, decoding limited to 0-9."""
    x, labels = mnist(200)
    page = F.pad(F.interpolate(1 - x, size=(64, 64), mode="bilinear", align_corners=False), (16, 16), value=1.0)
    with torch.no_grad():
        read = greedy_ctc(load_crnn()(page * 2 - 1), "0123456789")
    accuracy = np.mean([r == str(t) for r, t in zip(read, labels, strict=True)])
    assert accuracy >= 0.75, accuracy  # 0.84 on 300 of them when written


def test_the_classifier_takes_the_checkpoints_weights_and_drops_its_ctc_head():
    crnn = load_crnn()
    model = CRNNClassifier(10, crnn)
    names = dict(model.named_parameters())
    assert not any("Prediction" in n for n in names) and names["classifier.weight"].shape == (10, 256)
    assert torch.equal(names["crnn.FeatureExtraction.ConvNet.0.weight"], crnn.FeatureExtraction.ConvNet[0].weight)
    assert sum(p.numel() for p in names.values()) == pytest.approx(3_781_345 - 97 * 257 + 10 * 257)
