"""The pretrained CRNN (`childtune.models.crnn`): CTC decoding by hand, an image classifier on it that a
strict child network trains like a text classifier, and the real checkpoint reading MNIST digits."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from childtune import ChildTuningD
from childtune.cli import main
from childtune.data import assets
from childtune.data import images as images_module
from childtune.data.batching import ImageCollate
from childtune.data.tasks import load_task
from childtune.data.types import DataError, Image
from childtune.data.userfiles import load_files
from childtune.models.crnn import (
    CHARACTERS,
    CRNNConfig,
    CRNNForImageClassification,
    CRNNImageProcessor,
    greedy_ctc,
    load_crnn,
)
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


def tiny_crnn(num_labels: int = 2) -> CRNNForImageClassification:
    torch.manual_seed(0)
    return CRNNForImageClassification(CRNNConfig(num_labels=num_labels))  # random: the module the checkpoint loads into


def test_a_strict_child_network_trains_the_image_classifier_and_nothing_else():
    model = tiny_crnn()
    x, y = images(32, 0)
    batches = [{"pixel_values": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 32, 8)]
    strategy = ChildTuningD(0.05, rest="freeze")
    optimizer = SparseChildAdamW(model.named_parameters(), strategy, lr=3e-3)
    strategy.prepare(model, batches, progress=False)
    chosen = strategy.dense(strategy.chosen)
    scored = {n for n in chosen if chosen[n].numel()}
    assert any(".ConvNet." in n for n in scored) and any(".SequenceModeling." in n for n in scored)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
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
    # BatchNorm keeps its statistics in training mode: a delta of the parameters rebuilds the model whole
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


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
    import transformers

    from childtune.data.assets import model_path

    crnn = load_crnn()
    model = transformers.AutoModelForImageClassification.from_pretrained(model_path("easyocr-crnn"), num_labels=10)
    assert isinstance(model, CRNNForImageClassification)
    names = dict(model.named_parameters())
    assert not any("Prediction" in n for n in names) and names["classifier.weight"].shape == (10, 256)
    assert torch.equal(names["crnn.FeatureExtraction.ConvNet.0.weight"], crnn.FeatureExtraction.ConvNet[0].weight)
    assert sum(p.numel() for p in names.values()) == pytest.approx(3_781_345 - 97 * 257 + 10 * 257)
    for name, buffer in model.named_buffers():  # BatchNorm's statistics come from the checkpoint too
        assert torch.equal(buffer, dict(crnn.named_buffers())[name.removeprefix("crnn.")]), name


# ---------------------------------------------------------------------------------------------- images


def gray(rows: list[list[int]]) -> Image:
    return Image(bytes(v for row in rows for v in row), len(rows), len(rows[0]))


def test_the_processor_sizes_inverts_pads_and_scales_by_hand():
    processor = CRNNImageProcessor(height=4, margin=1, max_width=100)
    dark = gray([[0] * 4, [0, 255, 255, 0], [0, 255, 255, 0], [0] * 4])  # white ink, black border: inverted
    light = gray([[255] * 4, [255, 0, 0, 255], [255, 0, 0, 255], [255] * 4])  # already dark on light
    batch = processor([dark, light])
    assert batch.shape == (2, 1, 4, 1 + 4 + 1)  # height 4 (no resizing here), a margin each side
    assert torch.equal(batch[0], batch[1])  # the dark one inverted is the light one
    expected = torch.ones(4, 6)
    expected[1:3, 2:4] = -1  # ink at -1, paper (and the margins) at 1
    assert torch.equal(batch[1, 0], expected)
    rgb = Image(bytes([255, 0, 0] * 4), 2, 2, channels=3)  # pure red: luminance 0.299 of white, so inverted
    assert torch.allclose(processor([rgb])[0, 0, :, 1:-1], torch.full((4, 4), (1 - 0.299) * 2 - 1), atol=1e-4)


def test_the_processor_keeps_aspect_pads_a_batch_with_paper_and_saves_its_settings(tmp_path):
    processor = CRNNImageProcessor(height=8, margin=2, max_width=12)
    wide, small, huge = (gray([[255] * w] * h) for h, w in ((4, 8), (8, 4), (2, 40)))
    batch = processor([wide, small, huge])
    assert batch.shape == (3, 1, 8, 2 + 12 + 2)  # widths 16 -> capped at 12, 4, 160 -> 12
    assert torch.all(batch[1, 0, :, 2 + 4:] == 1)  # the narrow one padded with paper on the right
    processor.save_pretrained(tmp_path)
    assert CRNNImageProcessor.from_pretrained(tmp_path) == processor
    assert CRNNImageProcessor.from_pretrained(tmp_path / "nothing-here") == CRNNImageProcessor()
    (tmp_path / CRNNImageProcessor.FILE).write_text('{"processor": "easyocr-crnn", "height": "64"}')
    with pytest.raises(ValueError, match="integers"):
        CRNNImageProcessor.from_pretrained(tmp_path)


def test_image_batches_carry_pixels_and_labels_and_refuse_text():
    collate = ImageCollate(CRNNImageProcessor())
    batch = collate([(gray([[0] * 28] * 28), 3), (gray([[9] * 28] * 28), 7)])
    assert batch["pixel_values"].shape == (2, 1, 64, 96) and batch["labels"].tolist() == [3, 7]
    with pytest.raises(DataError, match="text examples"):
        collate([("a sentence", 1)])


def test_an_image_checks_its_size():
    with pytest.raises(DataError, match="holds 4 bytes"):
        Image(bytes(5), 2, 2)
    with pytest.raises(DataError, match="1 or 3 channels"):
        Image(bytes(8), 2, 2, channels=2)


def idx(shape: tuple[int, ...], values: bytes) -> bytes:
    return b"\0\0\x08" + bytes([len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape) + values


def test_idx_files_read_by_hand():
    shape, payload = images_module._idx(idx((2, 2, 3), bytes(range(12))), "x")
    assert shape == [2, 2, 3] and payload == bytes(range(12))
    with pytest.raises(DataError, match="holds 11 bytes"):
        images_module._idx(idx((2, 2, 3), bytes(11)), "x")
    with pytest.raises(DataError, match="not an idx file"):
        images_module._idx(b"\0\0\x0d\x01", "x")


def deb(files: dict[str, bytes]) -> bytes:
    """A Debian package by hand: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    def tar(members: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:xz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return out.getvalue()

    entries = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar({"control": b"Package: x\n"})),
               ("data.tar.xz", tar(files))]
    body = b"".join(f"{name:<16}{0:<12}{0:<6}{0:<6}{644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
                    for name, data in entries)
    return b"!<arch>\n" + body


