"""Batching: `TextDataset` and `make_collate` turn (text, label) examples into tokenised batches,
whatever the examples came from (a built-in task or the user's files)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from childtune.data.types import Example, Kind


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
        pairs = isinstance(texts[0], tuple)
        if pairs:  # sentence pairs: the tokenizer joins each pair with its own separator tokens
            texts = ([a for a, _b in texts], [b for _a, b in texts])
        encoded = tokenizer(
            *(texts if pairs else (texts,)), padding="longest", truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        out = dict(encoded)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return out

    return collate
