"""A vision-language model built from pretrained parts: EasyOCR's CRNN sees, SmolLM2 answers.

`VisionLanguageModel` feeds the CRNN's column features (`crnn.CRNN.sequence`, one 256-vector per image
column, 23 for a 28 x 28 image at the processor's 64 x 96) through a new two-layer MLP `connector` into
the language model's embedding space, as a prefix before the question's tokens; the answer is generated
as text and trained with the causal-LM loss on the answer tokens only. This is the LLaVA recipe (a
frozen-or-tuned vision encoder, an MLP projector, an LLM; Liu et al. 2023) at the scale this CPU allows.

The model is a plain module with three named parts, `vision.`, `connector.`, `language.` (`child_parts`),
which is what per-module child networks need (`--child-scope`, `training.params.restrict_to_parts`, and
child-d's per-part budget): the connector is new, so it trains whole like a
task head (`layers.HEAD`), and the towers' child networks are chosen per part or jointly. Its base is the
same every time: the connector's initial weights come from a fixed seed (`CONNECTOR_SEED`), so a delta
made on one run applies to a model assembled anew (`assemble`). It is held as a model folder like any
other (`config.json` with `model_type` childtune-vlm naming its parts, and the language model's tokenizer
files), so the run's delta records and checks the base as it does for any model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from childtune.data.types import Example, Image
from childtune.fileio import write_json
from childtune.models.crnn import CRNN, LORA_TARGETS, WIDTH, CRNNImageProcessor, load_crnn
from childtune.models.folders import VLM_TYPE

PARTS = {"vision": "easyocr-crnn", "language": "smollm2-135m"}
CONNECTOR_HIDDEN = 1024
CONNECTOR_SEED = 0
IGNORE = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")


class VisionLanguageModel(nn.Module):
    """CRNN features -> `connector` MLP -> prefix of the language model's input embeddings (module doc)."""

    child_parts = ("vision", "connector", "language")

    lora_target_modules = rf"vision\.({LORA_TARGETS})|language\..*\.(q_proj|v_proj)"
    """LoRA on both towers: the CRNN's convolutions and post-LSTM Linears, and the language model's query
    and value projections (peft's default for Llama); the connector trains whole beside it."""

    def __init__(self, vision: CRNN, language: Any, hidden: int = CONNECTOR_HIDDEN) -> None:
        super().__init__()
        if hasattr(vision, "Prediction"):
            del vision.Prediction  # the CTC head: `sequence` never reads it
        self.vision = vision
        width = language.get_input_embeddings().embedding_dim
        generator = torch.Generator().manual_seed(CONNECTOR_SEED)
        layers = (nn.Linear(WIDTH, hidden), nn.Linear(hidden, width))
        with torch.no_grad():  # PyTorch's default init, from a fixed seed: the same base every assembly
            for layer in layers:
                bound = 1 / layer.in_features ** 0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
        self.connector = nn.Sequential(layers[0], nn.GELU(), layers[1])
        self.language = language

    # what transformers' generation, evaluation and the loop read of a model, from the language model
    @property
    def config(self) -> Any:
        return self.language.config

    @property
    def generation_config(self) -> Any:
        return self.language.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.language.generation_config = value

    def get_output_embeddings(self) -> nn.Module:
        return self.language.get_output_embeddings()

    def _embeds(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        visual = self.connector(self.vision.sequence(pixel_values))  # [b, columns, width]
        text = self.language.get_input_embeddings()(input_ids)
        mask = torch.cat([attention_mask.new_ones(visual.shape[:2]), attention_mask], dim=1)
        return torch.cat([visual.to(text.dtype), text], dim=1), mask, visual.shape[1]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits at the text positions only (the image prefix predicts nothing anyone scores), so they
        line up with `labels` as a text-only causal LM's do (Fisher's log-likelihood reads them so); the
        loss is the mean over the answer tokens, as HF's causal-LM loss."""
        embeds, mask, prefix = self._embeds(pixel_values, input_ids, attention_mask)
        logits = self.language(inputs_embeds=embeds, attention_mask=mask).logits[:, prefix:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 **kwargs: Any) -> torch.Tensor:
        """Greedy answers (transformers' `generate` over the embeddings), returned after the prompt's ids
        as a text model's `generate` returns them."""
        embeds, mask, _prefix = self._embeds(pixel_values, input_ids, attention_mask)
        new = self.language.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


class VLMProcessor:
    """The assembly's preprocessor: the image processor of its vision part, its language tokenizer, and the
    question every image of the task is asked (`data.images.question`)."""

    def __init__(self, images: CRNNImageProcessor, tokenizer: Any, question: str = "") -> None:
        self.images, self.tokenizer, self.question = images, tokenizer, question

    def save_pretrained(self, folder: str | Path) -> None:
        self.images.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


class VLMCollate:
    """Batches of (image, answer) for the VLM: the question as a causal LM's prompt (`text`, an
    `LMCollate`: chat template, the loss on the answer and EOS only), and the images' `pixel_values`.

    Every example asks the same question, so prompts are all as long and `for_generation` needs no padding."""

    def __init__(self, images: CRNNImageProcessor, text: Any, question: str) -> None:
        self.images, self.text, self.question = images, text, question
        self.tokenizer = text.tokenizer

    @property
    def truncated(self) -> int:
        return self.text.truncated

    def _pixels(self, images: Sequence[object]) -> torch.Tensor:
        if not all(isinstance(image, Image) for image in images):
            raise TypeError("the vision-language model reads images, and was given text examples")
        return self.images(images)  # type: ignore[arg-type]  # checked just above

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        out = self.text([(self.question, answer) for _image, answer in batch])
        return {"pixel_values": self._pixels([image for image, _answer in batch]), **out}

    def for_generation(self, images: Sequence[object]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self._pixels(images), **self.text.for_generation([self.question] * len(images))}


def assemble(folder: Path, parts: dict[str, str], vision: Path, language: Path) -> None:
    """Write an assembly's model folder: `config.json` naming its `parts` (`vision`, `language`: pinned model
    names or folders, which `vision` and `language` are) and the connector's size and seed, the language
    model's tokenizer files and the vision model's image processor. No weights: `load` builds them from
    the parts' folders."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".assemble-", dir=folder.parent))
    try:
        write_json(tmp / "config.json", {"model_type": VLM_TYPE, "vision": parts["vision"],
                                         "language": parts["language"], "connector_hidden": CONNECTOR_HIDDEN,
                                         "connector_seed": CONNECTOR_SEED})
        for name in TOKENIZER_FILES:
            if (language / name).is_file():
                shutil.copyfile(language / name, tmp / name)
        CRNNImageProcessor.from_pretrained(vision).save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: the folder appears whole or not at all
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path, vision: Path, language: Path, dtype: torch.dtype | None = None) -> tuple[VLMProcessor,
                                                                                                 VisionLanguageModel]:
    """The processor and the model of an assembly folder, built from its parts' folders."""
    import transformers

    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if settings.get("connector_hidden") != CONNECTOR_HIDDEN or settings.get("connector_seed") != CONNECTOR_SEED:
        raise ValueError(f"{folder} describes a connector this childtune does not build: {settings}")
    lm = transformers.AutoModelForCausalLM.from_pretrained(language, local_files_only=True,
                                                           **({"dtype": dtype} if dtype else {}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = VisionLanguageModel(load_crnn(vision), lm)
    if dtype is not None:
        model = model.to(dtype)
    return VLMProcessor(CRNNImageProcessor.from_pretrained(folder), tokenizer), model