def test_a_debian_packages_files_are_read_without_dpkg(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    package = deb({"usr/share/a.txt": b"odd", "usr/share/b.bin": b"even"})
    asset = assets.Asset("x", "debian", "x", "1", "deb", "x_1_all.deb", hashlib.sha256(package).hexdigest())
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / asset.filename).write_bytes(package)
    assert assets.deb_files(asset, ("usr/share/a.txt", "usr/share/b.bin")) == {
        "usr/share/a.txt": b"odd", "usr/share/b.bin": b"even"}
    with pytest.raises(assets.AssetError, match="usr/share/c is not a file"):
        assets.deb_files(asset, ("usr/share/c",))


def test_an_unreachable_debian_package_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get
    with pytest.raises(assets.AssetError, match=r"apt-get.*not installed.*the `mnist` task"):
        assets.fetch("fashion-mnist")


def write_folder(root: Path, classes: dict[str, int], size: int = 12) -> Path:
    from PIL import Image as Pillow

    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for k in range(count):
            mode = "RGB" if k % 2 else "L"
            pixels = Pillow.new(mode, (size + k, size), (40 * i, 0, 0) if mode == "RGB" else 40 * i)
            pixels.save(root / name / f"{k}.{'png' if k % 2 else 'jpg'}")
    return root


def test_a_folder_of_class_folders_is_an_image_task(tmp_path):
    train = write_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    dev = write_folder(tmp_path / "dev", {"dog": 1})
    task = load_files(train, dev)
    assert task.spec.inputs == "image" and task.spec.label_names == ("cat", "dog")
    assert [label for _image, label in task.train] == [0, 0, 0, 1, 1] and [lab for _i, lab in task.dev] == [1]
    first, second = task.train[0][0], task.train[1][0]
    assert isinstance(first, Image) and (first.height, first.width, first.channels) == (12, 12, 1)
    assert isinstance(second, Image) and (second.width, second.channels) == (13, 3)
    (tmp_path / "other" / "bird").mkdir(parents=True)
    (tmp_path / "other" / "bird" / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match="classes the training folder lacks: bird"):
        load_files(train, tmp_path / "other")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt is not a PNG or JPEG"):
        load_files(train, dev)
    (tmp_path / "train" / "dog" / "notes.txt").unlink()
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        load_files(train, dev)
    with pytest.raises(DataError, match="dev data must be one too"):
        load_files(train, tmp_path / "dev.csv")


def test_the_built_in_image_tasks_hold_every_class_in_fixed_splits():
    fashion = load_task("fashion-mnist", seed=1, train_size=100)
    assert (len(fashion.train), len(fashion.dev), len(fashion.test)) == (100, 1000, 2000)
    assert fashion.spec.inputs == "image" and fashion.spec.label_names[7] == "sneaker"
    assert {label for _image, label in fashion.test} == set(range(10))
    digits = load_task("mnist")
    assert (len(digits.train), len(digits.dev), len(digits.test)) == (3500, 500, 1000)
    assert sorted({label for _i, label in digits.dev}) == list(range(10))  # shuffled: the file is sorted by class
    assert load_task("mnist").test[0][0].pixels == digits.test[0][0].pixels  # the same split every time


def test_a_model_that_reads_the_other_kind_of_input_is_refused(tmp_path, capsys):
    assert main(["train", "--task", "fashion-mnist", "--train-size", "16", "--output", str(tmp_path / "a")]) == 2
    assert "holds images, but all-MiniLM-L6-v2 reads texts: use --model easyocr-crnn" in capsys.readouterr().err
    assert main(["train", "--task", "mr", "--model", "easyocr-crnn", "--train-size", "16",
                 "--output", str(tmp_path / "b")]) == 2
    assert "holds texts, but easyocr-crnn reads images" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- the CLI


