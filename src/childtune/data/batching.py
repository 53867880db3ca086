"""Batching: `TextDataset` and `make_collate` turn (text, label) examples into tokenised batches,
whatever the examples came from (a built-in task or the user's files)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from childtune.data.types import DataError, Example, Image, Kind


class TextDataset(Dataset):
    """(text, label) examples as a torch Dataset; tokenisation happens per batch in the collate."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def make_collate(
    tokenizer: Any, max_length: int = 128, kind: Kind | None = None
) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """A collate function that tokenises a batch, padded to its longest text (dynamic padding).

    Padding each batch only to its own longest text, not to `max_length`, is what makes training on
    short sentences affordable on a CPU. Texts are cut at `max_length`, and never beyond what the
    tokenizer says the model accepts; a sentence pair is truncated longest-first. `labels` are long for
    classification, float for regression;
    `kind=None` decides per batch from the label types (floats mean regression).
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # tokenizers without a limit report ~1e30
        max_length = min(max_length, limit)
    if max_length < 2:
        raise ValueError(f"max_length must leave room for special tokens, got {max_length}")

    def collate(batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = [text for text, _label in batch]
        labels = [label for _text, label in batch]
        regression = kind == "regression" or (kind is None and any(isinstance(v, float) for v in labels))
        singles = [t for t in texts if isinstance(t, str)]
        pairs = [t for t in texts if isinstance(t, tuple)]
        if singles and pairs:
            raise DataError(f"a batch mixes {len(singles)} single texts with {len(pairs)} sentence pairs")
        # sentence pairs: the tokenizer joins each pair with its own separator tokens
        columns = ([a for a, _b in pairs], [b for _a, b in pairs]) if pairs else (singles,)
        encoded = tokenizer(
            *columns, padding="longest", truncation=True, max_length=max_length, return_tensors="pt",
        )
        out = dict(encoded)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return out

    return collate


class ImageCollate:
    """Batches of (image, class) for an image model: `processor` turns the batch's images into the model's
    `pixel_values` (sizing, colour, scaling are the model's, `models.crnn.CRNNImageProcessor`)."""

    def __init__(self, processor: Callable[[Sequence[Image]], torch.Tensor]) -> None:
        self.processor = processor

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        images = [image for image, _label in batch]
        if not all(isinstance(image, Image) for image in images):
            raise DataError("an image model was given text examples")
        return {"pixel_values": self.processor(images),  # type: ignore[arg-type]  # checked just above
                "labels": torch.tensor([label for _image, label in batch], dtype=torch.long)}


IGNORE = -100
"""The label id a causal LM's loss skips (Hugging Face's `ignore_index`)."""


class LMCollate:
    """Batches of (prompt, target) for a causal LM: the loss covers the target tokens and EOS only.

    Each example is `prompt + target + EOS`; its labels are the target's ids and EOS, and `IGNORE` at
    every prompt and padding position, so no gradient flows from predicting the prompt. The prompt can be
    wrapped in the tokenizer's chat template (`chat=True`, for instruct models). A prompt too long for
    `max_length` loses its beginning, never the target: `truncated` counts the examples that lost some.
    A target that alone does not fit is an error (training it would teach a cut answer).

    `for_generation(prompts)` builds the left-padded prompts greedy decoding continues from.
    """

    def __init__(self, tokenizer: Any, max_length: int = 128, chat: bool = False) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("a causal LM task needs a tokenizer with an EOS token to end the target")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for a prompt and a target, got {max_length}")
        self.tokenizer, self.max_length, self.chat = tokenizer, max_length, chat
        self.truncated = 0

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = []
        for prompt, target in batch:
            answer = self.tokenizer(str(target), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            if len(answer) >= self.max_length:
                raise ValueError(f"a target of {len(answer)} tokens does not fit max_length={self.max_length} "
                                 f"with any prompt: {str(target)[:60]!r}")
            ids = self.prompt_ids(str(prompt))
            room = self.max_length - len(answer)
            if len(ids) > room:
                ids, self.truncated = ids[len(ids) - room:], self.truncated + 1  # keep the prompt's end
            rows.append((ids + answer, [IGNORE] * len(ids) + answer))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in rows]),
        }

    def for_generation(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts padded on the left, so every row's next token is generated at the same position."""
        limit = self.max_length - 1
        ids = [self.prompt_ids(str(p))[-limit:] for p in prompts]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return {
            "input_ids": torch.tensor([[pad] * (width - len(i)) + i for i in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
        }
