"""Where a parameter sits in a transformer, read from its name alone.

Strategies, Fisher scoring and the analysis all ask the same questions of a parameter name ("which
block is this in?", "is it attention or FFN?"). Answering them from the dotted name, not from model
classes, is what lets childtune work on BERT, RoBERTa, GPT-2 or any `nn.Module` that stacks its
blocks in a `ModuleList` (names like `encoder.layer.3.…`, `h.3.…`, `block.3.…`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Index of the stacked block holding `name` (the first numeric path component), else None."""
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None


def in_layer(name: str) -> bool:
    """The authors' default for what Fisher scores: parameters inside the stacked transformer blocks.

    Child-Tuning_D scored `'layer' in name` on BERT, leaving embeddings, pooler and classifier out;
    "inside a numbered block" is the same set on BERT and carries over to other architectures.
    """
    return layer_index(name) is not None


def blocks(names: Iterable[str]) -> list[list[str]]:
    """Names grouped bottom-up: [before the blocks], block 0, …, block N-1, [after the blocks].

    Registration order puts embeddings before the blocks and pooler/head after them, which is the
    order gradual unfreezing walks (top-down) and the order the analysis plots. Empty groups are dropped.
    """
    before: list[str] = []
    after: list[str] = []
    stacked: dict[int, list[str]] = {}
    for name in names:
        index = layer_index(name)
        if index is not None:
            stacked.setdefault(index, []).append(name)
        elif stacked:
            after.append(name)
        else:
            before.append(name)
    groups = [before, *(stacked[i] for i in sorted(stacked)), after]
    return [g for g in groups if g]


_TYPES = (
    ("layernorm", re.compile(r"layernorm|layer_norm|\bln_|\.ln\d*\.|norm", re.I)),
    ("embedding", re.compile(r"embed|\bwte\b|\bwpe\b", re.I)),
    ("attention", re.compile(r"attn|attention|self\.|q_proj|k_proj|v_proj|o_proj", re.I)),
    ("ffn", re.compile(r"intermediate|mlp|ffn|feed_forward|\.output\.dense|fc\d*|up_proj|down_proj", re.I)),
    ("head", re.compile(r"classifier|pooler|score|lm_head|head", re.I)),
)


def parameter_type(name: str) -> str:
    """Coarse role of a parameter (attention, ffn, layernorm, embedding, head, other) for analysis."""
    for label, pattern in _TYPES:
        if pattern.search(name):
            return label
    return "other"


HEAD = ("classifier", "score")
"""Name fragments of task heads. They are newly initialised per task, so the masking strategies train
them in full, a sparse delta stores them whole, and the analysis leaves them out of every share."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether any of `patterns` (name fragments) occurs in `name`."""
    return any(p in name for p in patterns)