def test_the_cli_child_tunes_the_pretrained_crnn_on_fashion_mnist_and_apply_rebuilds_it(tmp_path, capsys):
    """The real slice, end to end: the pinned CRNN learns Fashion-MNIST from 160 images well above chance,
    moves nothing outside its child network, and the model `apply` rebuilds from its delta scores as the
    run did (BatchNorm's statistics stayed the base's)."""
    run, model = tmp_path / "run", tmp_path / "model"
    task = ["--task", "fashion-mnist", "--train-size", "160", "--eval-size", "200", "--no-progress"]
    assert main(["train", *task, "--model", "easyocr-crnn", "--method", "child-d", "--reserve-p", "0.05",
                 "--lr", "1e-3", "--epochs", "2", "--output", str(run)]) == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] > 0.4, metrics["dev"]  # ten classes: chance is 0.1
    assert metrics["changed_outside_child"] == 0
    assert main(["apply", str(run), "--output", str(model)]) == 0
    assert (model / CRNNImageProcessor.FILE).is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), *task, "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert (scored["dev"], scored["test"]) == (metrics["dev"], metrics["test"])


def test_lora_adapts_the_crnns_convolutions_and_linears_and_trains_only_them(tmp_path):
    from childtune.training.config import TrainConfig
    from childtune.training.models import add_lora

    model = add_lora(tiny_crnn(), TrainConfig(lora_rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("ConvNet.0.lora_A" in n for n in trainable) and any("SequenceModeling.1.linear.lora_B" in n
                                                                    for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)
    x, y = images(8, 1)
    model(pixel_values=x, labels=y).loss.backward()  # through peft's sequence-classification wrapper
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def crnn_folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("crnn")
    tiny_crnn().save_pretrained(root / "crnn")  # a random CRNN folder, as a user's own would be
    return (root / "crnn", write_folder(root / "train", {"cat": 4, "dog": 4}),
            write_folder(root / "dev", {"cat": 2, "dog": 2}))


@pytest.mark.parametrize("method", ["full", "child-f", "child-d", "id3", "random", "lora", "pafi", "bitfit",
                                    "child-dyn", "gradual"])
def test_every_method_runs_on_the_crnn_and_keeps_its_weights(crnn_folders, tmp_path, capsys, method):
    """Each method trains the image classifier from the CLI and keeps what its run keeps (a delta for the
    strict ones, the model for the others), with nothing outside a strict child network changed."""
    base, train, dev = crnn_folders
    run = tmp_path / "run"
    assert main(["train", "--model", str(base), "--train", str(train), "--dev", str(dev), "--method", method,
                 "--epochs", "1", "--batch-size", "4", "--no-progress", "--output", str(run)]) == 0, \
        capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["changed_params"] > 0
    assert (run / "delta").is_dir() or (run / "model").is_dir()
    if (run / "delta").is_dir():
        assert metrics["changed_outside_child"] == 0


def test_the_cli_trains_the_crnn_on_a_users_image_folders(crnn_folders, tmp_path, capsys):
    """Class folders in, a delta of the child network and the head out, scored on the dev folder."""
    base, train, dev = crnn_folders
    run = tmp_path / "run"
    assert main(["train", "--model", str(base), "--train", str(train), "--dev", str(dev), "--method", "child-d",
                 "--reserve-p", "0.05", "--epochs", "1", "--batch-size", "4", "--no-progress",
                 "--output", str(run)]) == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["task"], metrics["train_examples"], metrics["dev_examples"]) == ("train", 8, 4)
    assert metrics["changed_outside_child"] == 0 and (run / "delta").is_dir()


def test_an_image_classifier_takes_the_learning_rates_measured_on_it(tmp_path):
    from childtune.training.config import TrainConfig
    from childtune.training.methods import METHODS

    def lr(**kw) -> float | None:
        return TrainConfig(**kw).resolved().lr

    for method in ("full", "child-f", "child-d"):
        assert lr(task="fashion-mnist", method=method, model="easyocr-crnn") == 1e-3
        assert lr(task="mr", method=method) == METHODS[method].lr  # text keeps its own
    assert lr(task="fashion-mnist", method="lora", model="easyocr-crnn") == 3e-3
    assert lr(task="mnist", method="random", model="easyocr-crnn") == 3e-2
    assert lr(task="mr", method="random") == 1e-2
    assert lr(task="fashion-mnist", method="child-d", model="easyocr-crnn", preset="authors") == 4e-5
    assert lr(task="fashion-mnist", method="child-d", model="easyocr-crnn", lr=5e-4) == 5e-4  # given wins
    assert lr(task="fashion-mnist", method="child-d", model="crnn-smollm2") == 2e-4  # the VLM answers as an LM
    folders = write_folder(tmp_path / "train", {"a": 1, "b": 1})
    assert lr(train_file=str(folders), dev_file=str(folders), method="child-d", model="easyocr-crnn") == 1e-3
